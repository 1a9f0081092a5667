"""A lean LoRA forward: peft's numbers and gradients with less memory traffic.

For every call peft's LoRA linear layer computes ``base(x)``, a defensive copy of it (4-bit layers),
``A x``, ``B (A x)``, a multiplication by the scale and a new tensor for the sum: about five passes
over an output-sized (tokens x out) tensor, and on a memory-bound CPU those elementwise passes cost
as much as the small matmuls; backward repeats them (the scale again, and one ``x``-sized gradient
per layer of a group, summed). This forward instead

* computes ``A x`` once per **group of layers that read the same tensor** (q/k/v read one normed
  hidden state, gate/up another): their ``A`` matrices are stacked into one ``(sum r) x in`` matmul,
  each layer takes its slice (the idea of Unsloth's fused LoRA kernels,
  https://github.com/unslothai/unsloth, in plain torch ops); in training the group's shared dropout
  (``SharedInputDropout`` below) hands every member the same dropped-out tensor, so the group is
  still found; with per-layer dropout (``LoRA(shared_dropout=False)``) each layer computes its own;
* adds ``scale * (A x) B^T`` to the base output with one ``addmm``: in place when no gradient is
  recorded (inference), out of place in training (autograd's own ``addmm`` backward, which folds the
  scale into its matmuls).

It runs only where it gives peft's result: plain LoRA on a linear layer (no DoRA or other variant,
no LoRA bias), not merged, adapters enabled, no per-row ``adapter_names``. Under bf16 autocast (training
on GPUs and bf16 CPUs) the two matmuls run in bf16 as peft's do there, the update added by the same
``addmm`` (one rounding where peft rounds the product, the scaled product and the sum). Anything else
calls peft's own forward unchanged.
``tests/test_lora_fused.py`` checks outputs and gradients against peft's forward (fp32, NF4, int8;
bf16 autocast; dropout; several adapters; merged and DoRA fall-backs).
"""

from __future__ import annotations

import contextvars
import types
import weakref

import torch
from torch import nn


def fuse_lora(peft_model: nn.Module) -> int:
    """Give every peft LoRA linear layer of ``peft_model`` the lean forward (in place, once;
    idempotent). Layers that share an input are found at run time by identity; candidates are the
    layers of one parent module with the same input width. Returns how many layers were changed."""
    from peft.tuners.lora import LoraLayer

    slot: dict = {}  # one per model: the last input (by identity) and the stacked ``A x`` computed from it
    changed = 0
    for parent in peft_model.modules():
        layers = [
            m
            for m in parent.children()
            if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), nn.Linear) and "forward" not in vars(m)
        ]
        groups: dict[int, list] = {}
        for layer in layers:
            groups.setdefault(layer.in_features, []).append(layer)  # type: ignore[arg-type]  # nn.Linear's
        for group in groups.values():
            for layer in group:
                # plain attributes, not submodules: a deepcopy of the model maps them to the copies
                layer._lean_slot, layer._lean_group = slot, group
                layer.forward = types.MethodType(_forward, layer)
                changed += 1
    return changed


def _names(segments: tuple[tuple[str, int, int], ...], rows: int) -> list[str]:
    """The runs as peft's per-row ``adapter_names`` (``"__base__"`` for rows in no run)."""
    names = ["__base__"] * rows
    for name, start, stop in segments:
        names[start:stop] = [name] * (stop - start)
    return names


def _lean_adapters(layer, x, args, kwargs) -> list[str] | None:
    """The active adapters when the lean path gives peft's result for this call, else None."""
    if args or kwargs or layer.merged or layer.disable_adapters:
        return None
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in layer.lora_variant or layer.lora_B[a].bias is not None for a in names):
        return None
    return names


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast: the memory estimate's meta device
        return False


