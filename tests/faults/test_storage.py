"""What the library writes, replaces and deletes, under the faults a user meets: a folder of the user's taken
for an earlier run, an artifact written twice, a full disk, a read-only destination, damaged bytes, two
writers at once. Each test is one sentence of the README's "What is safe"."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import adapters
from adapters.files import destination_lock
from adapters.training.checkpoint import RUN_MANIFEST, complete_checkpoints

from ..helpers import toy_sentiment


def _model(path, seed=0):
    return adapters.adapt(
        path, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["neg", "pos"]), seed=seed
    )


def _config(out, **kwargs):
    return adapters.TrainConfig(
        **{"max_steps": 2, "batch_size": 8, "output_dir": str(out), "progress": False, **kwargs}
    )


def _flip(path, at=-8):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_overwrite_never_deletes_a_users_logs_or_checkpoints(tiny_llama, tmp_path):
    """The issue's case: a folder holding the user's metrics.jsonl and checkpoints/ is not an earlier run."""
    out = tmp_path / "logs"
    (out / "checkpoints" / "mine").mkdir(parents=True)
    mine = {
        "metrics.jsonl": b'{"loss": 1}\n',
        "checkpoints/important.ckpt": b"ckpt",
        "checkpoints/mine/model.pt": b"pt",
    }
    for rel, data in mine.items():
        (out / rel).write_bytes(data)
    with pytest.raises(adapters.ConfigError, match=r"not a qadapters run.*never replaces or deletes"):
        adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(out, overwrite=True))
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine


def test_overwrite_removes_exactly_what_the_earlier_run_created(tiny_llama, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(out, save_every=1))
    assert json.loads((out / RUN_MANIFEST).read_text())["created"] == [
        "run.json",
        "metrics.jsonl",
        "checkpoints",
        "qadapters",
    ]
    (out / "checkpoints" / "my-notes.md").write_text("mine too")  # the user's file inside a run's folder
    with pytest.raises(adapters.ConfigError, match="holds an earlier run"):
        adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(out, save_every=1))
    adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(out, save_every=2, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "my-notes.md").read_text() == "mine too"
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002"]  # the earlier run's step 1 is gone


def test_an_artifact_is_never_replaced_silently_by_the_cli_either(tiny_llama, tmp_path, capsys):
    from adapters.cli import main

    model = _model(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    with pytest.raises(adapters.ConfigError, match="holds an earlier artifact; pass overwrite=True"):
        _model(tiny_llama, seed=1).save_pretrained(tmp_path / "art")
    torch.testing.assert_close(adapters.load(tmp_path / "art").logits(["good"]), model.logits(["good"]))
    assert main(["merge", str(tmp_path / "art"), str(tmp_path / "art")]) == 2  # not a merge: refused
    assert "not a qadapters merge" in capsys.readouterr().err


def test_two_writers_of_one_destination_the_second_is_refused(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    with destination_lock(tmp_path / "art", "artifact"):
        pid = os.fork()
        if pid == 0:  # another process, as a second `qadapters train` with the same output would be
            try:
                model.save_pretrained(tmp_path / "art")
                os._exit(1)
            except adapters.ConfigError as err:
                os._exit(0 if "another qadapters process is writing" in str(err) else 2)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    model.save_pretrained(tmp_path / "art")  # released: the lock file is gone with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_full_disk_at_a_checkpoint_is_typed_and_leaves_earlier_ones(tiny_llama, tmp_path, monkeypatch):
    import adapters.training.checkpoint as checkpoint

    out, real = tmp_path / "run", checkpoint._write_checkpoint
    calls = []

    def fills_up(accelerator, tmp, state, sharded):
        calls.append(state.step)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full (torch's own error)
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "model.safetensors").write_bytes(b"\0" * 1000)
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            )
        real(accelerator, tmp, state, sharded)

    monkeypatch.setattr(checkpoint, "_write_checkpoint", fills_up)
    with pytest.raises(adapters.StorageError, match=r"no space left on the device of .*checkpoints.*MB are free"):
        adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(out, save_every=1))
    assert [p.name for p in complete_checkpoints(out)] == ["step-000001"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # the partial one removed
    assert not (out / "run.json").exists()  # the run did not finish: nothing claims it did


def test_a_full_disk_at_the_cli_save_exits_2_and_run_json_names_no_artifact(tiny_llama, tmp_path, capsys):
    import safetensors.torch
    import yaml

    from adapters.cli import main

    config = tmp_path / "run.yaml"
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in toy_sentiment(16)))
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": tiny_llama, "quantization": None},
                "adapter": {"kind": "lora", "r": 2},
                "head": {"kind": "classification", "labels": ["neg", "pos"]},
                "data": {"train": str(data), "eval_size": 4},
                "train": {"max_steps": 1, "batch_size": 8, "output_dir": str(tmp_path / "logs"), "progress": False},
                "output": str(tmp_path / "art"),
            }
        )
    )
    real = safetensors.torch.save_file

    def no_space(tensors, filename, metadata=None):
        if "head" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = no_space
    try:
        assert main(["train", str(config)]) == 2
    finally:
        safetensors.torch.save_file = real
    assert "no space left on the device of" in capsys.readouterr().err
    run = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert run["finished"] is True and run["artifact"] is None
    assert not (tmp_path / "art").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["train", str(config), "--overwrite"]) == 0
    assert json.loads((tmp_path / "logs" / "run.json").read_text())["artifact"] == str((tmp_path / "art").resolve())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; the read-only mount is below")
def test_a_read_only_destination_is_refused_before_the_model_loads(tiny_llama, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(adapters.StorageError, match="cannot be written"):
        adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(ro / "run"))


def test_a_read_only_filesystem_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """EROFS, as a read-only mount answers (injected: mounting needs privileges a test may not have)."""
    import tempfile

    from adapters.files import probe_writable

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(adapters.StorageError, match=r"out cannot be written \(the filesystem is read-only"):
        probe_writable(tmp_path / "out", "output")


def test_a_damaged_checkpoint_resumes_from_the_newest_that_verifies(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    adapters.train(_model(tiny_llama), toy_sentiment(32), None, _config(out, save_every=1, max_steps=3))
    newest = complete_checkpoints(out)[-1]
    (newest / "random_states_0.pkl").write_bytes(b"garbage")
    _flip(complete_checkpoints(out)[-2] / "model.safetensors")
    config = _config(out, save_every=1, max_steps=4, resume="auto")
    adapters.train(_model(tiny_llama), toy_sentiment(32), None, config)
    said = capsys.readouterr().out
    assert "step-000003 is corrupt" in said and "random_states_0.pkl has 7 bytes" in said
    assert "step-000002 is corrupt" in said and "model.safetensors differs from what was written" in said
    assert "resumed from" in said and "step-000001 at step 1" in said


def test_every_file_an_artifact_holds_is_verified_on_load(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    for rel in ("head.safetensors", "adapter/adapter_model.safetensors", "qadapters.json"):
        damaged = tmp_path / f"damaged-{rel.replace('/', '-')}"
        import shutil

        shutil.copytree(tmp_path / "art", damaged)
        _flip(damaged / rel, at=-3)
        with pytest.raises(adapters.CheckpointError, match=rf"{rel} differs from what was written"):
            adapters.load(damaged)
    # a file edited on purpose loads when asked (the tensors are still checked for fit)
    adapters.load(tmp_path / "damaged-head.safetensors", verify=False)


def test_orphans_of_a_dead_writer_are_removed_by_the_next_save_only_if_marked(tiny_llama, tmp_path):
    from adapters.files.durable import WRITING

    model = _model(tiny_llama)
    dead = tmp_path / ".art.tmp-deadbeef"
    dead.mkdir()
    (dead / WRITING).touch()
    (dead / "head.safetensors").write_bytes(b"\0" * 100)
    users = tmp_path / ".art.tmp-mine"  # the user's, by chance of the same shape: no mark, kept
    users.mkdir()
    (users / "x").write_text("mine")
    model.save_pretrained(tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.tmp-mine", "art"]


def test_safetensors_own_disk_full_error_in_any_write_is_typed(tmp_path):
    """What transformers' save_pretrained raises inside a merge or an export when the disk fills (safetensors'
    error, no errno) is a StorageError naming the folder, the partial folder removed, the old one intact."""
    from adapters.files import durable_folder

    with durable_folder(tmp_path / "out", "merge") as tmp:
        (tmp / "config.json").write_text("{}")
    message = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    with pytest.raises(adapters.StorageError, match=r"no space left on the device of .*out"):
        with durable_folder(tmp_path / "out", "merge", ["config.json"]) as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * 10)
            raise Exception(message)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "qadapters-manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_runs_partial_checkpoint_is_cleared_when_it_resumes(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(out, save_every=1))
    partial = out / "checkpoints" / ".tmp-step-000003"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    adapters.train(_model(tiny_llama), toy_sentiment(16), None, _config(out, save_every=1, max_steps=3, resume="auto"))
    assert "at step 2" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]
