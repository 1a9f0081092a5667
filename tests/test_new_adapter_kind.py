"""Adding an adapter kind is one new class and one registry entry: the README's walk-through, run.

The kind below is (IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638: learned per-channel
scales of keys, values and feed-forward activations) through peft, written exactly as the README
shows. Nothing else in the library is touched: ``adapt``, ``train``, saving, loading, the YAML
loader and the memory estimate all take it through ``AdapterSpec``.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import adapters
from adapters import registry
from adapters.files import check_state, load_tensors
from adapters.methods.spec import AdapterSpec

from .helpers import toy_sentiment


@dataclass
class IA3(AdapterSpec):
    """(IA)^3 through peft: learned scales on the targets' outputs (inputs, for feed-forward ones)."""

    targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])
    kind: str = field(default="ia3", init=False)
    files: ClassVar[tuple[str, ...]] = ("adapter",)

    def attach(self, model) -> None:
        from peft import IA3Config, get_peft_model

        config = IA3Config(target_modules=self.targets, feedforward_modules=self.feedforward)
        model.adapter_state["peft"] = get_peft_model(model.backbone, config)

    def trained_state(self, model) -> dict:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model.adapter_state["peft"])

    def save(self, model, folder: Path) -> None:
        model.adapter_state["peft"].save_pretrained(folder / "adapter")

    def load(self, model, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        file = folder / "adapter" / "adapter_model.safetensors"
        tensors = load_tensors(file)
        check_state(tensors, self.trained_state(model), file)
        set_peft_model_state_dict(model.adapter_state["peft"], tensors)

    def describe(self) -> str:
        return "IA3"


@pytest.fixture
def registered(monkeypatch):
    """The one registry line: ``ADAPTERS = _by_kind(LoRA, Bottleneck, IA3)``."""
    monkeypatch.setitem(registry.ADAPTERS, "ia3", IA3)


def test_a_third_kind_trains_saves_and_reloads(registered, tiny_llama, tmp_path):
    model = adapters.adapt(tiny_llama, adapter=IA3(), head=adapters.Classification(labels=["neg", "pos"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("ia3_l" in n or n.startswith("head.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "ia3_l" in n}
    adapters.train(
        model, toy_sentiment(32), None, adapters.TrainConfig(max_steps=3, lr=1e-2, batch_size=8, progress=False)
    )
    assert any(not torch.equal(t, dict(model.named_parameters())[n]) for n, t in before.items())
    model.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art")
    texts = ["good fun film", "a dull and tedious mess"]
    assert isinstance(again.adapter, IA3) and torch.allclose(again.logits(texts), model.logits(texts), atol=1e-6)
    estimate = adapters.estimate_memory(tiny_llama, adapter=IA3(), batch_size=2, seq_len=16)
    assert estimate.settings["adapter"] == "IA3" and 0 < estimate.trainable_params < estimate.total_params


def test_a_third_kind_is_reachable_from_yaml(registered, tmp_path):
    import yaml

    from adapters.config.run_file import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "minilm-l6"},
                "adapter": {"kind": "ia3", "targets": ["query"]},
                "head": {"kind": "classification", "labels": ["a", "b"]},
                "data": {"train": "rotten_tomatoes"},
            }
        )
    )
    run = load_run_config(path)
    assert isinstance(run.adapter, IA3) and run.adapter.targets == ["query"]
