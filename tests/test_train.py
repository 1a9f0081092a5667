"""The training loop: what changes, what stays frozen, reproducibility, metrics, bad data."""

import json
import math

import pytest
import torch

import adapters

from .helpers import toy_sentiment


def _snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("quantization", ["nf4", "int8", None])
def test_only_adapter_and_head_change(tiny_llama, toy_data, quantization):
    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4),
        head=adapters.Classification(labels=["neg", "pos"]),
        quantization=quantization,
    )
    before = _snapshot(model)
    adapters.train(model, toy_data[0], None, adapters.TrainConfig(max_steps=3, lr=1e-2, batch_size=8, progress=False))
    after = _snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "training changed nothing"
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    assert any(n.startswith("head.") for n in changed) and any("lora_B" in n for n in changed)
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # base bit-identical


def test_head_only_training(tiny_bert, toy_data):
    model = adapters.adapt(tiny_bert, adapter=None, head=adapters.Classification(labels=["neg", "pos"]))
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"head"}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    result = adapters.train(model, toy_data[0], None, adapters.TrainConfig(max_steps=2, batch_size=8, progress=False))
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"head.score.weight", "head.score.bias"}  # the base did not move, the head did
    assert result["steps"] == 2 and math.isfinite(result["train_loss"])


def test_training_learns_encoder_and_decoder(tiny_model, tmp_path):
    train_rows, eval_rows = toy_sentiment(128), toy_sentiment(32, seed=1)
    model = adapters.adapt(
        tiny_model, adapter=adapters.LoRA(r=8), head=adapters.Classification(labels=["neg", "pos"]), quantization="nf4"
    )
    untrained = adapters.evaluate(model, eval_rows)
    metrics = adapters.train(
        model,
        train_rows,
        eval_rows,
        adapters.TrainConfig(epochs=4, lr=1e-2, head_lr=3e-2, batch_size=16, output_dir=str(tmp_path), progress=False),
    )
    # held-out texts are new word combinations: well above chance (0.5), not memorised
    assert metrics["eval_accuracy"] >= 0.75 and metrics["eval_loss"] < untrained["eval_loss"]
    assert metrics["eval_count"] == len(eval_rows) and metrics["steps"] == 32 and metrics["world_size"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (
        "config" in records[0]
        and any("train_loss" in r for r in records)
        and any("eval_accuracy" in r for r in records)
    )
    assert adapters.evaluate(model, eval_rows)["eval_accuracy"] == metrics["eval_accuracy"]


def test_same_seed_same_weights(tiny_llama, toy_data):
    def run():
        model = adapters.adapt(
            tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"])
        )
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        adapters.train(
            model, toy_data[0], None, adapters.TrainConfig(max_steps=4, lr=1e-2, batch_size=8, progress=False)
        )
        return start, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    (start, a), (_, b) = run(), run()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], start[n]) for n in a)  # every trained tensor moved: training ran


def test_gradient_accumulation_and_integer_labels(tiny_llama):
    rows = [{"sentence": r["text"], "y": int(r["label"] == "pos")} for r in toy_sentiment(16)]
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    metrics = adapters.train(
        model,
        rows,
        rows,
        adapters.TrainConfig(
            epochs=1, batch_size=4, grad_accum=2, text_column="sentence", label_column="y", progress=False
        ),
    )
    assert metrics["steps"] == 2 and metrics["eval_count"] == 16


def test_left_and_right_padding_give_the_same_logits(tiny_llama):
    texts = ["good film", "a very boring and tedious movie", "fun"]
    right = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4),
        head=adapters.Classification(labels=["neg", "pos"]),
        padding_side="right",
    )
    left = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), padding_side="left"
    )
    assert right.tokenizer.padding_side == "right" and left.tokenizer.padding_side == "left"
    assert torch.allclose(right.logits(texts), left.logits(texts), atol=1e-5)
    assert not torch.equal(right.encode(texts)["attention_mask"], left.encode(texts)["attention_mask"])


def test_encoders_refuse_left_padding(tiny_bert):
    with pytest.raises(adapters.ConfigError, match="right"):
        adapters.adapt(
            tiny_bert, adapter=None, head=adapters.Classification(labels=["neg", "pos"]), padding_side="left"
        )


