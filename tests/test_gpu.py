"""The GPU path (``pytest -m gpu``): quantized bases on CUDA in bf16, training for every head kind,
exact reloads, CPU <-> GPU artifacts, 8-bit optimizers, checkpointing and auto batch size.

These tests skip without CUDA. ``QADAPTERS_GPU_DRY_RUN=1`` runs them on the CPU with the tiny test
model instead of the packaged SmolLM2 (``benchmarks/gpu_check.py --dry-run`` does), so the code a
GPU run executes has run before a GPU is in hand. Tolerances are stated where bf16 enters.
"""

from __future__ import annotations

import os

import pytest
import torch

import adapters

from .helpers import choice_rows, multilabel_rows, regression_rows, tag_rows, toy_sentiment

CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("QADAPTERS_GPU_DRY_RUN") == "1"
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (CUDA or DRY_RUN), reason="no CUDA device")]


@pytest.fixture(scope="module")
def base(tiny_llama) -> str:
    """The packaged SmolLM2 on a GPU; the tiny Llama in a CPU dry run."""
    return "smollm2-135m" if CUDA else tiny_llama


def _adapt(base, adapter=None, head=None, quantization="nf4", **kw):
    return adapters.adapt(
        base,
        adapter=adapter,
        head=head or adapters.Classification(labels=["neg", "pos"]),
        quantization=quantization,
        device=DEVICE,
        max_length=64,
        **kw,
    )


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_quantized_base_loads_on_the_device_in_the_compute_dtype(base, quantization):
    import bitsandbytes as bnb

    model = _adapt(base, adapters.LoRA(r=8), quantization=quantization)
    layer = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    quantized = [m for m in model.backbone.modules() if isinstance(m, layer)]
    assert quantized and all(m.weight.device.type == DEVICE for m in quantized)
    want = torch.bfloat16 if CUDA else torch.float32
    assert model.base.compute_dtype == want
    # no blanket fp32 upcast on a GPU: embeddings and norms stay in the compute dtype, so the
    # activations between blocks are bf16 (the trainable adapter and head keep fp32 master weights)
    frozen = {p.dtype for p in model.backbone.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen <= {want}, frozen
    logits = model.logits(["a good film", "a dull mess"])
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def _causal_rows(n, seed=0):
    return [{"text": r["text"] + " ->", "label": " " + r["label"]} for r in toy_sentiment(n, seed)]


HEADS = {
    "classification": (lambda: adapters.Classification(labels=["neg", "pos"]), toy_sentiment),
    "multi_label": (lambda: adapters.MultiLabel(labels=["pos", "neg"]), multilabel_rows),
    "regression": (lambda: adapters.Regression(), regression_rows),
    "multiple_choice": (lambda: adapters.MultipleChoice(num_choices=3), choice_rows),
    "token_classification": (lambda: adapters.TokenClassification(labels=["O", "B-POS", "B-NEG"]), tag_rows),
    "causal_lm": (lambda: adapters.CausalLM(max_new_tokens=2), _causal_rows),
}


@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_training_lowers_the_loss_for_every_head(base, kind, adapter):
    make_head, make_rows = HEADS[kind]
    spec = adapters.LoRA(r=8) if adapter == "lora" else adapters.Bottleneck(placement="pfeiffer")
    model = _adapt(base, spec, make_head())
    rows = make_rows(32)
    before = adapters.evaluate(model, rows)["eval_loss"]
    adapters.train(
        model,
        rows,
        None,
        adapters.TrainConfig(epochs=6, lr=2e-3, head_lr=1e-2, batch_size=16, warmup_ratio=0.0, progress=False),
    )
    after = adapters.evaluate(model, rows)["eval_loss"]
    assert after < 0.9 * before, (before, after)


def _trained(base, device=DEVICE, steps=8):
    model = adapters.adapt(
        base,
        adapter=adapters.LoRA(r=8),
        head=adapters.Classification(labels=["neg", "pos"]),
        quantization="nf4",
        device=device,
        max_length=64,
    )
    adapters.train(
        model,
        toy_sentiment(64),
        None,
        adapters.TrainConfig(max_steps=steps, lr=5e-3, head_lr=2e-2, batch_size=16, progress=False),
    )
    return model


TEXTS = [r["text"] for r in toy_sentiment(40, seed=3)]


def test_save_load_on_the_device_gives_the_same_logits(base, tmp_path):
    model = _trained(base)
    model.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art", device=DEVICE)
    # the same weights through the same kernels: identical up to bf16 rounding of the head input
    assert torch.allclose(model.logits(TEXTS), again.logits(TEXTS), atol=1e-3, rtol=0)


def test_cpu_artifact_predicts_the_same_labels_on_the_device_and_back(base, tmp_path):
    cpu_model = _trained(base, device="cpu")
    cpu_model.save_pretrained(tmp_path / "cpu")
    on_device = adapters.load(tmp_path / "cpu", device=DEVICE)
    cpu_logits, device_logits = cpu_model.logits(TEXTS), on_device.logits(TEXTS)
    # fp32 on CPU vs bf16 on the GPU: logits move by the rounding of 30 bf16 blocks. Labels must agree
    # wherever the CPU's margin exceeds twice the largest move, and most texts must be that clear.
    moved = float((cpu_logits - device_logits).abs().max())
    assert moved < 0.5, moved
    clear = (cpu_logits[:, 1] - cpu_logits[:, 0]).abs() > 2 * moved
    assert clear.sum() >= len(TEXTS) // 2, (moved, clear.sum())
    assert torch.equal(cpu_logits[clear].argmax(-1), device_logits[clear].argmax(-1))
    on_device.save_pretrained(tmp_path / "back")
    back = adapters.load(tmp_path / "back", device="cpu")
    assert torch.allclose(back.logits(TEXTS), cpu_logits, atol=1e-5)  # the weights made the round trip intact


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers(base, optimizer):
    model = _adapt(base, adapters.LoRA(r=8))
    config = adapters.TrainConfig(
        max_steps=6, lr=5e-3, head_lr=2e-2, batch_size=16, optimizer=optimizer, warmup_ratio=0.0, progress=False
    )
    if optimizer == "paged_adamw_8bit" and not CUDA:
        with pytest.raises(adapters.ConfigError, match="needs a GPU"):
            adapters.train(model, toy_sentiment(32), None, config)
        return
    rows = toy_sentiment(32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_before = adapters.evaluate(model, rows)["eval_loss"]
    adapters.train(model, rows, None, config)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert len(moved) == len(before)  # every trainable tensor took a step
    assert adapters.evaluate(model, rows)["eval_loss"] < loss_before


def test_gradient_checkpointing_gives_the_same_gradients(base):
    model = _adapt(base, adapters.LoRA(r=8, dropout=0.0), adapters.Classification(labels=["neg", "pos"], dropout=0.0))
    batch = model.encode([r["text"] for r in toy_sentiment(8)])
    labels = torch.tensor([0, 1] * 4, device=model.device)

    def grads(checkpointing: bool):
        if checkpointing:
            from adapters.backbone.loading import enable_checkpointing

            enable_checkpointing(model.backbone)
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            # lora_B starts at zero: move it so that the adapter's gradients flow through it
            torch.manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(std=0.02)
        model(**batch, labels=labels)["loss"].backward()
        out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        if checkpointing:
            model.backbone.gradient_checkpointing_disable()
        return out

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and plain
    # recomputation replays the same kernels on the same inputs; on a GPU the attention backward
    # accumulates with atomics, so bf16 sums may differ in their last bits
    tolerance = 1e-2 if CUDA else 1e-5
    for name in plain:
        scale = plain[name].norm().clamp(min=1e-12)
        assert (plain[name] - recomputed[name]).norm() / scale < tolerance, name


def test_auto_batch_size_fits_and_backs_off_on_out_of_memory(base, monkeypatch):
    from adapters.data.encoding import encode_dataset
    from adapters.training import batch_size as batch_size_module

    model = _adapt(base, adapters.LoRA(r=8))
    rows = toy_sentiment(64)
    encoded = encode_dataset(rows, model.tokenizer, model.head_spec, "text", "label", model.max_length, "train")
    config = adapters.TrainConfig(batch_size=16, grad_accum=2)
    b, accum, details = batch_size_module.choose_batch_size(model, encoded, config)
    assert b * accum == 32 and details["estimate_bytes"] <= batch_size_module.free_memory(model.device)
    # a real step at that size ran; now make every batch above 4 run out of memory
    real_step = batch_size_module._real_step

    def failing(model_, rows_, collator):
        if len(rows_) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (forced by the test)")
        return real_step(model_, rows_, collator)

    monkeypatch.setattr(batch_size_module, "_real_step", failing)
    b, accum, _ = batch_size_module.choose_batch_size(model, encoded, config)
    assert (b, accum) == (4, 8)
    metrics = adapters.train(
        model,
        rows,
        None,
        adapters.TrainConfig(max_steps=2, batch_size=16, grad_accum=2, auto_batch_size=True, progress=False),
    )
    assert metrics["batch_size"] == 4 and metrics["grad_accum"] == 8
