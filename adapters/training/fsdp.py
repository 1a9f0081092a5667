"""The optimizer of an FSDP-sharded model, saved and loaded whole (``sharding/fsdp.py`` shards the model)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def full_state_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Make ``optimizer.state_dict()``/``load_state_dict()`` read and write whole (unsharded) states, in
    place, through ``torch.distributed.checkpoint.state_dict``: a checkpoint then holds every rank's part,
    is written once and loads under any number of processes. Both are collectives, as Accelerate's
    ``save_state``/``load_state`` call them on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    base = type(optimizer)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state_dict(self: Any) -> dict[str, Any]:
        if self._inner_call:  # torch's helper reads the plain state through this same method
            return base.state_dict(self)
        self._inner_call = True
        try:
            return get_optimizer_state_dict(model, self, options=whole)
        finally:
            self._inner_call = False

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:  # torch's helper passes it by name
        if self._inner_call:
            base.load_state_dict(self, state_dict)
            return
        self._inner_call = True
        try:
            set_optimizer_state_dict(model, self, state_dict, options=StateDictOptions(full_state_dict=True))
        finally:
            self._inner_call = False

    optimizer.__class__ = type(
        f"FullState{base.__name__}", (base,), {"state_dict": state_dict, "load_state_dict": load_state_dict}
    )
    optimizer._inner_call = False  # type: ignore[attr-defined]
    return optimizer
