"""The contract every adapter kind and head kind keeps, run over ``registry.ADAPTERS x registry.HEADS``
(as peft's ``PeftCommonTester`` runs every method over its ``TEST_CASES``): only the adapter and the head
train; a save -> load round trip gives the same outputs; the memory estimate builds the same model
(same trainable parameter count); merging works or refuses with the kind's own reason; serving shares
one backbone between two artifacts of a kind that can join, each answering as it does alone. A kind
that leaves out a declared method cannot be built."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import adapters
from adapters import registry
from adapters.artifacts.merge import merge_artifact
from adapters.heads import HeadSpec
from adapters.methods.spec import AdapterSpec

from .helpers import HEAD_EXAMPLES, example_inputs

ADAPTER_KINDS = sorted(registry.ADAPTERS)
HEAD_KINDS = sorted(registry.HEADS)


def _adapter(kind: str) -> AdapterSpec:
    cls = registry.ADAPTERS[kind]
    return cls(**({"r": 4, "dropout": 0.0} if kind == "lora" else {}))


def _trained(path: str, adapter_kind: str | None, head_kind: str, quantization: str | None = "nf4"):
    make_head, make_rows = HEAD_EXAMPLES[head_kind]
    adapter = _adapter(adapter_kind) if adapter_kind else None
    model = adapters.adapt(path, adapter=adapter, head=make_head(), quantization=quantization, max_length=32)
    config = adapters.TrainConfig(max_steps=2, lr=5e-2, batch_size=8, progress=False)
    adapters.train(model, make_rows(16), None, config)
    return model, example_inputs(make_rows(4, seed=1))


def _outputs(model, inputs) -> list[torch.Tensor]:
    logits = model.logits(inputs)
    return list(logits) if isinstance(logits, list) else [logits]


def test_every_registered_kind_has_an_example():
    assert set(HEAD_EXAMPLES) == set(registry.HEADS), "add an example of the new head kind to helpers.HEAD_EXAMPLES"


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
@pytest.mark.parametrize("adapter_kind", ADAPTER_KINDS)
def test_only_the_adapter_and_head_train_and_the_round_trip_is_exact(tiny_llama, adapter_kind, head_kind, tmp_path):
    model, inputs = _trained(tiny_llama, adapter_kind, head_kind)
    trained = {p.data_ptr() for p in model.trainable_parameters()}
    declared = {t.data_ptr() for t in model.adapter.trained_state(model).values()}
    declared |= {p.data_ptr() for p in model.head.parameters() if p.requires_grad}
    assert trained == declared and declared  # nothing of the backbone trains, all the adapter does
    model.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art")
    for before, after in zip(_outputs(model, inputs), _outputs(again, inputs), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
@pytest.mark.parametrize("adapter_kind", ADAPTER_KINDS)
def test_the_memory_estimate_builds_the_same_model(tiny_llama, adapter_kind, head_kind):
    make_head = HEAD_EXAMPLES[head_kind][0]
    estimate = adapters.estimate_memory(
        tiny_llama, adapter=_adapter(adapter_kind), head=make_head(), batch_size=2, seq_len=16
    )
    real = adapters.adapt(tiny_llama, adapter=_adapter(adapter_kind), head=make_head())
    assert estimate.trainable_params == real.parameter_counts()["trainable"] > 0
    assert estimate.activations > 0 and estimate.total > estimate.trainable


@pytest.mark.parametrize("adapter_kind", ADAPTER_KINDS)
def test_merging_works_or_refuses_with_the_kinds_reason(tiny_llama, adapter_kind, tmp_path):
    model, inputs = _trained(tiny_llama, adapter_kind, "classification", quantization=None)
    model.save_pretrained(tmp_path / "art")
    refusal = model.adapter.merge_refusal()
    if refusal is not None:
        with pytest.raises(adapters.ConfigError, match="cannot be merged"):
            merge_artifact(tmp_path / "art", tmp_path / "merged", log=lambda *_: None)
        assert not (tmp_path / "merged").exists()
        return
    merge_artifact(tmp_path / "art", tmp_path / "merged", log=lambda *_: None)
    merged = adapters.load(tmp_path / "merged")
    assert merged.adapter is None
    torch.testing.assert_close(merged.logits(inputs), model.logits(inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapter_kind", ADAPTER_KINDS)
def test_serving_shares_one_backbone_between_two_artifacts(tiny_llama, adapter_kind, tmp_path):
    from adapters.serving.server import load_served

    alone = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model, inputs = _trained(tiny_llama, adapter_kind, "classification")
        model.save_pretrained(tmp_path / name)
        alone[name] = model.predict(inputs, probabilities=True)
    served = load_served({"a": tmp_path / "a", "b": tmp_path / "b"})
    if not _adapter(adapter_kind).can_join(served["a"].group.model):
        assert served["a"].group is not served["b"].group
        return
    assert served["a"].group is served["b"].group  # one backbone loaded
    for name in ("b", "a", "b"):  # switching back and forth
        got = served[name].predict(inputs, probabilities=True)
        assert [label for label, _ in got] == [label for label, _ in alone[name]]
        for (_, p), (_, q) in zip(got, alone[name], strict=True):
            assert p == pytest.approx(q, abs=1e-5)


@dataclass
class _NoLoad(AdapterSpec):
    """An adapter kind that forgot ``load``."""

    kind: str = field(default="no_load", init=False)

    def attach(self, model) -> None: ...

    def trained_state(self, model) -> dict:
        return {}

    def save(self, model, folder) -> None: ...


@dataclass
class _NoLoss(HeadSpec):
    """A head kind that forgot ``loss``."""

    kind: str = field(default="no_loss", init=False)

    def build(self, hidden_size, is_decoder):
        return torch.nn.Linear(hidden_size, 1)

    def target(self, value):
        return float(value)

    def metrics(self, *outputs):
        return {}


@pytest.mark.parametrize(("incomplete", "missing"), [(_NoLoad, "load"), (_NoLoss, "loss")])
def test_a_kind_missing_a_declared_method_cannot_be_built(incomplete, missing):
    with pytest.raises(TypeError, match=f"abstract method.*{missing}"):
        incomplete()
