"""What an adapter kind is: a settings dataclass that knows how to attach, save, load and describe itself.

Every kind (``LoRA`` in ``lora.py``, ``Bottleneck`` in ``bottleneck.py``) subclasses ``AdapterSpec``, an
abstract base class: a kind that misses one of the abstract methods cannot be built (``TypeError``),
and is listed once in ``registry.ADAPTERS``; nothing else in the library asks which kind it holds.
An ``AdaptedModel`` calls ``attach`` once, on its frozen backbone; the artifact code calls ``save`` /
``load``; the memory estimate builds the same model on the meta device through the same ``attach``.

Adding a kind: a new module with a dataclass ``class MyAdapter(AdapterSpec)`` (a ``kind`` field, its
settings, the methods below) and one line in ``registry.py``. The README's architecture section
walks through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel


class Adaptable(Protocol):
    """What an adapter kind may use of the model it is attached to (an ``AdaptedModel``; declared here
    because the model layer is above this one)."""

    @property
    def backbone(self) -> nn.Module:
        """The frozen pretrained network; a kind may put its layers inside it."""

    adapter_layers: nn.Module | None
    """Modules a kind keeps outside the backbone (registered, so they move and save with the model)."""
    adapter_state: dict[str, Any]
    """The kind's own bookkeeping (e.g. peft's wrapper); nothing but the kind reads it."""

    @property
    def base(self) -> Any:
        """What the backbone is (``BackboneInfo``: source, location, quantization, compute dtype, tokenizer)."""


class AdapterSpec(ABC):
    """The interface of an adapter kind's settings (subclasses are dataclasses with a ``kind`` field)."""

    kind: str
    files: ClassVar[tuple[str, ...]] = ()
    """The entries ``save`` writes into an artifact folder (re-saving replaces exactly these)."""

    @abstractmethod
    def attach(self, model: Adaptable) -> None:
        """Add this adapter to ``model.backbone`` (frozen): wrap it, or set ``model.adapter_layers`` to a
        module holding new layers hooked into it. Only the new parameters require gradients."""
        raise NotImplementedError

    @abstractmethod
    def trained_state(self, model: Adaptable) -> dict[str, torch.Tensor]:
        """The adapter's trained tensors in ``model``, by the names ``save`` writes them under."""
        raise NotImplementedError

    @abstractmethod
    def save(self, model: Adaptable, folder: Path) -> None:
        """Write the adapter's trained tensors (and whatever else its format needs) into artifact ``folder``."""
        raise NotImplementedError

    @abstractmethod
    def load(self, model: Adaptable, folder: Path) -> None:
        """Read what ``save`` wrote into ``model`` (built with this spec); a ``CheckpointError`` when the
        files are missing, corrupt or do not fit."""
        raise NotImplementedError

    def module_path(self, parameter_name: str) -> str:
        """The dotted module path a trained parameter's name (in ``AdaptedModel.named_parameters``) stands
        for, so that per-block settings (``layer_lr_decay``) find its block; names are paths already
        unless the kind spells them otherwise."""
        return parameter_name

    def check_load(self, quantization: str | None, fsdp: bool) -> None:
        """Refuse, before the base loads, a ``quantization`` or sharded load (``fsdp``) this kind cannot start
        on (a ``ConfigError``)."""
        return None  # every load, unless a kind says otherwise

    def as_saved(self) -> AdapterSpec:
        """The settings an artifact records for these weights: these, unless saving converts them (LoRA's
        PiSSA/OLoRA become a plain LoRA of twice the rank on the unchanged base)."""
        return self

    def initialize(self, model: Adaptable) -> None:
        """Start the trained weights from the loaded base where the kind's init reads it (LoRA's LoftQ);
        ``adapt`` calls it once after ``attach``, ``load`` never (the saved weights replace any start)."""
        return None  # attach's own start, unless a kind reads the base

    def initialize_bytes(self, linears: list[tuple[int, int]]) -> int:
        """Bytes ``initialize`` holds for a moment on top of the adapted model, for the adapted linears of
        ``(out_features, in_features)``: the memory estimate's ``init`` peak. None by default."""
        return 0

    def starts_from_data(self) -> bool:
        """Whether ``train`` should hand the first training rows to ``initialize_from_data`` (LoRA's EVA)."""
        return False

    def initialize_from_data(self, model: Adaptable, batches: list[dict[str, torch.Tensor]]) -> None:
        """Start the trained weights from the layer inputs of ``batches`` (``input_ids``, ``attention_mask``);
        ``train`` calls it once, on a fresh run, before any sharding."""
        return None

    def describe(self) -> str:
        """One short line for tables and logs, e.g. ``"LoRA r=8"``."""
        return type(self).__name__

    def merge_refusal(self) -> str | None:
        """Why this kind cannot be folded into the base weights (None: it can, through ``merge``)."""
        return "this adapter kind has no merge"

    def merge(self, network: PreTrainedModel, folder: Path) -> PreTrainedModel:
        """``network`` with the adapter saved in artifact ``folder`` folded into its weights."""
        raise NotImplementedError

    # --- serving several artifacts on one base (``serving/backbones.py``) ------------------------------------------

    def handle(self, model: Adaptable) -> Any:
        """What ``switch`` needs to turn on or off this adapter as ``attach`` put it in ``model``."""
        return None

    def can_join(self, model: Adaptable) -> bool:
        """Whether another artifact of this kind can be added to ``model``'s (shared) backbone."""
        return False

    def join(self, model: Adaptable, folder: Path, name: str) -> Any:
        """Add this kind's adapter saved in artifact ``folder`` to ``model``'s backbone, beside the adapters
        already there, switched off; return its handle."""
        raise NotImplementedError

    def switch(self, model: Adaptable, handle: Any, on: bool) -> None:
        """Turn the adapter ``handle`` on or off in ``model`` (all are turned off before one is turned on)."""
        raise NotImplementedError

    def leave(self, model: Adaptable, handle: Any) -> None:
        """Remove the adapter ``handle`` that ``join`` added from ``model``'s backbone (a server unloading it)."""
        raise NotImplementedError

    def route(self, model: Adaptable, rows: list[tuple[Any, torch.Tensor]]) -> AbstractContextManager[None]:
        """While the context is open, ``model``'s forward applies each adapter ``handle`` of this kind only to
        the batch rows its boolean mask selects (``rows``: every adapter of this kind on the shared backbone,
        each with its mask; a row no mask selects computes as the base): one forward serves a batch that
        mixes artifacts (``serving/scheduler.py``)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The settings as saved in ``qadapters.json`` and YAML configs (with ``kind``)."""
        return asdict(self)  # type: ignore[call-overload]  # every kind is a dataclass