ROW_SEGMENTS: contextvars.ContextVar[tuple[tuple[str, int, int], ...] | None] = contextvars.ContextVar(
    "qadapters_lora_row_segments", default=None
)
"""While set (``LoRA.route``, serving a batch that mixes adapters): ``(adapter, first row, end row)`` runs of
the batch's rows, each through its own adapter; rows in no run compute as the base."""


def _segmented(layer, x: torch.Tensor, segments: tuple[tuple[str, int, int], ...]) -> torch.Tensor | None:
    """A batch whose rows come in runs by adapter: the base output, then each run's low-rank update added in
    place to its own rows (contiguous views: no gather or scatter, unlike peft's per-row mixed forward, which
    this equals; ``tests/test_lora_fused.py``). None when this layer cannot take it (peft's forward then)."""
    if torch.is_grad_enabled() or layer.merged or x.dim() < 2:
        return None
    used = [(name, start, stop) for name, start, stop in segments if name in layer.lora_A]
    if any(name in layer.lora_variant or layer.lora_B[name].bias is not None for name, _, _ in used):
        return None
    result = layer.base_layer(x)
    rows = x.shape[1] if x.dim() == 3 else 1
    flat, inputs = result.reshape(-1, result.shape[-1]), x.reshape(-1, x.shape[-1])
    for name, start, stop in used:
        down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
        part = inputs[start * rows : stop * rows].to(down.dtype) @ down.t()
        if up.dtype == flat.dtype:
            flat[start * rows : stop * rows].addmm_(part.to(up.dtype), up.t(), alpha=layer.scaling[name])
        else:  # e.g. an fp32 adapter on a bf16 base: computed in the adapter's dtype, cast as peft casts it
            update = (part.to(up.dtype) @ up.t()) * layer.scaling[name]
            flat[start * rows : stop * rows].add_(update.to(flat.dtype))
    return flat.view(result.shape)


def _forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    segments = ROW_SEGMENTS.get()
    if segments is not None and not args and not kwargs:
        result = _segmented(layer, x, segments)
        if result is not None:
            return result
        return type(layer).forward(layer, x, adapter_names=_names(segments, x.shape[0]))
    names = _lean_adapters(layer, x, args, kwargs)
    if names is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    if not names:
        return result
    shape = result.shape
    flat = result.reshape(-1, shape[-1])
    in_place = not torch.is_grad_enabled()
    autocast = _autocast_on(x.device.type)  # addmm casts every operand to the autocast dtype itself
    for name in names:
        dropout = layer.lora_dropout[name]
        p = getattr(dropout, "p", 0.0)  # peft uses nn.Identity for dropout=0
        dropped = dropout(x) if layer.training and p > 0 else x
        # a layer with its own dropout mask cannot share the group's product
        shared = not layer.training or p == 0 or isinstance(dropout, SharedInputDropout)
        low = _low_rank_input(layer, dropped, name, shared, autocast)
        up = layer.lora_B[name].weight
        if up.dtype != flat.dtype and not autocast:  # e.g. an fp32 adapter on a bf16 base output: peft casts the update
            update = (low @ up.t()).to(flat.dtype)
            flat = (
                flat.add_(update, alpha=layer.scaling[name])
                if in_place
                else flat.add(update, alpha=layer.scaling[name])
            )
        elif in_place:
            flat = flat.addmm_(low, up.t(), alpha=layer.scaling[name])
        else:
            flat = torch.addmm(flat, low, up.t(), alpha=layer.scaling[name])
    return flat.view(shape)


