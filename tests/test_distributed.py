"""Training under 2 CPU processes (torchrun, gloo) equals one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(model: str, adapter: str, processes: int, batch_size: int, out: Path, *extra: str) -> None:
    out.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = launcher + [
        str(WORKER),
        "--model",
        model,
        "--adapter",
        adapter,
        "--batch-size",
        str(batch_size),
        "--out",
        str(out),
        *extra,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"training on {processes} process(es)" in done.stdout


@pytest.mark.slow  # a subprocess run end to end; `make test` runs it
@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
def test_two_processes_match_one(tiny_llama, tmp_path, adapter):
    _run(tiny_llama, adapter, 2, 4, tmp_path / "ddp")
    _run(tiny_llama, adapter, 1, 8, tmp_path / "single")  # same global batch: 2 x 4 = 1 x 8

    ddp = [load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1)]
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    assert ddp[0].keys() == single.keys() and len(single) > 0
    for name in single:
        assert torch.equal(ddp[0][name], ddp[1][name]), f"{name} differs between ranks"
        assert torch.allclose(ddp[0][name], single[name], atol=1e-5, rtol=1e-4), f"{name}: 2 processes != 1 process"

    metrics = [json.loads((tmp_path / "ddp" / f"metrics{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((tmp_path / "single" / "metrics0.json").read_text())
    assert metrics[0]["world_size"] == 2 and one["world_size"] == 1
    assert metrics[0]["eval_count"] == metrics[1]["eval_count"] == 27  # odd size: no duplicate, none lost
    assert metrics[0]["eval_accuracy"] == metrics[1]["eval_accuracy"] == one["eval_accuracy"]
    assert metrics[0]["steps"] == one["steps"] == 16

    # one artifact, one log, one set of checkpoints, written by the main process only; the artifact loads
    checkpoints = sorted(p.name for p in (tmp_path / "ddp" / "logs" / "checkpoints").iterdir())
    assert checkpoints == ["step-000012", "step-000016"]  # keep_last=2, no partial .tmp- folder left
    assert json.loads((tmp_path / "ddp" / "reload.json").read_text())["same_logits"]
    assert [p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith(".")] == []
    log = (tmp_path / "ddp" / "logs" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log if "train_loss" in line]
    assert steps == sorted(set(steps))  # one writer: no step logged twice


@pytest.mark.slow
def test_the_linear_probe_sees_every_row_once_under_two_processes(tiny_llama, tmp_path):
    """Each process reads its shard; all fit the same head on the gathered features of all 63 rows (an odd
    count: shards evened out by repeating a row would count it twice)."""
    _run(tiny_llama, "lora", 2, 4, tmp_path / "ddp", "--linear-probe", "--train-rows", "63")
    _run(tiny_llama, "lora", 1, 8, tmp_path / "single", "--linear-probe", "--train-rows", "63")
    metrics = [json.loads((tmp_path / "ddp" / f"metrics{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((tmp_path / "single" / "metrics0.json").read_text())
    assert metrics[0]["probe_rows"] == metrics[1]["probe_rows"] == one["probe_rows"] == 63
    assert metrics[0]["probe_loss_after"] == metrics[1]["probe_loss_after"]
    # the same rows, batched differently: the same fit up to float summation order
    assert metrics[0]["probe_loss_before"] == pytest.approx(one["probe_loss_before"], rel=1e-5)
    assert metrics[0]["probe_loss_after"] == pytest.approx(one["probe_loss_after"], rel=1e-3)
    ddp = [load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ddp[0][name], ddp[1][name]) for name in ddp[0])  # one model on both ranks
