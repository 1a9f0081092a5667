"""Regional torch.compile (training/compiled.py): every block compiled, and training and logits equal to the
eager model's (up to floating-point reassociation in inductor's fused kernels)."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.training.compiled import compile_blocks

from .helpers import toy_sentiment

TEXTS = ["good fun film", "a dull and tedious mess", "the acting was not very good"]


def _trained(path, compile: bool):
    torch._dynamo.reset()
    model = adapters.adapt(
        path, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), quantization="nf4"
    )
    config = adapters.TrainConfig(max_steps=3, batch_size=8, lr=1e-2, seed=0, progress=False, compile=compile)
    result = adapters.train(model, toy_sentiment(24), None, config)
    return model, result


@pytest.mark.slow  # inductor compiles C++ for the block: about half a minute on 2 cores
def test_compiled_blocks_train_and_predict_as_eager(tiny_llama):
    eager, eager_result = _trained(tiny_llama, compile=False)
    compiled, compiled_result = _trained(tiny_llama, compile=True)
    stack = compiled.backbone.layers
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in stack)
    assert abs(compiled_result["train_loss"] - eager_result["train_loss"]) < 1e-4
    trained = {n: p for n, p in compiled.named_parameters() if p.requires_grad}
    for name, param in eager.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(trained[name], param, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled.logits(TEXTS), eager.logits(TEXTS), atol=1e-4, rtol=1e-4)


def test_compile_blocks_wraps_each_block_once(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["a", "b"]))
    report = compile_blocks(model.backbone)
    assert report.blocks == len(model.backbone.layers) and report.block_class == "LlamaDecoderLayer"
    first = model.backbone.layers[0]._compiled_call_impl
    compile_blocks(model.backbone)  # again: the same wrappers, not a compile of the compiled
    assert model.backbone.layers[0]._compiled_call_impl is first
    assert "regional" in report.summary()
