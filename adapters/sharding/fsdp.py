"""Fully sharded data parallel training of an adapted model, with torch's FSDP2 (``fully_shard``).

Under DDP every process holds the whole frozen base; under FSDP (Zhao et al. 2023, "PyTorch FSDP:
Experiences on Scaling Fully Sharded Data Parallel", arXiv:2304.11277) each of N processes keeps 1/N of
every parameter and gathers one transformer block's weights just before that block runs, freeing them
after. With a 4-bit base this is FSDP-QLoRA (Answer.AI, 2024): the packed 4-bit bytes are sharded like any
other tensor. We apply FSDP2 ourselves, one ``fully_shard`` per decoder block plus one for the whole model
(the final norm, the head and the adapter's own layers), on CPUs (gloo) and GPUs (nccl) alike. Accelerate's
FSDP switch is GPU-only and on CPUs silently trains with DDP instead, hence our own.

The frozen input embeddings (unless tied to an LM head) stay outside FSDP, split by vocabulary rows instead
(``sharding/embedding.py``); an embedding that is not a plain ``nn.Embedding`` (Gemma's scaled one) is kept
whole on every rank.

What keeps the 4-bit weights intact (bitsandbytes#1945, accelerate#3983):

* FSDP2 with a ``MixedPrecisionPolicy`` casts every parameter to its ``param_dtype`` for the all-gather. A
  4-bit weight is packed bytes, not numbers: cast, it is corrupted silently. Its storage dtype must be
  the param dtype itself, so the bytes are reinterpreted (a view), never converted: ``match_4bit_storage``
  does that before sharding. With bf16 compute we gather in bf16; in fp32 no cast happens at all.
* bitsandbytes repacks 4-bit weights in place for CPU inference on CPUs with AVX512-BF16 (eval mode, no
  gradients); a sharded weight repacked that way no longer fits its shape. Sharded layers keep the plain
  layout.
* LLM.int8 weights (``Int8Params``) lose their row scales when FSDP re-creates the parameter, and fp16
  needs a gradient scaler that knows about shards: both are refused before any model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters.backbone.loading import base_fingerprint
from adapters.backbone.sharded import local_bytes
from adapters.errors import ConfigError
from adapters.methods.targets import find_block_stack, own_unit_embeddings
from adapters.sharding.embedding import split_vocabulary


def accelerate_fsdp_requested() -> bool:
    """True when launched by ``accelerate launch --use_fsdp`` (or with ``ACCELERATE_USE_FSDP=true``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp(quantization: str | None, precision: str) -> None:
    """Refuse the settings FSDP would corrupt or cannot run (cheap: before a model loads)."""
    if quantization == "int8":
        raise ConfigError(
            "fsdp=True with quantization='int8': FSDP re-creates every parameter when it shards it, and LLM.int8 "
            "weights then lose their row scales (bitsandbytes Int8Params). Use quantization='nf4' (FSDP-QLoRA), "
            "or train int8 with DDP (fsdp=False)"
        )
    if precision == "fp16":
        raise ConfigError(
            "fsdp=True with mixed_precision='fp16': fp16 needs a gradient scaler that knows about shards. "
            "Use mixed_precision='bf16' (or 'no')"
        )


@dataclass
class ShardReport:
    """What sharding did on this rank: how much of the frozen base it holds."""

    processes: int
    blocks: int
    frozen_bytes_here: int
    frozen_bytes: int
    gather_dtype: str
    replicated_bytes: int = 0  # the input embeddings when kept whole on every rank (not a plain nn.Embedding)
    vocabulary_split: bool = False  # the input embeddings split by vocabulary rows (``sharding/embedding.py``)

    def summary(self) -> str:
        share = (self.frozen_bytes_here - self.replicated_bytes) / max(self.frozen_bytes - self.replicated_bytes, 1)
        embeddings = (
            "the input embeddings split by vocabulary rows"
            if self.vocabulary_split
            else f"the {_size(self.replicated_bytes)} input embeddings whole"
        )
        return (
            f"FSDP2: {self.blocks} blocks + the root sharded over {self.processes} processes "
            f"(all-gather in {self.gather_dtype}), {embeddings}; this rank holds {_size(self.frozen_bytes_here)} "
            f"of the {_size(self.frozen_bytes)} frozen weights: {share:.3f} of the sharded ones "
            f"(1/N = {1 / self.processes:.3f})"
        )

    def metrics(self) -> dict[str, float]:
        return {
            "fsdp_frozen_bytes_per_rank": self.frozen_bytes_here,
            "frozen_bytes": self.frozen_bytes,
            "fsdp_replicated_bytes": self.replicated_bytes,
        }


def _size(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB" if count >= 2**20 else f"{count / 2**10:,.1f} KiB"


def match_4bit_storage(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Reinterpret every 4-bit weight's packed bytes as ``dtype`` (a view: the bytes do not change), so
    an all-gather in ``dtype`` moves them untouched (None: no cast will happen, storage kept); keep
    bitsandbytes' plain CPU layout. Returns how many layers it saw."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False  # no in-place repacking of a sharded weight
        weight: Any = layer.weight  # bitsandbytes' Params4bit
        if dtype is None or weight.dtype == dtype:
            continue
        packed = weight.data.reshape(-1).view(torch.uint8)
        if packed.numel() % dtype.itemsize:
            raise ConfigError(
                f"a 4-bit weight of {packed.numel()} bytes cannot be stored as {dtype} for FSDP; "
                f"train this model with mixed_precision='no' or without fsdp"
            )
        weight.data = packed.view(dtype).unsqueeze(1)
        weight.quant_storage = dtype
        layer.quant_storage = dtype
    return len(layers)


def shard(model: nn.Module, precision: str, processes: int) -> ShardReport:
    """Apply FSDP2 to ``model`` (an ``AdaptedModel``) in place: each transformer block, then the root; the
    input embeddings split by vocabulary rows (``split_vocabulary``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    gather = torch.bfloat16 if precision == "bf16" else None
    backbone: Any = getattr(model, "backbone", model)
    base_fingerprint(backbone)  # read (and kept) while the embeddings are whole: artifacts record it
    match_4bit_storage(model, gather)
    # the device of a real parameter: a sharded load's frozen ones are still on the meta device here
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    mesh = init_device_mesh(device.type, (processes,))
    # bf16: parameters gathered and computed in bf16, gradients reduced in fp32 (the optimizer's own)
    policy = MixedPrecisionPolicy(param_dtype=gather, reduce_dtype=torch.float32 if gather else None)
    _, blocks = find_block_stack(backbone)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    embeddings = own_unit_embeddings(backbone)
    split = split_vocabulary(backbone, embeddings, mesh) if embeddings is not None else None
    embeddings = split or embeddings
    outside = set(embeddings.parameters()) if embeddings is not None else set()
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=outside or None)
    here, whole = local_bytes(model)
    kept = 0 if split else sum(p.numel() * p.element_size() for p in outside)
    gathered = str(gather or "storage dtypes").replace("torch.", "")
    return ShardReport(processes, len(blocks), here, whole, gathered, kept, split is not None)
