"""Checkpoints that survive crashes: SIGKILL + resume, kill during save, SIGTERM, NaN, early
stopping, and output folders that are never silently reused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters.training.checkpoint import complete_checkpoints

from .helpers import made_once, toy_sentiment

WORKER = Path(__file__).with_name("train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(model, out: Path, *extra) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, str(WORKER), "--model", model, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(proc: subprocess.Popen, expect: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == expect, out[-2000:] + err[-3000:]
    return out, err


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "worker ended before reaching the point to strike: " + proc.stderr.read()[-2000:]
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    """The run without interruption, trained once per session: what every resumed run must equal."""
    out = made_once(tmp_path_factory, "uninterrupted", lambda folder: _finish(_start(tiny_llama, folder)))
    return load_file(out / "final.safetensors"), _losses(out)


def _assert_same_run(out: Path, uninterrupted, resumed_from: int):
    weights, losses = uninterrupted
    final = load_file(out / "final.safetensors")
    assert final.keys() == weights.keys()
    assert all(torch.equal(final[k], weights[k]) for k in weights), "resumed run ended with other weights"
    after = {s: v for s, v in _losses(out).items() if s > resumed_from}
    assert after and all(after[s] == losses[s] for s in after), "loss curve after the resume differs"


@pytest.mark.slow  # a subprocess run end to end; `make test` runs it
def test_sigkill_then_resume_is_bit_identical(tiny_llama, tmp_path, uninterrupted):
    proc = _start(tiny_llama, tmp_path, "--step-delay", "0.1")
    _wait_for(tmp_path / "run" / "checkpoints" / "step-000006" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "final.safetensors").exists()
    newest = complete_checkpoints(tmp_path / "run")[-1]
    step = json.loads((newest / "trainer_state.json").read_text())["step"]
    assert 6 <= step < 12
    out, _ = _finish(_start(tiny_llama, tmp_path, "--resume", "auto"))
    assert f"resumed from {newest} at step {step}" in out
    _assert_same_run(tmp_path, uninterrupted, step)
    assert len(complete_checkpoints(tmp_path / "run")) == 2  # keep_last


@pytest.mark.slow  # a subprocess run end to end; `make test` runs it
def test_kill_during_save_keeps_the_previous_checkpoint(tiny_llama, tmp_path, uninterrupted):
    proc = _start(tiny_llama, tmp_path, "--slow-save-at", "6")
    _wait_for(tmp_path / "saving", proc)
    checkpoints = tmp_path / "run" / "checkpoints"
    before = {p.name: p.stat().st_size for p in (checkpoints / "step-000004").iterdir()}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (checkpoints / ".tmp-step-000006").is_dir() and not (checkpoints / "step-000006").exists()
    assert {p.name: p.stat().st_size for p in (checkpoints / "step-000004").iterdir()} == before
    _finish(_start(tiny_llama, tmp_path, "--resume", "auto"))  # ignores the partial folder, resumes at 4
    assert not (checkpoints / ".tmp-step-000006").exists()
    _assert_same_run(tmp_path, uninterrupted, 4)


@pytest.mark.slow  # a subprocess run end to end; `make test` runs it
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_llama, tmp_path, uninterrupted):
    proc = _start(tiny_llama, tmp_path, "--step-delay", "0.1")
    _wait_for(tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = _finish(proc, expect=143)
    assert "interrupted at step" in err and "resume='auto'" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").exists()
    _finish(_start(tiny_llama, tmp_path, "--resume", "auto"))
    _assert_same_run(tmp_path, uninterrupted, step)


def _nan_at(model, call: int):
    forward, calls = model.forward, {"n": 0}

    def poisoned(**kwargs):
        out = forward(**kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            out["loss"] = out["loss"] * float("nan")
        return out

    model.forward = poisoned


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tiny_llama, tmp_path):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    _nan_at(model, 3)
    config = adapters.TrainConfig(max_steps=6, batch_size=4, save_every=1, output_dir=str(tmp_path), progress=False)
    with pytest.raises(adapters.NonFiniteLossError, match=r"at step 3.*step-000002"):
        adapters.train(model, toy_sentiment(24), None, config)
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    saved = load_file(tmp_path / "checkpoints" / "step-000002" / "model.safetensors")
    current = dict(model.named_parameters())
    assert all(torch.equal(v, current[k]) for k, v in saved.items())  # nothing moved after the last good step


def test_nan_loss_can_be_skipped(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    _nan_at(model, 3)
    metrics = adapters.train(
        model,
        toy_sentiment(24),
        None,
        adapters.TrainConfig(max_steps=6, batch_size=4, skip_nonfinite=True, progress=False),
    )
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 6
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())


def test_early_stopping_keeps_and_restores_the_best(tiny_llama, tmp_path):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    train_rows = toy_sentiment(64)
    # eval labels inverted: the better the model learns the training data, the worse it scores
    flipped = [{"text": r["text"], "label": "neg" if r["label"] == "pos" else "pos"} for r in toy_sentiment(16, seed=1)]
    metrics = adapters.train(
        model,
        train_rows,
        flipped,
        adapters.TrainConfig(
            max_steps=40,
            lr=2e-2,
            batch_size=8,
            eval_every=2,
            early_stopping_metric="eval_loss",
            early_stopping_patience=2,
            load_best=True,
            keep_last=1,
            save_every=2,
            output_dir=str(tmp_path),
            progress=False,
        ),
    )
    assert metrics["stopped_early"] and metrics["steps"] < 40
    best = metrics["best_step"]
    assert metrics["steps"] == best + 4  # two evaluations without improvement
    best_dir = tmp_path / "checkpoints" / f"step-{best:06d}"
    assert best_dir.is_dir()  # kept despite keep_last=1
    saved = load_file(best_dir / "model.safetensors")
    current = dict(model.named_parameters())
    assert all(torch.equal(v, current[k]) for k, v in saved.items())  # the model ends with the best weights
    assert adapters.evaluate(model, flipped)["eval_loss"] == pytest.approx(metrics["best_eval_loss"], abs=1e-6)


def test_an_earlier_run_is_never_silently_overwritten(tiny_llama, tmp_path):
    def run(**kwargs):
        model = adapters.adapt(
            tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"])
        )
        return adapters.train(
            model,
            toy_sentiment(16),
            None,
            adapters.TrainConfig(max_steps=2, batch_size=4, output_dir=str(tmp_path), progress=False, **kwargs),
        )

    (tmp_path / "notes.txt").write_text("mine")
    run(save_every=1)
    with pytest.raises(adapters.ConfigError, match="resume='auto'.*overwrite=True"):
        run()
    assert run(resume="auto")["steps"] == 2  # a finished run: resuming has nothing left to do
    run(overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(adapters.CheckpointError, match="not a complete checkpoint"):
        run(resume=str(tmp_path / "checkpoints" / "step-000099"))


def test_checkpoint_settings_need_an_output_dir():
    with pytest.raises(adapters.ConfigError, match="output_dir"):
        adapters.TrainConfig(save_every=5)


def test_a_checkpoint_of_another_adapter_is_refused_not_silently_skipped(tiny_llama, tmp_path):
    """The frozen base is not saved, so the model loads non-strictly: tensors under other names would
    otherwise be skipped in silence and the run would go on from fresh adapter weights."""
    data = toy_sentiment(32)
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["neg", "pos"]))
    adapters.train(
        model,
        data,
        None,
        adapters.TrainConfig(max_steps=2, batch_size=8, save_every=1, output_dir=str(tmp_path), progress=False),
    )
    other = adapters.adapt(
        tiny_llama, adapter=adapters.Bottleneck(), head=adapters.Classification(labels=["neg", "pos"])
    )
    with pytest.raises(adapters.CheckpointError, match="holds other trainable tensors than this model"):
        adapters.train(
            other,
            data,
            None,
            adapters.TrainConfig(max_steps=4, batch_size=8, resume="auto", output_dir=str(tmp_path), progress=False),
        )
