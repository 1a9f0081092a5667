"""What a backbone's ``forward`` accepts, read from its signature once per model class: transformers renames
and adds arguments between versions (``past_key_values`` -> ``cache``) and between classes (a causal LM's
``logits_to_keep``, which a headless model lacks), so callers ask rather than assume."""

from __future__ import annotations

import inspect
from typing import Any

_TAKES: dict[tuple[type, str], bool] = {}


def takes(network: Any, argument: str) -> bool:
    """Whether the transformers model under ``network`` (a peft wrapper passes its arguments on) takes
    ``argument``."""
    inner = network.get_base_model() if hasattr(network, "get_base_model") else network
    key = (type(inner), argument)
    if key not in _TAKES:
        _TAKES[key] = argument in inspect.signature(type(inner).forward).parameters
    return _TAKES[key]
