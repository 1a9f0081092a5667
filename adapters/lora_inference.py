"""A lean LoRA forward for inference: peft's numbers with less memory traffic.

For every call peft's LoRA linear layer computes ``base(x)``, a defensive copy of it (4-bit layers),
``A x``, ``B (A x)``, a multiplication by the scale and a new tensor for the sum: with a ``tokens x
out`` output that is about five passes over an output-sized tensor, and on a memory-bound CPU the
elementwise passes cost as much as the small matmuls. Without autograd none of the copies is
needed. This path computes ``A x`` once per group of layers that read the same tensor (q/k/v read
one normed hidden state, gate/up another: their ``A`` matrices are stacked into one ``(sum r) x in``
matmul, the idea of Unsloth's fused LoRA, https://github.com/unslothai/unsloth, here for
inference only) and adds ``scale * (A x) B^T`` into the base output in place with one ``addmm_``.

It runs only where it is exact: no gradient being recorded (``torch.no_grad``/``inference_mode``),
no autocast, eval mode, plain LoRA on a linear layer (no DoRA or other variant, no LoRA bias), not merged,
adapters enabled, no per-row ``adapter_names``. Anything else calls peft's own forward unchanged,
so training never takes this path. ``tests/test_lora_inference.py`` checks it against peft's
forward (fp32, NF4, int8; several adapters; switching; merged and DoRA fall-backs).
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn


def lean_inference(peft_model: nn.Module) -> int:
    """Give every peft LoRA linear layer of ``peft_model`` the lean inference forward (in place, once;
    idempotent). Layers that share an input are found at run time by identity; candidates are the
    layers of one parent module with the same input width. Returns how many layers were changed."""
    from peft.tuners.lora import LoraLayer

    slot: dict = {}  # one per model: the last input (by identity) and the stacked ``A x`` computed from it
    changed = 0
    for parent in peft_model.modules():
        layers = [m for m in parent.children() if isinstance(m, LoraLayer)
                  and isinstance(m.get_base_layer(), nn.Linear) and "forward" not in vars(m)]
        groups: dict[int, list[nn.Module]] = {}
        for layer in layers:
            groups.setdefault(layer.in_features, []).append(layer)
        for group in groups.values():
            for layer in group:
                # plain attributes, not submodules: a deepcopy of the model maps them to the copies
                layer._lean_slot, layer._lean_group = slot, group
                layer.forward = types.MethodType(_forward, layer)
                changed += 1
    return changed


def _lean_adapters(layer, x, args, kwargs) -> list[str] | None:
    """The active adapters when the lean path is exact for this call, else None (peft's forward)."""
    if (args or kwargs or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or layer.training
            or layer.merged or layer.disable_adapters):
        return None
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in layer.lora_variant or layer.lora_B[a].bias is not None for a in names):
        return None
    return names


def _forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = _lean_adapters(layer, x, args, kwargs)
    if names is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    if not names:
        return result
    result = result.contiguous()
    flat = result.view(-1, result.shape[-1])
    for name in names:
        low = _low_rank_input(layer, x, name)
        up = layer.lora_B[name].weight
        if up.dtype == flat.dtype:
            flat.addmm_(low, up.t(), alpha=layer.scaling[name])
        else:  # e.g. fp32 adapter on a bf16 base output: peft casts the update to the output's dtype
            flat.add_((low @ up.t()).to(flat.dtype), alpha=layer.scaling[name])
    return result


def _low_rank_input(layer, x: torch.Tensor, name: str) -> torch.Tensor:
    """``A x`` (tokens x r) for ``layer``'s adapter ``name``: a slice of the group's stacked product when
    another layer of the group already computed it from this very tensor, else computed for the group."""
    slot = layer._lean_slot
    source = slot.get("input")
    weight = layer.lora_A[name].weight
    if source is not None and source() is x and slot.get("adapter") == name and id(layer) in slot["offsets"]:
        start, stop, used, version = slot["offsets"][id(layer)]
        if used is weight and version == weight._version:  # not replaced or changed in place since
            return slot["product"][:, start:stop]
    members = [m for m in layer._lean_group if name in m.lora_A]
    weights = [m.lora_A[name].weight for m in members]
    if len({w.dtype for w in weights}) > 1:  # cannot stack: this layer alone
        weights, members = [weight], [layer]
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    product = x.reshape(-1, x.shape[-1]).to(stacked.dtype) @ stacked.t()
    offsets, start = {}, 0
    for member, each in zip(members, weights):
        offsets[id(member)] = (start, start + each.shape[0], each, each._version)
        start += each.shape[0]
    slot.clear()
    # the product lives as long as its input: freed with it once the group has run
    slot.update(input=weakref.ref(x, lambda _: slot.clear()), adapter=name, product=product, offsets=offsets)
    begin, end = offsets[id(layer)][:2]
    return product[:, begin:end]
