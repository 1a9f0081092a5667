"""The adapter kinds and head kinds, by the ``kind`` name saved in artifacts and YAML configs.

The one place that lists them: the YAML loader, the artifact reader and ``adapt``'s checks read
these tables. A new kind is one module (an ``AdapterSpec`` or ``HeadSpec`` subclass) and one line here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapters.errors import ConfigError
from adapters.heads import (
    CausalLM,
    Classification,
    HeadSpec,
    MultiLabel,
    MultipleChoice,
    Regression,
    TokenClassification,
)
from adapters.methods.bottleneck import Bottleneck
from adapters.methods.lora import LoRA
from adapters.methods.spec import AdapterSpec


def _by_kind(*classes: type[Any]) -> dict[str, type[Any]]:
    """Kind name -> class (the default of each dataclass's ``kind`` field)."""
    return {str(next(f.default for f in dataclasses.fields(cls) if f.name == "kind")): cls for cls in classes}


ADAPTERS: dict[str, type[AdapterSpec]] = _by_kind(LoRA, Bottleneck)
HEADS: dict[str, type[HeadSpec]] = _by_kind(
    Classification, MultiLabel, Regression, MultipleChoice, TokenClassification, CausalLM
)


def adapter_from_dict(data: dict[str, Any] | None) -> AdapterSpec | None:
    """``{"kind": "lora", "r": 8, ...}`` -> ``LoRA(r=8, ...)``; None (head only) stays None."""
    return None if data is None else _from_dict(data, ADAPTERS, "adapter")


def head_from_dict(data: dict[str, Any]) -> HeadSpec:
    """``{"kind": "classification", "labels": [...]}`` -> ``Classification(labels=[...])``."""
    head: HeadSpec = _from_dict(data, HEADS, "head")
    return head


def _from_dict(data: dict[str, Any], kinds: dict[str, type[Any]], what: str) -> Any:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in kinds:
        raise ConfigError(
            f"unknown {what} kind {kind!r}; known: {sorted(kinds)} (was it written by a newer qadapters?)"
        )
    return kinds[kind](**data)
