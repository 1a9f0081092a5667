"""The optimizer (two parameter groups: the new head, the adapter) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .train_config import TrainConfig


def build_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit) over the trainable tensors only: the head in its own group,
    since a freshly initialised head often wants a higher learning rate than the adapter."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    adapter = [p for p in model.trainable_parameters() if id(p) not in head_ids]
    groups = [{"params": head, "lr": config.head_lr or config.lr}]
    if adapter:
        groups.append({"params": adapter, "lr": config.lr})
    for group in groups:
        group["weight_decay"] = config.weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    import bitsandbytes as bnb

    if config.optimizer == "paged_adamw_8bit":
        if not torch.cuda.is_available():
            raise ConfigError("optimizer='paged_adamw_8bit' pages optimizer state through CUDA unified memory and "
                              "needs a GPU; use 'adamw' or 'adamw_8bit' on CPU")
        return bnb.optim.PagedAdamW8bit(groups, lr=config.lr)
    return bnb.optim.AdamW8bit(groups, lr=config.lr)


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
