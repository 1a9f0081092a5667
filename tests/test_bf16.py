"""bf16 compute on CPU (backbone/precision.py): what ``"auto"`` does on a bf16 CPU, bf16 against fp32 within
stated tolerances (fp32, NF4 and int8 bases), the fp32 parts kept fp32, the serve path, the memory estimate,
and resume bit-identical within one precision.

Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%). Measured on the tiny 2-layer
Llama (fp32 / NF4 / int8 base): logits moved by 1.8% / 3.0% / 1.2% of their largest magnitude, the loss by
0.2% / 0.1% / 0.4%, and the gradients' cosine to fp32's was >= 0.9995. Stated: logits within 5% of their
largest magnitude, the loss within 1%, gradients' cosine > 0.995."""

from __future__ import annotations

import shutil

import pytest
import torch

import adapters
from adapters.backbone import precision
from adapters.training.checkpoint import complete_checkpoints
from adapters.training.loop import TrainingLoop

from .helpers import toy_sentiment

TEXTS = ["good fun film", "a dull and tedious mess", "the acting was not very good"]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU where ``"auto"`` picks bf16 (the override: no measurement in tests)."""
    monkeypatch.setenv(precision.OVERRIDE, "1")
    precision.cpu_prefers_bf16.cache_clear()
    yield
    precision.cpu_prefers_bf16.cache_clear()


def _model(path, quantization=None, dtype=None, adapter=None):
    return adapters.adapt(
        path,
        adapter=adapter or adapters.LoRA(r=4, dropout=0.0),
        head=adapters.Classification(labels=["neg", "pos"]),
        quantization=quantization,
        dtype=dtype,
        seed=0,
    )


def test_auto_on_a_bf16_cpu_loads_trains_and_predicts_in_bf16(tiny_llama, bf16_cpu):
    model = _model(tiny_llama)
    assert model.base.compute_dtype == torch.bfloat16
    assert next(model.backbone.parameters()).dtype == torch.bfloat16  # the frozen base stored in bf16
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # master weights stay fp32
    loop = TrainingLoop(model, toy_sentiment(16), None, adapters.TrainConfig(max_steps=2, batch_size=8))
    assert loop.precision == "bf16"
    result = adapters.train(model, toy_sentiment(16), None, adapters.TrainConfig(max_steps=2, batch_size=8))
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    assert all(p.dtype == torch.float32 for p in trained)
    logits = model.logits(TEXTS)
    assert logits.dtype == torch.float32  # the head answers in fp32: its softmax and loss too
    estimate = adapters.estimate_memory(tiny_llama, quantization=None, device="cpu")
    assert estimate.settings["mixed_precision"] == "bf16" and estimate.settings["compute_dtype"] == "bfloat16"
    precision.cpu_prefers_bf16.cache_clear()
    with pytest.MonkeyPatch.context() as fp32_cpu:
        fp32_cpu.setenv(precision.OVERRIDE, "0")
        fp32 = adapters.estimate_memory(tiny_llama, quantization=None, device="cpu")
    assert fp32.settings["compute_dtype"] == "float32"
    assert estimate.base_unquantized * 2 == fp32.base_unquantized  # the frozen base in half the bytes


def test_mixed_precision_no_keeps_fp32(tiny_llama, bf16_cpu, caplog):
    from adapters.backbone.precision import load_dtype

    assert load_dtype(None, "no", "cpu") == "float32"  # the CLI's reading of train.mixed_precision: no
    assert load_dtype("bfloat16", "no", "cpu") == "bfloat16"  # a dtype asked for wins
    assert load_dtype(None, "no", "cuda") is None and load_dtype(None, "auto", "cpu") is None
    model = _model(tiny_llama, dtype="float32")
    loop = TrainingLoop(model, toy_sentiment(16), None, adapters.TrainConfig(max_steps=1, mixed_precision="no"))
    assert loop.precision == "no" and model.base.compute_dtype == torch.float32
    with caplog.at_level("WARNING"):
        TrainingLoop(_model(tiny_llama), toy_sentiment(16), None, adapters.TrainConfig(mixed_precision="no"))
    assert "dtype='float32'" in caplog.text  # a bf16 base with autocast off: said, with the fix


def _loss_and_grads(model, autocast: bool):
    model.train()
    model.zero_grad()
    batch = model.base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    torch.manual_seed(0)  # the head's dropout: the same masks on both sides
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch, labels=torch.tensor([1, 0, 0]))["loss"]
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("quantization", [None, "nf4", "int8"])
def test_bf16_logits_and_gradients_within_tolerance_of_fp32(tiny_llama, quantization):
    fp32 = _model(tiny_llama, quantization, "float32")
    bf16 = _model(tiny_llama, quantization, "bfloat16")
    with torch.no_grad():  # B = 0 at start would hide the adapter's share of the difference
        for a, b in zip(fp32.parameters(), bf16.parameters(), strict=True):
            if a.requires_grad:
                a.add_(0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel())))
                b.copy_(a)
    expected, got = fp32.logits(TEXTS), bf16.logits(TEXTS)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    loss32, grad32 = _loss_and_grads(fp32, autocast=False)
    loss16, grad16 = _loss_and_grads(bf16, autocast=True)
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.995


def test_a_bf16_artifact_serves_in_bf16_as_its_predict(tiny_llama, tmp_path, bf16_cpu):
    from adapters.serving.backbones import load_served

    model = _model(tiny_llama)
    adapters.train(model, toy_sentiment(16), None, adapters.TrainConfig(max_steps=2, batch_size=8))
    model.save_pretrained(tmp_path / "art")
    served = load_served({"art": tmp_path / "art"})["art"]
    assert served.group.model.base.compute_dtype == torch.bfloat16
    assert served.predict(TEXTS, probabilities=True) == model.predict(TEXTS, probabilities=True)


def test_resume_is_bit_identical_in_bf16(tiny_llama, tmp_path, bf16_cpu):
    def config(out, **extra):
        return adapters.TrainConfig(
            max_steps=6, batch_size=8, save_every=3, output_dir=str(out), progress=False, seed=0, **extra
        )

    whole = _model(tiny_llama, adapter=adapters.LoRA(r=4))  # with dropout: its masks are part of the state
    adapters.train(whole, toy_sentiment(48), None, config(tmp_path / "whole"))
    first = complete_checkpoints(tmp_path / "whole")[0]
    assert first.name == "step-000003"
    shutil.copytree(first, tmp_path / "cut" / first.name)
    resumed = _model(tiny_llama, adapter=adapters.LoRA(r=4))
    adapters.train(resumed, toy_sentiment(48), None, config(tmp_path / "cut", resume="auto"))
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
