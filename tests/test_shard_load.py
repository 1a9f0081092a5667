"""Sharded loading (``adapt(..., fsdp=True)``, ``sharding/load.py``) and pre-quantized bases
(``quantize_base``): a rank's 4-bit bytes equal the same slice of a whole-model quantization, a pre-quantized
base loads to the same model as quantizing at load, and bad files are named before anything slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapters
from adapters.backbone.quantize import FourBit, quantize_range, whole_state
from adapters.backbone.weight_files import WeightFiles
from adapters.errors import CheckpointError, ConfigError

WORKER = Path(__file__).with_name("shard_load_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# --- one slice at a time equals the whole ---------------------------------------------------------------


def _chunks(total: int, world: int) -> list[tuple[int, int]]:
    size = -(-total // world)
    return [(min(r * size, total), min((r + 1) * size, total)) for r in range(world)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,world", [((96, 64), 2), ((50, 70), 3), ((7, 9), 2), ((128, 48), 4)])
def test_quantizing_each_ranks_bytes_equals_quantizing_the_whole(shape, world, quant_type):
    """Ranges that cut blocks in two, ranks with nothing, a last partial block: the bytes, the absmax of every
    block (combined as all_reduce(MAX) combines them) and the double-quantized state are bitsandbytes' own."""
    import bitsandbytes.functional as F

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(torch.bfloat16)
    whole, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type=quant_type)
    settings = FourBit(quant_type, True, torch.bfloat16)
    flat = weight.reshape(-1)
    parts, absmax = [], None
    for start, stop in _chunks(whole.numel(), world):
        packed, found = quantize_range(lambda a, b: flat[a:b], shape, start, stop, settings)
        parts.append(packed)
        absmax = found if absmax is None else torch.maximum(absmax, found)
    assert torch.equal(torch.cat(parts), whole.reshape(-1))
    rebuilt = whole_state(absmax, shape, settings)
    assert torch.equal(rebuilt.absmax, state.absmax) and torch.equal(rebuilt.offset, state.offset)
    assert torch.equal(rebuilt.state2.absmax, state.state2.absmax) and rebuilt.shape == state.shape
    assert torch.equal(F.dequantize_4bit(whole, rebuilt), F.dequantize_4bit(whole, state))


# --- files named before anything loads ------------------------------------------------------------------


def test_a_base_without_safetensors_is_refused_with_the_fix(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*pytorch_model.bin.*save_pretrained"):
        WeightFiles(tmp_path)


def test_a_truncated_or_damaged_shard_is_named(tiny_llama, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    file = copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated.*again"):
        WeightFiles(copy)
    file.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        WeightFiles(copy)


def test_fsdp_in_one_process_is_the_ordinary_load_said_once(tiny_llama, capsys):
    from adapters import model as model_module

    model_module._SAID.discard("fsdp-one-process")
    kwargs = dict(adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), fsdp=True)
    first = adapters.adapt(tiny_llama, **kwargs)
    adapters.adapt(tiny_llama, **kwargs)
    said = capsys.readouterr().err
    assert said.count("fsdp=True in one process: loading the whole model") == 1
    assert first.shard_report is None


def test_int8_with_fsdp_is_refused_before_loading():
    with pytest.raises(ConfigError, match="int8.*row scales"):
        adapters.adapt(
            "/nowhere/no-model", head=adapters.Classification(labels=["a", "b"]), quantization="int8", fsdp=True
        )


# --- pre-quantized bases ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_tiny(tiny_llama, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("prequantized") / "tiny-nf4"
    adapters.quantize_base(tiny_llama, out, "nf4", dtype="float32", progress=False)
    return str(out)


def test_a_prequantized_base_is_the_base_quantized_at_load(tiny_llama, quantized_tiny):
    """Same packed bytes, same state, same logits; read by transformers' own from_pretrained too."""
    import bitsandbytes as bnb
    from transformers import AutoModel

    kwargs = dict(adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), dtype="float32")
    at_load, saved = adapters.adapt(tiny_llama, **kwargs), adapters.adapt(quantized_tiny, **kwargs)
    assert saved.base.quantization == "nf4"
    layers = [[m for m in x.modules() if isinstance(m, bnb.nn.Linear4bit)] for x in (at_load, saved)]
    assert len(layers[0]) == len(layers[1]) > 0
    for a, b in zip(*layers, strict=True):
        assert torch.equal(a.weight.data, b.weight.data)
        assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
    texts = ["good fun film", "a dull mess"]
    assert torch.equal(at_load.logits(texts), saved.logits(texts))
    plain = AutoModel.from_pretrained(quantized_tiny)  # no quantization_config: it is in the folder's config
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules()) == len(layers[0])
    assert json.loads((Path(quantized_tiny) / "qadapters-manifest.json").read_text())["holds"] == "quantized base"


def test_an_artifact_trained_on_a_prequantized_base_reloads_equal(quantized_tiny, tmp_path):
    from tests.helpers import toy_sentiment

    model = adapters.adapt(
        quantized_tiny, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"])
    )
    adapters.train(model, toy_sentiment(16), config=adapters.TrainConfig(max_steps=2, progress=False))
    model.save_pretrained(tmp_path / "artifact")
    texts = ["good fun film", "a dull mess"]
    assert torch.allclose(adapters.load(tmp_path / "artifact").logits(texts), model.logits(texts), atol=1e-6)


