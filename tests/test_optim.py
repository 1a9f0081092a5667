"""The learning-rate schedule and the optimizer's parameter groups."""

import math

import pytest

import adapters
from adapters.optim import build_optimizer, lr_schedule


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
