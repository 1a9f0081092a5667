"""Training under 2 CPU processes (torchrun, gloo) equals one process with the same global batch."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import launch_ddp_worker, made_once, one_after_another

# the runs compared, each by name: the worker's options besides the model, the batch size and the folder
CASES = {
    "lora": ["--adapter", "lora"],
    "bottleneck": ["--adapter", "bottleneck"],
    "probe": ["--adapter", "lora", "--linear-probe", "--train-rows", "63"],  # 63: an odd count of rows
}


def _launch(model: str, processes: int, batch_size: int, root: Path) -> None:
    """Every case of ``CASES``, one after another in one launch of ``processes`` processes, into ``root/<case>``
    (a launch's start-up, not the tiny runs, is most of its time)."""
    runs = {
        root / name: ["--model", model, "--batch-size", str(batch_size), *options] for name, options in CASES.items()
    }
    printed = launch_ddp_worker(processes, one_after_another(runs))
    assert printed.count(f"training on {processes} process(es)") == len(CASES)


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """Each case trained by 2 processes (batch 4 each) and by one (batch 8): the same global batch. One launch
    per side, made once per session; returns a case's two folders."""

    def make(folder: Path) -> None:
        _launch(tiny_llama, 2, 4, folder / "ddp")
        _launch(tiny_llama, 1, 8, folder / "single")

    folder = made_once(tmp_path_factory, "distributed", make)
    return lambda case: (folder / "ddp" / case, folder / "single" / case)


@pytest.mark.slow  # a subprocess run end to end; `make test` runs it
@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
def test_two_processes_match_one(runs, adapter):
    ddp_out, single_out = runs(adapter)
    ddp = [load_file(ddp_out / f"rank{r}.safetensors") for r in (0, 1)]
    single = load_file(single_out / "rank0.safetensors")
    assert ddp[0].keys() == single.keys() and len(single) > 0
    for name in single:
        assert torch.equal(ddp[0][name], ddp[1][name]), f"{name} differs between ranks"
        assert torch.allclose(ddp[0][name], single[name], atol=1e-5, rtol=1e-4), f"{name}: 2 processes != 1 process"

    metrics = [json.loads((ddp_out / f"metrics{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((single_out / "metrics0.json").read_text())
    assert metrics[0]["world_size"] == 2 and one["world_size"] == 1
    assert metrics[0]["eval_count"] == metrics[1]["eval_count"] == 27  # odd size: no duplicate, none lost
    assert metrics[0]["eval_accuracy"] == metrics[1]["eval_accuracy"] == one["eval_accuracy"]
    assert metrics[0]["steps"] == one["steps"] == 16

    # one artifact, one log, one set of checkpoints, written by the main process only; the artifact loads
    checkpoints = sorted(p.name for p in (ddp_out / "logs" / "checkpoints").iterdir())
    assert checkpoints == ["step-000012", "step-000016"]  # keep_last=2, no partial .tmp- folder left
    assert json.loads((ddp_out / "reload.json").read_text())["same_logits"]
    assert [p.name for p in ddp_out.iterdir() if p.name.startswith(".")] == []
    log = (ddp_out / "logs" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log if "train_loss" in line]
    assert steps == sorted(set(steps))  # one writer: no step logged twice


@pytest.mark.slow
def test_the_linear_probe_sees_every_row_once_under_two_processes(runs):
    """Each process reads its shard; all fit the same head on the gathered features of all 63 rows (an odd
    count: shards evened out by repeating a row would count it twice)."""
    ddp_out, single_out = runs("probe")
    metrics = [json.loads((ddp_out / f"metrics{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((single_out / "metrics0.json").read_text())
    assert metrics[0]["probe_rows"] == metrics[1]["probe_rows"] == one["probe_rows"] == 63
    assert metrics[0]["probe_loss_after"] == metrics[1]["probe_loss_after"]
    # the same rows, batched differently: the same fit up to float summation order
    assert metrics[0]["probe_loss_before"] == pytest.approx(one["probe_loss_before"], rel=1e-5)
    assert metrics[0]["probe_loss_after"] == pytest.approx(one["probe_loss_after"], rel=1e-3)
    ddp = [load_file(ddp_out / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ddp[0][name], ddp[1][name]) for name in ddp[0])  # one model on both ranks