def test_prequantized_bad_input(tiny_llama, quantized_tiny, tmp_path):
    with pytest.raises(ConfigError, match="pre-quantized in nf4; it cannot be loaded as 'fp4'"):
        adapters.adapt(quantized_tiny, head=adapters.Classification(labels=["a", "b"]), quantization="fp4")
    with pytest.raises(ConfigError, match="quantized already"):
        adapters.quantize_base(quantized_tiny, tmp_path / "again", progress=False)
    with pytest.raises(ConfigError, match="LLM.int8 weights are quantized at load"):
        adapters.quantize_base(tiny_llama, tmp_path / "int8", "int8", progress=False)
    with pytest.raises(ConfigError, match="holds an earlier quantized base"):
        adapters.quantize_base(tiny_llama, quantized_tiny, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a qadapters quantized base"):
        adapters.quantize_base(tiny_llama, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_cli_quantizes_a_base(tiny_llama, tmp_path, capsys):
    import adapters.cli as cli

    assert cli.main(["quantize", tiny_llama, str(tmp_path / "q"), "--quantization", "fp4"]) == 0
    assert "fp4 base written to" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"


# --- under torchrun ---------------------------------------------------------------------------------------


def _launch(out: Path, cases: list[str], processes: int = 2, extra: tuple[str, ...] = ()) -> list:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cases = [arg for case in cases for arg in ("--case", case)]
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed memory goes back: the samples follow live tensors
    done = subprocess.run(
        [*cmd, str(WORKER), "--out", str(out), *cases, *extra], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


CASES = [
    ("nf4", "bfloat16", "classification", False),  # all-gathered in bf16: the bytes stored as bf16
    ("nf4", "float32", "causal", False),  # tied embeddings: sharded with the LM head, not replicated
    ("fp4", "float32", "classification", False),
    ("none", "float32", "classification", False),
    ("nf4", "float32", "classification", True),  # a pre-quantized base: bytes read, not quantized
]


@pytest.mark.slow
def test_each_rank_holds_exactly_its_slice_of_the_whole_load(tiny_llama, tied_llama, quantized_tiny, tmp_path):
    """Every frozen parameter's chunk on each rank equals the same rows (4-bit: bytes and whole state) of the
    ordinary whole load, and the sharded model computes what the whole one does. The same launch then loads
    SmolLM2-135M (real weights, NF4) and samples each rank's anonymous memory every 5 ms while adapt() runs:
    it grows by the rank's share of the frozen base and the load's working set, never by the whole base."""
    import adapters.backbone.packaged as packaged

    models = [quantized_tiny if pre else tied_llama if head == "causal" else tiny_llama for _, _, head, pre in CASES]
    cases = [f"{m},{q},{d},{h}" for m, (q, d, h, _) in zip(models, CASES, strict=True)]
    found = _launch(tmp_path, cases, extra=("--memory", str(packaged.resolve_packaged("smollm2-135m"))))
    for rank in found:
        memory = rank["memory"]
        assert memory["frozen_bytes_here"] <= 0.52 * memory["frozen_bytes"]
        assert memory["growth"] < 0.9 * memory["frozen_bytes"], memory  # measured 0.74; a whole load: 1.0 and more
    ranks = [rank["cases"] for rank in found]
    texts = ["good fun film", "a dull mess", "not bad at all"]
    for i, (model, (quantization, dtype, head, _)) in enumerate(zip(models, CASES, strict=True)):
        for report in (ranks[0][i], ranks[1][i]):
            assert all(report["same"].values()), (cases[i], [k for k, v in report["same"].items() if not v])
            assert len(report["same"]) > 10 and "sharded over 2 processes" in report["shard_report"]
        if head != "classification":
            continue
        assert ranks[0][i]["logits"] == ranks[1][i]["logits"]  # one model: every rank computes the same
        single = adapters.adapt(
            model, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]),
            quantization=None if quantization == "none" else quantization, dtype=dtype,
        )  # fmt: skip
        atol = 1e-5 if dtype == "float32" else 2e-2
        assert torch.allclose(torch.tensor(ranks[0][i]["logits"]), single.logits(texts), atol=atol), cases[i]


@pytest.mark.slow
def test_the_cli_trains_sharded_from_a_prequantized_base(quantized_tiny, tmp_path):
    """``torchrun -m adapters train run.yaml train.fsdp=true``: the load is sharded, one artifact is written,
    and it reloads in one process."""
    from tests.helpers import toy_sentiment

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in toy_sentiment(16)))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name: {quantized_tiny}}}\nadapter: {{kind: lora, r: 4}}\n"
        "head: {kind: classification, labels: [neg, pos]}\n"
        f"data: {{train: {rows}}}\ntrain: {{max_steps: 2, batch_size: 4, progress: false}}\n"
        f"output: {tmp_path / 'artifact'}\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "adapters"]
    done = subprocess.run(
        [*cmd, "train", str(config), "train.fsdp=true"], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the input embeddings split by vocabulary rows" in done.stdout
    model = adapters.load(tmp_path / "artifact")
    assert model.base.quantization == "nf4" and model.shard_report is None
    assert model.predict(["good fun film"])[0] in ("neg", "pos")
