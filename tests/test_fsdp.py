"""FSDP2 training (``sharding/fsdp.py``): under 2 CPU processes (torchrun, gloo) it trains the same adapter
and head as one process with the same global batch, holds half the frozen weights per rank, saves one
artifact that reloads equal, resumes exactly after a crash, runs across two "nodes" on one host, keeps the
4-bit bytes intact when it gathers in bf16, and refuses what it would corrupt before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters.errors import ConfigError
from adapters.sharding.fsdp import check_fsdp, match_4bit_storage
from tests.helpers import DDP_WORKER, launch_ddp_worker, made_once, one_after_another, toy_sentiment

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(out: Path | None, processes: int, *extra: str, expect: int = 0) -> str:
    """One torchrun launch of the worker into ``out`` (None: ``extra`` names each run's own, ``one_after_another``)."""
    if out is not None:
        out.mkdir(exist_ok=True)
        extra = ("--out", str(out), *extra)
    return launch_ddp_worker(processes, list(extra), expect)


def _trained(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(out / f"rank{rank}.safetensors")


def _metrics(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"metrics{rank}.json").read_text())


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"{name}: {(a[name] - b[name]).abs().max()}"


# --- refused before anything loads -----------------------------------------------------------------


def test_int8_and_fp16_are_refused_with_the_reason_and_the_fix():
    with pytest.raises(ConfigError, match="int8.*row scales.*nf4"):
        check_fsdp("int8", "no")
    with pytest.raises(ConfigError, match="fp16.*bf16"):
        check_fsdp("nf4", "fp16")
    check_fsdp("nf4", "bf16")
    check_fsdp(None, "no")


def test_train_refuses_int8_fsdp_before_it_encodes_a_row(tiny_llama):
    model = adapters.adapt(tiny_llama, head=adapters.Classification(labels=["neg", "pos"]), quantization="int8")
    with pytest.raises(ConfigError, match="int8"):
        adapters.train(model, toy_sentiment(8), config=adapters.TrainConfig(fsdp=True, progress=False))


def test_the_cli_refuses_int8_fsdp_before_loading_the_model(tmp_path, capsys):
    import adapters.cli as cli

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in toy_sentiment(8)))
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {name: /nowhere/not-a-model, quantization: int8}\n"
        "head: {kind: classification, labels: [neg, pos]}\n"
        f"data: {{train: {rows}}}\ntrain: {{fsdp: true}}\noutput: {tmp_path / 'out'}\n"
    )
    assert cli.main(["train", str(config)]) != 0
    assert "fsdp=True with quantization='int8'" in capsys.readouterr().err  # not "cannot load /nowhere"


def test_fsdp_in_one_process_says_it_trains_unsharded(tiny_llama, capsys):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    result = adapters.train(
        model, toy_sentiment(8), config=adapters.TrainConfig(fsdp=True, max_steps=1, progress=False)
    )
    assert "1 process: there is nothing to shard, so it trains unsharded" in capsys.readouterr().out
    assert result["world_size"] == 1 and "fsdp_frozen_bytes_per_rank" not in result


def test_accelerate_launch_use_fsdp_asks_for_ours(tiny_llama, capsys, monkeypatch):
    """``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP: read as fsdp=True (on CPUs Accelerate alone
    would silently train with DDP), and left as it was for the caller."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = adapters.adapt(tiny_llama, head=adapters.Classification(labels=["neg", "pos"]), quantization="int8")
    with pytest.raises(ConfigError, match="fsdp=True with quantization='int8'"):
        adapters.train(model, toy_sentiment(8), config=adapters.TrainConfig(progress=False))
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    adapters.train(model, toy_sentiment(8), config=adapters.TrainConfig(max_steps=1, progress=False))
    assert "nothing to shard" in capsys.readouterr().out
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"


def test_4bit_storage_is_reinterpreted_not_converted(tiny_llama):
    """The bytes FSDP gathers in bf16 are the packed 4-bit bytes themselves: same bytes, same logits."""
    import bitsandbytes as bnb

    model = adapters.adapt(tiny_llama, head=adapters.Classification(labels=["neg", "pos"]), quantization="nf4")
    texts = ["good fun film", "a dull mess"]
    before_logits = model.logits(texts)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [m.weight.data.clone() for m in layers]
    assert match_4bit_storage(model, torch.bfloat16) == len(layers) > 0
    for layer, old in zip(layers, before, strict=True):
        assert layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight.data.reshape(-1).view(torch.uint8), old.reshape(-1))
        assert not layer.support_avx512bf16_for_cpu  # no in-place repacking of a sharded weight
    assert torch.equal(model.logits(texts), before_logits)


# --- under torchrun (subprocesses) -----------------------------------------------------------------


FSDP_CASES = {  # every 2-process FSDP run the tests compare, by its folder's name
    "lora-nf4": ["--adapter", "lora", "--batch-size", "4", "--fsdp"],
    "sharded-load": ["--adapter", "lora", "--batch-size", "4", "--fsdp", "--shard-load"],
    "bottleneck-none": ["--adapter", "bottleneck", "--quantization", "none", "--batch-size", "4", "--fsdp"],
    "bf16": ["--adapter", "lora", "--batch-size", "4", "--fsdp", "--mixed-precision", "bf16"],
}


@pytest.fixture(scope="module")
def fsdp_runs(tiny_llama, tmp_path_factory):
    """The runs of ``FSDP_CASES``, trained one after another in one 2-process launch, made once per session;
    returns a case's folder and what that case printed."""

    def launch(folder: Path) -> None:
        runs = {folder / name: ["--model", tiny_llama, *options] for name, options in FSDP_CASES.items()}
        _launch(None, 2, *one_after_another(runs))

    folder = made_once(tmp_path_factory, "fsdp-runs", launch)
    return lambda name: (folder / name, "".join(p.read_text() for p in sorted((folder / name).glob("printed*.txt"))))


