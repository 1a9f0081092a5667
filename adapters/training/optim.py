"""The optimizer (parameter groups: the new head, the adapter) and the learning-rate schedule.

Layer-wise learning-rate decay (``TrainConfig(layer_lr_decay=d)``; Howard & Ruder 2018, ULMFiT's
"discriminative fine-tuning", and ELECTRA's fine-tuning recipe, Clark et al. 2020): the adapter
tensors of block ``i`` of ``N`` learn at ``lr * d ** (N - 1 - i)``, so the top block moves at ``lr``
and the lower blocks, whose general features the task needs least changed, move less. Adapter
tensors outside any block take the lowest rate; the head keeps ``head_lr``.
"""

from __future__ import annotations

import math

import torch

from adapters.config.training import TrainConfig
from adapters.errors import ConfigError
from adapters.methods.targets import BLOCK_INDEX


def build_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit) over the trainable tensors only: the head in its own group,
    since a freshly initialised head often wants a higher learning rate than the adapter."""
    groups = parameter_groups(model, config)
    for group in groups:
        group["weight_decay"] = config.weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    import bitsandbytes as bnb

    if config.optimizer == "paged_adamw_8bit":
        if not torch.cuda.is_available():
            raise ConfigError(
                "optimizer='paged_adamw_8bit' pages optimizer state through CUDA unified memory and "
                "needs a GPU; use 'adamw' or 'adamw_8bit' on CPU"
            )
        return bnb.optim.PagedAdamW8bit(groups, lr=config.lr)
    return bnb.optim.AdamW8bit(groups, lr=config.lr)


def parameter_groups(model, config: TrainConfig) -> list[dict]:
    """The head's group, then the adapter's: one group, or one per block with ``layer_lr_decay``."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    adapter = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head, "lr": config.head_lr or config.lr}]
    if not adapter:
        return groups
    if config.layer_lr_decay is None:
        return groups + [{"params": [p for _, p in adapter], "lr": config.lr}]
    blocks: dict[int, list] = {}
    for name, p in adapter:
        found = BLOCK_INDEX.search(model.adapter.module_path(name) if model.adapter else name)
        blocks.setdefault(int(found.group(1)) if found else -1, []).append(p)
    count = getattr(model.backbone.config, "num_hidden_layers", None) or max(blocks) + 1
    # outside any block (-1): the lowest rate, as for the first block
    return groups + [
        {"params": params, "lr": config.lr * config.layer_lr_decay ** (count - 1 - max(block, 0)), "block": block}
        for block, params in sorted(blocks.items())
    ]


def lr_schedule(shape: str, warmup: int, total: int, calls_per_step: int = 1):
    """Multiplier of the peak learning rate after ``step`` optimizer steps: linear warmup, then
    linear decay to 0, half a cosine, or constant. Accelerate's scheduler wrapper calls the
    schedule once per process at each step, hence ``calls_per_step``."""

    def schedule(calls: int) -> float:
        step = calls // calls_per_step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if shape == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if shape == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress)

    return schedule