def _low_rank_input(layer, x: torch.Tensor, name: str, shared: bool = True, autocast: bool = False) -> torch.Tensor:
    """``A x`` (tokens x r) for ``layer``'s adapter ``name``: a slice of the group's stacked product when
    another layer of the group already computed it from this very tensor, else computed for the group
    (for this layer alone when not ``shared``)."""
    slot = layer._lean_slot
    source = slot.get("input")
    weight = layer.lora_A[name].weight
    if source is not None and source() is x and slot.get("adapter") == name and id(layer) in slot["offsets"]:
        start, stop, used, version = slot["offsets"][id(layer)]
        if used is weight and version == weight._version:  # not replaced or changed in place since
            return slot["product"][:, start:stop]
    members = [m for m in layer._lean_group if name in m.lora_A] if shared else [layer]
    weights = [m.lora_A[name].weight for m in members]
    if len({w.dtype for w in weights}) > 1:  # cannot stack: this layer alone
        weights, members = [weight], [layer]
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    flat = x.reshape(-1, x.shape[-1])
    # peft casts the input to the adapter's dtype; under autocast the matmul casts both to bf16 anyway
    product = (flat if autocast else flat.to(stacked.dtype)) @ stacked.t()
    offsets, start = {}, 0
    for member, each in zip(members, weights, strict=False):
        offsets[id(member)] = (start, start + each.shape[0], each, each._version)
        start += each.shape[0]
    slot.clear()
    # the product lives as long as its input: freed with it once the group has run
    slot.update(input=weakref.ref(x, lambda _: slot.clear()), adapter=name, product=product, offsets=offsets)
    begin, end = offsets[id(layer)][:2]
    return product[:, begin:end]


class SharedInputDropout(nn.Dropout):
    """Dropout that returns the same dropped-out tensor when called again on the same input tensor.

    Every instance of a model shares one ``slot``: the last input (by identity) and its output. Layers
    that share an input run one after the other (q, k, v; gate, up), so the second and third find the
    first's output there. The output is held for as long as its input lives, and freed with it: under
    gradient checkpointing autograd keeps no reference to it, and a mask drawn anew for k or v would
    make the recomputation differ from the forward."""

    def __init__(self, p: float, slot: dict):
        super().__init__(p)
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        source = self.slot.get("input")
        if source is not None and source() is x:
            return self.slot["output"]
        # meta: the memory estimate, which must keep what the CPU keeps (a bool mask, as CUDA's fused dropout)
        dropped = drop_out(x, self.p) if x.device.type in ("cpu", "meta") else super().forward(x)
        slot = self.slot
        slot.clear()
        slot.update(input=weakref.ref(x, lambda _: slot.clear()), output=dropped)
        return dropped


def drop_out(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` with a mask drawn four elements per 64-bit random word.

    torch's CPU dropout draws one Bernoulli sample per element from its Mersenne Twister: measured on the
    sentiment job (2-core Xeon), 20% of a LoRA training step went to ``bernoulli_``, more than all the
    elementwise work of the model. A 64-bit draw cut into four 16-bit integers gives the same kind of mask
    at a quarter of the draws; each element is dropped when its integer falls below ``p`` of the range, so
    ``p`` is rounded to a multiple of 1/65536 (0.05 -> 0.0500031) and the survivors are scaled by the
    rounded keep rate, so the output's expectation is ``x`` exactly. Backward keeps the bool mask: a byte
    per element where torch's CPU dropout keeps its float noise tensor (four). GPUs keep ``F.dropout``
    (their Philox generator is not the cost, and their fused kernel keeps a bool mask too)."""
    steps = round(p * 65536)
    if steps <= 0:
        return x
    if steps >= 65536:
        return x * 0
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    drop = words.view(torch.int16)[: x.numel()].view(x.shape) < steps - 32768
    return _MaskedScale.apply(x, drop, 65536 / (65536 - steps))


class _MaskedScale(torch.autograd.Function):
    """``x * scale`` with the ``drop`` positions zeroed, forward and backward (one pass each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(drop, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(drop, 0), None, None


def share_dropout(model: nn.Module) -> int:
    """Replace peft's per-layer LoRA dropout by ``SharedInputDropout`` (one slot per model); returns
    how many layers were changed."""
    slot: dict = {}
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is nn.Dropout:
                dropouts[name] = SharedInputDropout(layer.p, slot)
                changed += 1
    return changed