@pytest.fixture(scope="module")
def fsdp_run(fsdp_runs):
    """The 2-process FSDP run of LoRA on NF4 that several tests compare against: its folder and what it printed."""
    return fsdp_runs("lora-nf4")


COMPARED = [("lora", "nf4"), ("bottleneck", "none")]  # both of each: an adapter kind and a base


@pytest.fixture(scope="module")
def single_runs(tiny_llama, tmp_path_factory):
    """The one-process references of ``COMPARED`` at batch 8 (the global batch of 2 processes x 4), trained one
    after the other in one launch, made once per session; returns a case's folder."""

    def launch(folder: Path) -> None:
        runs = {
            folder / f"{adapter}-{quantization}": ["--model", tiny_llama, "--adapter", adapter]
            + ["--quantization", quantization, "--batch-size", "8"]
            for adapter, quantization in COMPARED
        }
        _launch(None, 1, *one_after_another(runs))

    folder = made_once(tmp_path_factory, "fsdp-singles", launch)
    return lambda adapter, quantization: folder / f"{adapter}-{quantization}"


@pytest.mark.slow  # subprocess runs end to end; `make test` runs them
@pytest.mark.parametrize("adapter,quantization", COMPARED)
def test_fsdp_on_two_processes_matches_one_process(adapter, quantization, single_runs, fsdp_runs):
    sharded_out, printed = fsdp_runs(f"{adapter}-{quantization}")
    single_out = single_runs(adapter, quantization)

    sharded, single = [_trained(sharded_out, r) for r in (0, 1)], _trained(single_out)
    _assert_close(sharded[0], single, atol=1e-4)
    _assert_close(sharded[0], sharded[1], atol=0)
    metrics = [_metrics(sharded_out, r) for r in (0, 1)]
    assert metrics[0]["eval_accuracy"] == _metrics(single_out)["eval_accuracy"]
    # each rank holds about half of the frozen weights, the input embeddings split by vocabulary rows
    # included, and the two halves make the whole
    held = [m["fsdp_frozen_bytes_per_rank"] for m in metrics]
    assert metrics[0]["fsdp_replicated_bytes"] == 0
    assert sum(held) == metrics[0]["frozen_bytes"] and max(held) / metrics[0]["frozen_bytes"] < 0.52
    assert "FSDP2: 2 blocks + the root sharded over 2 processes" in printed
    assert "the input embeddings split by vocabulary rows" in printed
    reload = json.loads((sharded_out / "reload.json").read_text())
    assert reload["same_logits"], reload  # one whole artifact, loaded in one process


@pytest.mark.slow
def test_a_sharded_load_trains_exactly_as_a_whole_load_then_shard(fsdp_runs, fsdp_run):
    """adapt(fsdp=True): each rank reads and quantizes only its shard; the run is the same run, bit for bit."""
    (sharded, printed), (whole, _) = fsdp_runs("sharded-load"), fsdp_run
    assert "FSDP2: 2 blocks + the root sharded over 2 processes" in printed
    _assert_close(_trained(sharded), _trained(whole), atol=0)
    assert _metrics(sharded)["eval_loss"] == _metrics(whole)["eval_loss"]
    assert json.loads((sharded / "reload.json").read_text())["same_logits"]


@pytest.mark.slow
def test_fsdp_resumes_exactly_after_a_crash(tiny_llama, tmp_path, fsdp_run):
    common = ["--model", tiny_llama, "--adapter", "lora", "--batch-size", "4", "--fsdp"]
    whole, _ = fsdp_run
    _launch(tmp_path / "crashed", 2, *common, "--crash-at", "10", expect=1)  # after the step-8 checkpoint
    assert not (tmp_path / "crashed" / "rank0.safetensors").exists()
    printed = _launch(tmp_path / "crashed", 2, *common, "--resume", "auto")
    assert "at step 8" in printed
    _assert_close(_trained(tmp_path / "crashed"), _trained(whole), atol=0)
    assert _metrics(tmp_path / "crashed")["eval_loss"] == _metrics(whole)["eval_loss"]


@pytest.mark.slow
def test_bf16_gather_keeps_every_4bit_byte(fsdp_runs):
    """bitsandbytes#1945 / accelerate#3983: gathered in bf16, the packed NF4 bytes must come back unchanged."""
    out, printed = fsdp_runs("bf16")
    assert "all-gather in bfloat16" in printed
    metrics = _metrics(out)
    assert metrics["4bit_bytes_unchanged"] and metrics["eval_accuracy"] > 0.8
    # the sharded model computes in bf16, the reload in fp32: close, not equal
    assert json.loads((out / "reload.json").read_text())["max_logit_difference"] < 0.1


@pytest.mark.slow
def test_two_nodes_on_one_host_match_two_local_processes(tiny_llama, tmp_path, fsdp_run):
    """The multi-node launch of the README (``--nnodes 2``, c10d rendezvous), both "nodes" on 127.0.0.1."""
    common = ["--model", tiny_llama, "--adapter", "lora", "--batch-size", "4", "--fsdp"]
    out = tmp_path / "nodes"
    out.mkdir()
    port = str(29500 + os.getpid() % 1000)
    nodes = [
        subprocess.Popen(
            [
                *[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"],
                *["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port],
                *[str(DDP_WORKER), "--out", str(out), *common],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        printed, _ = node.communicate(timeout=300)
        assert node.returncode == 0, printed[-3000:]
    _assert_close(_trained(out), _trained(fsdp_run[0]), atol=0)
