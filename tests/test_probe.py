"""The linear probe (LP-FT): the loss it fits is the model's own loss, it reaches that loss's minimum,
and training with ``linear_probe=True`` starts from the fitted head."""

import pytest
import torch
from accelerate import Accelerator

import adapters
from adapters.data.encoding import encode_dataset
from adapters.errors import ConfigError
from adapters.training.loaders import inference_loader
from adapters.training.probe import PROBE_L2, fit_head

from .helpers import choice_rows, long_rows, multilabel_rows, regression_rows, tag_rows, toy_sentiment

HEADS = {
    "classification": (
        lambda: adapters.Classification(labels=["neg", "pos"], class_weights=[2.0, 1.0], label_smoothing=0.1),
        lambda: toy_sentiment(24),
    ),
    "windows mean": (
        lambda: adapters.Classification(labels=["neg", "pos"], long_text="windows", window_overlap=4),
        lambda: long_rows(12, filler=30),
    ),
    "windows max": (
        lambda: adapters.Classification(
            labels=["neg", "pos"], long_text="windows", window_overlap=4, window_pooling="max"
        ),
        lambda: long_rows(12, filler=30),
    ),
    "multi-label": (lambda: adapters.MultiLabel(labels=["pos", "neg"]), lambda: multilabel_rows(24)),
    "regression": (lambda: adapters.Regression(), lambda: regression_rows(24)),
    "multiple choice": (lambda: adapters.MultipleChoice(num_choices=3), lambda: choice_rows(12)),
}


def _model_and_loader(path, head, rows):
    model = adapters.adapt(path, adapter=adapters.LoRA(r=4), head=head, max_length=16)
    encoded = encode_dataset(rows, model.tokenizer, model.head_spec, "text", "label", model.max_length, "rows")
    return model, inference_loader(model, encoded, rows=5)  # several batches of different lengths


def _model_loss(model, loader) -> float:
    """The mean loss per row of the model's own forward over ``loader``."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            total += float(model(**batch)["loss"]) * len(batch["labels"])
            count += len(batch["labels"])
    return total / count


@pytest.mark.parametrize("kind", list(HEADS))
def test_the_probe_fits_the_models_own_loss_to_its_minimum(tiny_llama, tiny_bert, kind):
    make_head, make_rows = HEADS[kind]
    for path in (tiny_llama, tiny_bert):
        model, loader = _model_and_loader(path, make_head(), make_rows())
        before = _model_loss(model, loader)
        adapter_before = {n: p.clone() for n, p in model.named_parameters() if "lora" in n}
        result = fit_head(model, loader, Accelerator(cpu=True))
        # the cached replay (windows pooled, choices regrouped, class weights, smoothing) is the forward's loss
        assert result["probe_loss_before"] == pytest.approx(before, rel=1e-4)
        assert result["probe_loss_after"] == pytest.approx(_model_loss(model, loader), rel=1e-4)
        assert result["probe_loss_after"] < before
        assert all(torch.equal(p, adapter_before[n]) for n, p in model.named_parameters() if "lora" in n)
        if kind == "windows max":  # a max over windows has kinks, where a minimum has no zero gradient
            continue
        # a minimum: the penalised loss, through the real forward, has no gradient left on the head
        model.zero_grad()
        weight = model.head.score.weight
        for batch in loader:
            (model(**batch)["loss"] * len(batch["labels"]) / result["probe_rows"]).backward()
        std = torch.cat(_features(model, loader)).std(0)
        # the penalty is on the standardized weights (w * std): its gradient in w is 2 * l2 * w * std^2
        gradient = weight.grad + 2 * PROBE_L2 * weight.detach() * std**2
        assert gradient.abs().max() < 1e-3, kind
        assert model.head.score.bias.grad.abs().max() < 1e-3, kind


def _features(model, loader) -> list[torch.Tensor]:
    seen = []
    hook = model.head.score.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for batch in loader:
            model(**batch)
    hook.remove()
    return seen


def test_training_with_a_probe_starts_from_the_fitted_head(tiny_llama):
    rows = toy_sentiment(48)
    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4),
        head=adapters.Classification(labels=["neg", "pos"]),
        max_length=16,
        seed=0,
    )
    result = adapters.train(
        model, rows, rows[:16], adapters.TrainConfig(epochs=1, batch_size=8, linear_probe=True, progress=False)
    )
    assert result["probe_rows"] == 48 and result["probe_loss_after"] < result["probe_loss_before"]
    assert result["probe_seconds"] > 0
    plain = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4),
        head=adapters.Classification(labels=["neg", "pos"]),
        max_length=16,
        seed=0,
    )
    baseline = adapters.train(plain, rows, rows[:16], adapters.TrainConfig(epochs=1, batch_size=8, progress=False))
    assert "probe_rows" not in baseline
    assert result["eval_loss"] < baseline["eval_loss"]  # a fitted head, then training, beats a random head's start


def test_a_resumed_run_does_not_probe_again(tiny_llama, tmp_path):
    rows = toy_sentiment(32)
    config = dict(
        epochs=2, batch_size=8, linear_probe=True, progress=False, output_dir=str(tmp_path / "run"), save_every=2
    )
    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), max_length=16
    )
    adapters.train(model, rows, config=adapters.TrainConfig(max_steps=4, **config))
    again = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), max_length=16
    )
    result = adapters.train(again, rows, config=adapters.TrainConfig(resume="auto", **config))
    assert "probe_rows" not in result and result["steps"] == 8


@pytest.mark.parametrize(
    "head, rows",
    [
        (adapters.TokenClassification(labels=["O", "B-POS", "B-NEG"]), tag_rows(8)),
        (adapters.MultipleChoice(num_choices=3, scoring="likelihood"), choice_rows(8)),
    ],
)
def test_a_head_without_a_pooled_linear_layer_is_refused_before_training(tied_llama, head, rows, tmp_path):
    model = adapters.adapt(tied_llama, adapter=adapters.LoRA(r=4), head=head, max_length=16)
    with pytest.raises(ConfigError, match="linear_probe=True fits a linear head"):
        adapters.train(model, rows, config=adapters.TrainConfig(linear_probe=True, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # refused before any work
