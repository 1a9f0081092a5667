"""The learning-rate schedule and the optimizer's parameter groups."""

import math

import pytest
import torch

import adapters
from adapters.training.optim import build_optimizer, lr_schedule


def test_linear_warmup_then_linear_decay_to_zero():
    schedule = lr_schedule("linear", warmup=3, total=13)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert schedule(8) == pytest.approx(0.5)  # half-way through the decay
    assert schedule(13) == 0.0 and schedule(20) == 0.0  # never negative past the end


def test_cosine_and_constant():
    cosine = lr_schedule("cosine", warmup=0, total=10)
    assert cosine(0) == pytest.approx(1.0) and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert cosine(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    constant = lr_schedule("constant", warmup=2, total=10)
    assert [constant(s) for s in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_each_process_calls_the_schedule_once_per_step():
    """Accelerate's scheduler wrapper steps once per process: two processes, two calls per optimizer step."""
    one, two = lr_schedule("linear", 2, 10), lr_schedule("linear", 2, 10, calls_per_step=2)
    assert [two(c) for c in range(0, 20, 2)] == [one(s) for s in range(10)]
    assert two(5) == one(2)


def test_head_and_adapter_get_their_own_learning_rates(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["a", "b"]))
    optimizer = build_optimizer(model, adapters.TrainConfig(lr=1e-4, head_lr=1e-2, weight_decay=0.1))
    head, adapter = optimizer.param_groups
    assert head["lr"] == 1e-2 and adapter["lr"] == 1e-4 and head["weight_decay"] == adapter["weight_decay"] == 0.1
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert len(head["params"]) + len(adapter["params"]) == len(model.trainable_parameters())


@pytest.mark.parametrize("adapter", [adapters.LoRA(r=2), adapters.Bottleneck(placement="houlsby", reduction=8)])
def test_layer_lr_decay_gives_lower_blocks_lower_rates(tiny_llama, adapter):
    model = adapters.adapt(tiny_llama, adapter=adapter, head=adapters.Classification(labels=["a", "b"]))
    optimizer = build_optimizer(model, adapters.TrainConfig(lr=1e-3, head_lr=1e-2, layer_lr_decay=0.5))
    head, *blocks = optimizer.param_groups
    assert head["lr"] == 1e-2
    # the tiny model has 2 blocks: the top one at lr, the one below at lr * 0.5
    assert [(g["block"], g["lr"]) for g in blocks] == [(0, 5e-4), (1, 1e-3)]
    names = {id(p): n for n, p in model.named_parameters()}
    for group in blocks:
        assert all(f"layers.{group['block']}." in names[id(p)].replace("__", ".") for p in group["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(model.trainable_parameters())
    # the scheduler scales every group from its own rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule("constant", warmup=1, total=4))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-3, 2.5e-4, 5e-4])
    del scheduler


def test_layer_lr_decay_trains(tiny_llama, toy_data):
    """One run with decay: it learns; the top block's adapter moves more than the bottom one's."""
    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=2, dropout=0.0), head=adapters.Classification(labels=["neg", "pos"])
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    adapters.train(
        model,
        toy_data[0],
        config=adapters.TrainConfig(max_steps=6, batch_size=8, lr=1e-2, layer_lr_decay=0.1, progress=False),
    )
    moved = {n: (p.detach() - before[n]).abs().mean().item() for n, p in model.named_parameters() if n in before}
    bottom = [v for n, v in moved.items() if "layers.0." in n]
    top = [v for n, v in moved.items() if "layers.1." in n]
    assert sum(top) / len(top) > 3 * sum(bottom) / len(bottom) > 0


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), "0.9"])
def test_bad_layer_lr_decay(value):
    with pytest.raises(adapters.ConfigError, match="layer_lr_decay"):
        adapters.TrainConfig(layer_lr_decay=value)
