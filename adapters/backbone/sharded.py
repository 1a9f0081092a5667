"""Reading and writing the parameters of a model that FSDP2 sharded (``sharding/fsdp.py`` shards it).

After ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` whose local part is this
rank's 1/N slice. The trained part of an adapted model (adapter and head) is small, so what must leave the
run whole (an artifact, a checkpoint) is gathered on every rank (``DTensor.full_tensor`` is a collective)
and what comes back (a checkpoint's weights) is scattered again. The frozen base is never gathered here.
Unsharded models pass through all of it unchanged, so callers need not branch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support: nothing is ever sharded
        return None
    return DTensor


_DTENSOR = _dtensor_type()  # once: ``_sharded`` runs for every parameter of every ``logits`` call


def _sharded(tensor: torch.Tensor) -> Any:
    """``tensor`` when it is a DTensor (a shard of a whole one), else None."""
    return tensor if _DTENSOR is not None and isinstance(tensor, _DTENSOR) else None


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 sharded it)."""
    return any(_sharded(p) is not None for p in model.parameters())


def _reshard(model: nn.Module) -> None:
    """Put every FSDP module back in its sharded state: after a forward without backward (evaluation) the
    root keeps its gathered parameters registered, whose storage FSDP frees later; read them then and you
    read freed memory."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def inference_context(model: nn.Module) -> Any:
    """``torch.inference_mode()``, or ``torch.no_grad()`` for a sharded model: FSDP allocates a block's
    gathered parameters at its first forward and reuses them; made under inference mode, they would be
    inference tensors that a later training step cannot use."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, as contiguous CPU tensors (a collective when sharded: call it on
    every rank)."""
    _reshard(model)
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            shard = _sharded(param)
            whole = param if shard is None else shard.full_tensor()
            state[name] = whole.detach().to("cpu", copy=True).contiguous()  # a copy, never a view
    return state


@contextmanager
def whole_trainables(model: nn.Module) -> Iterator[None]:
    """Within the block, the trainable parameters are whole plain tensors (gathered on every rank), so code
    written for an unsharded model (peft's state dict, ``safetensors``) reads them as usual; the sharded
    ones are put back on exit. The frozen base stays sharded."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    _reshard(model)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            shard = None if param is None or not param.requires_grad else _sharded(param)
            if shard is not None:
                swapped.append((module, name, shard))
                module._parameters[name] = nn.Parameter(shard.full_tensor().detach(), requires_grad=True)
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def load_trainable_state(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors (a checkpoint's) into ``model``'s trainable parameters, each rank keeping its own
    slice of a sharded one."""
    _reshard(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in weights:
                continue
            value = weights[name].to(device=param.device, dtype=param.dtype)
            shard = _sharded(param)
            if shard is not None:
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, shard.device_mesh, shard.placements)
            param.copy_(value)


def local_bytes(model: nn.Module, trainable: bool = False) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole model) of the frozen parameters (``trainable``: of the
    trained ones)."""
    here = whole = 0
    for param in model.parameters():
        if param.requires_grad != trainable:
            continue
        size = param.element_size()
        whole += param.numel() * size
        shard = _sharded(param)
        local = param if shard is None else shard.to_local()
        here += local.numel() * size
    return here, whole