@pytest.mark.parametrize(
    "data,match",
    [
        ([], "empty"),
        ([{"text": "good", "label": "neutral"}], "row 1: label 'neutral' is not one of"),
        ([{"text": "good", "label": 5}], "out of range"),
        ([{"review": "good", "label": "pos"}], "no column 'text'"),
        ([{"text": 3, "label": "pos"}], "not text"),
    ],
)
def test_bad_data_is_a_clear_error(tiny_llama, data, match):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    with pytest.raises(adapters.DataError, match=match):
        adapters.train(model, data, None, adapters.TrainConfig(max_steps=1, progress=False))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0},
        {"batch_size": 0},
        {"epochs": 0},
        {"optimizer": "sgd"},
        {"scheduler": "step"},
        {"warmup_ratio": 1.0},
        {"mixed_precision": "fp8"},
        {"grad_accum": 0},
    ],
)
def test_bad_train_config(kwargs):
    with pytest.raises(adapters.ConfigError):
        adapters.TrainConfig(**kwargs)


def test_adamw_8bit_runs_on_cpu(tiny_llama, toy_data):
    import bitsandbytes as bnb

    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    adapters.train(model, toy_data[0], None, adapters.TrainConfig(max_steps=2, optimizer="adamw_8bit", progress=False))
    after = dict(model.named_parameters())
    moved = [n for n, t in before.items() if not torch.equal(t, after[n])]
    assert any("lora_B" in n for n in moved) and any(n.startswith("head.") for n in moved)
    from adapters.training.optim import build_optimizer

    assert isinstance(build_optimizer(model, adapters.TrainConfig(optimizer="adamw_8bit")), bnb.optim.AdamW8bit)


def test_predict_labels_and_probabilities(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    texts = ["good film", "bad", "a very boring plot"]
    logits = model.logits(texts)
    labels = model.predict(texts)
    assert labels == [["neg", "pos"][i] for i in logits.argmax(-1).tolist()]  # the argmax of the head's logits
    pairs = model.predict(texts, probabilities=True)
    for (label, probs), row in zip(pairs, logits.softmax(-1), strict=False):
        assert label == max(probs, key=probs.get) and abs(sum(probs.values()) - 1) < 1e-5
        assert probs == pytest.approx({"neg": float(row[0]), "pos": float(row[1])}, abs=1e-6)
    assert model.predict("good film") == labels[0]  # one input, one prediction
    assert "trainable params" in model.summary() and "nf4" in model.summary()


def test_bf16_autocast_stays_in_training(tiny_llama, toy_data, tmp_path):
    """Two failures first seen on an H200, reproduced on CPU with explicit bf16: autocast lingering on
    the trained model's forward (its logits then differed from its own reload's), and a second model
    trained in another precision in the same process being refused by Accelerate's global state."""
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    adapters.train(
        model,
        toy_data[0],
        None,
        adapters.TrainConfig(max_steps=2, batch_size=8, mixed_precision="bf16", progress=False),
    )
    model.save_pretrained(tmp_path / "art")
    texts = [r["text"] for r in toy_data[1]]
    assert torch.allclose(model.logits(texts), adapters.load(tmp_path / "art").logits(texts), atol=1e-6)
    other = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    metrics = adapters.train(
        other, toy_data[0], None, adapters.TrainConfig(max_steps=2, batch_size=8, mixed_precision="no", progress=False)
    )
    assert metrics["steps"] == 2


@pytest.mark.parametrize(
    "values",
    [
        {"lr": "abc"},
        {"lr": float("inf")},
        {"epochs": float("nan")},
        {"batch_size": 2.5},
        {"max_steps": True},
        {"packing": "yes"},
    ],
)
def test_config_types_are_checked(values):
    with pytest.raises(adapters.ConfigError, match=list(values)[0]):
        adapters.TrainConfig(**values)


def test_final_metrics_describe_the_final_weights(tiny_llama, toy_data):
    """max_steps stopping mid-epoch after an end-of-epoch evaluation: the final weights are evaluated."""
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    # 48 rows / 16 = 3 steps per epoch: the epoch ends (and evaluates) at step 3, training stops at 4
    metrics = adapters.train(
        model, toy_data[0], toy_data[1], adapters.TrainConfig(max_steps=4, lr=1e-2, batch_size=16, progress=False)
    )
    assert metrics["steps"] == 4
    assert metrics["eval_loss"] == pytest.approx(adapters.evaluate(model, toy_data[1])["eval_loss"], abs=1e-6)


def test_predict_refuses_keywords_the_head_cannot_use(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.Classification(labels=["neg", "pos"]))
    with pytest.raises(adapters.ConfigError, match="probabilites"):
        model.predict(["a good film"], probabilites=True)
