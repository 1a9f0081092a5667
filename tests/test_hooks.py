"""What Trainer users expect: compute_metrics, callbacks, report_to, loader options, quiet logs."""

import json

import numpy as np
import pytest

import adapters
from adapters.training.callbacks import Callback

from .helpers import toy_sentiment

LABELS = ["neg", "pos"]


def _model(tiny_llama):
    return adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=LABELS))


def test_compute_metrics_adds_to_the_heads_metrics(tiny_llama):
    seen = []

    def balanced_accuracy(prediction):
        seen.append(prediction)
        preds, labels = prediction.predictions.argmax(-1), prediction.label_ids
        return {"balanced_accuracy": float(np.mean([(preds[labels == c] == c).mean() for c in np.unique(labels)]))}

    model = _model(tiny_llama)
    rows, held_out = toy_sentiment(24), toy_sentiment(16, seed=1)
    result = adapters.train(
        model,
        rows,
        held_out,
        adapters.TrainConfig(max_steps=2, batch_size=8, progress=False),
        compute_metrics=balanced_accuracy,
    )
    assert seen[-1].predictions.shape == (16, 2) and seen[-1].label_ids.shape == (16,)
    assert 0 <= result["eval_balanced_accuracy"] <= 1 and "eval_accuracy" in result
    again = adapters.evaluate(model, held_out, compute_metrics=balanced_accuracy)
    assert again["eval_balanced_accuracy"] == pytest.approx(result["eval_balanced_accuracy"])
    with pytest.raises(adapters.ConfigError, match="computes already"):
        adapters.evaluate(model, held_out, compute_metrics=lambda p: {"accuracy": 1.0})
    with pytest.raises(adapters.ConfigError, match="dict of numbers"):
        adapters.evaluate(model, held_out, compute_metrics=lambda p: 0.5)


def test_callbacks_see_each_phase_and_can_stop_training(tiny_llama, tmp_path):
    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_train_begin(self, config, state, control):
            self.events.append(("begin", state.step))

        def on_log(self, config, state, control, logs):
            self.events.append(("log", state.step, round(logs["train_loss"], 6)))

        def on_evaluate(self, config, state, control, metrics):
            self.events.append(("evaluate", state.step, "eval_accuracy" in metrics))
            if state.step >= 4:
                control.should_stop = True

        def on_save(self, config, state, control, path):
            self.events.append(("save", state.step, path.name))

        def on_train_end(self, config, state, control, result):
            assert config.eval_every == 2  # the run's TrainConfig
            self.events.append(("end", result["steps"]))

    recorder = Recorder()
    config = adapters.TrainConfig(
        max_steps=20, batch_size=8, log_every=2, eval_every=2, save_every=2, output_dir=str(tmp_path), progress=False
    )
    result = adapters.train(
        _model(tiny_llama), toy_sentiment(48), toy_sentiment(8, seed=1), config, callbacks=[recorder]
    )
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "begin" and kinds[-1] == "end" and result["steps"] == 4  # stopped by the callback
    assert [e[1] for e in recorder.events if e[0] == "save"] == [2, 4]
    assert [e[1:] for e in recorder.events if e[0] == "evaluate"] == [(2, True), (4, True)]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in x]
    assert [(e[1], e[2]) for e in recorder.events if e[0] == "log"] == [
        (r["step"], round(r["train_loss"], 6)) for r in logged
    ]


def test_report_to_names_trackers_that_exist_and_are_installed(tmp_path, monkeypatch):
    import accelerate.utils

    with pytest.raises(adapters.ConfigError, match="name trackers among"):
        adapters.TrainConfig(report_to=["neptune"])
    # a tracker that is not installed is refused when the config is built, before any model loads
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(adapters.ConfigError, match="'wandb' is not installed"):
        adapters.TrainConfig(report_to=["wandb"])
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    assert adapters.TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    from adapters.training.tracking import trackers_for

    assert trackers_for(str(tmp_path), [])[0].name == "jsonl" and len(trackers_for(str(tmp_path), [])) == 1


def test_attention_implementation_is_used_and_recorded(tiny_llama, tmp_path):
    import torch

    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=LABELS), attn_implementation="eager"
    )
    assert model.backbone.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path / "art")
    assert json.loads((tmp_path / "art" / "qadapters.json").read_text())["load_options"] == {
        "attn_implementation": "eager"
    }
    again = adapters.load(tmp_path / "art")
    assert again.backbone.config._attn_implementation == "eager"
    texts = ["good fun film", "a dull mess"]
    assert torch.allclose(again.logits(texts), model.logits(texts), atol=1e-6)
    sdpa = adapters.load(tmp_path / "art", attn_implementation="sdpa")  # the same numbers either way
    assert torch.allclose(sdpa.logits(texts), model.logits(texts), atol=1e-5)


def test_custom_code_must_be_trusted_again_at_load(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    model.load_options = {"trust_remote_code": True}  # as adapt(..., trust_remote_code=True) records it
    model.save_pretrained(tmp_path / "art")
    with pytest.raises(adapters.ConfigError, match="pass trust_remote_code=True"):
        adapters.load(tmp_path / "art")
    assert adapters.load(tmp_path / "art", trust_remote_code=True).head_spec.labels == LABELS


def test_int8_says_its_input_cast_once(tiny_llama, caplog, monkeypatch):
    import logging

    monkeypatch.setattr(adapters, "_said", set())  # as in a fresh process: other tests may have said it

    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=LABELS), quantization="int8"
    )
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        model.logits(["good fun film"] * 3)
        model.logits(["a dull mess"])
    # bitsandbytes says it on every int8 layer of every forward; the library lets it through once
    assert sum("inputs will be cast" in r.getMessage() for r in caplog.records) == 1


def test_logs_name_the_base_rate_the_heads_rate_and_fractional_epochs(tiny_llama, tmp_path):
    config = adapters.TrainConfig(
        max_steps=3,
        batch_size=8,
        lr=5e-4,
        head_lr=5e-3,
        warmup_ratio=0.0,
        scheduler="constant",
        log_every=1,
        output_dir=str(tmp_path),
        progress=False,
    )
    result = adapters.train(_model(tiny_llama), toy_sentiment(48), None, config)  # 6 batches per epoch
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in x]
    assert [r["lr"] for r in logged] == pytest.approx([5e-4] * 3)  # the base rate, not the head's
    assert [r["head_lr"] for r in logged] == pytest.approx([5e-3] * 3)
    assert [r["epoch"] for r in logged] == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-4)
    assert result["epochs"] == pytest.approx(0.5)  # stopped mid-epoch: not 0
