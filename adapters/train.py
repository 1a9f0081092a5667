"""The training and evaluation loop, on Accelerate.

One loop for CPU, one GPU or many (``accelerate launch`` / ``torchrun``): Accelerate wraps the
model for data parallelism, shards the data, accumulates gradients (``accumulate``), and
gathers evaluation results without the padding duplicates of the last batch
(``gather_for_metrics``). Only adapter and head parameters reach the optimizer, so the
frozen (quantized) base never changes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .base import cpu_only
from .data import Collator, encode_dataset
from .errors import ConfigError
from .metrics import classification_metrics

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train. Every field is validated when the config is built."""

    epochs: float = 1
    """Passes over the training data (fractions allowed); ``max_steps`` overrides."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float = 2e-4
    """Peak learning rate of the adapter."""
    head_lr: float | None = None
    """Learning rate of the new head (default: ``lr``); a fresh head often wants more."""
    batch_size: int = 16
    """Examples per device per forward pass."""
    eval_batch_size: int | None = None
    """Default: 2 x batch_size (no activations kept for backward)."""
    grad_accum: int = 1
    """Forward passes per optimizer step: effective batch = batch_size x processes x grad_accum."""
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    """``"adamw"`` (torch), ``"adamw_8bit"`` or ``"paged_adamw_8bit"`` (bitsandbytes)."""
    mixed_precision: str = "no"
    seed: int = 42
    text_column: str = "text"
    label_column: str = "label"
    output_dir: str | None = None
    """Where logs (metrics.jsonl, TensorBoard when installed) go; nothing is written when None."""
    log_every: int = 10
    gradient_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.epochs > 0, f"epochs={self.epochs} must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.head_lr is None or self.head_lr > 0, f"head_lr={self.head_lr} must be > 0"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)"),
            (self.scheduler in SCHEDULERS, f"scheduler={self.scheduler!r} must be one of {SCHEDULERS}"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm={self.max_grad_norm} must be > 0 or None"),
            (self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision={self.mixed_precision!r} must be one of {MIXED_PRECISION}"),
            (self.log_every >= 1, f"log_every={self.log_every} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class JSONLTracker:
    """An Accelerate tracker writing one JSON object per logged step to ``metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir):
        self.path = Path(logging_dir) / "metrics.jsonl"

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        self._write({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, **values})

    def _write(self, record: dict):
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def finish(self):
        pass


def _trackers(output_dir: str | None) -> list:
    if output_dir is None:
        return []
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import is_tensorboard_available

    # registered as a GeneralTracker subclass at runtime so the module imports without accelerate
    tracker_cls = type("JSONLTracker", (JSONLTracker, GeneralTracker), {})
    trackers: list = [tracker_cls(output_dir)]
    if is_tensorboard_available():
        trackers.append("tensorboard")
    return trackers


def _optimizer(model, config: TrainConfig):
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


def _lr_lambda(kind: str, warmup: int, total: int, calls_per_step: int = 1):
    """Multiplier of the peak learning rate after ``step`` optimizer steps: linear warmup, then
    linear decay to 0, half a cosine, or constant. Accelerate's scheduler wrapper calls the
    schedule once per process at each step, hence ``calls_per_step``."""

    def schedule(calls: int) -> float:
        step = calls // calls_per_step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress)

    return schedule


def evaluate(model, data, config: TrainConfig | None = None, accelerator=None) -> dict[str, float]:
    """Accuracy, macro-F1 and loss of ``model`` on ``data`` (every example counted once)."""
    from accelerate import Accelerator

    config = config or TrainConfig()
    accelerator = accelerator or Accelerator(cpu=cpu_only(), mixed_precision=config.mixed_precision)
    unwrapped = accelerator.unwrap_model(model)
    encoded = encode_dataset(data, unwrapped.tokenizer, unwrapped.head_spec, config.text_column,
                             config.label_column, unwrapped.max_length, "eval dataset")
    loader = accelerator.prepare(DataLoader(encoded, batch_size=config.eval_batch_size or 2 * config.batch_size,
                                            collate_fn=Collator(unwrapped.tokenizer)))
    return _evaluate_loader(model, loader, accelerator)


def _evaluate_loader(model, loader, accelerator) -> dict[str, float]:
    unwrapped = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
            logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    model.train(was_training)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = classification_metrics(logits.argmax(-1).numpy(), labels.numpy(), unwrapped.head_spec.num_labels)
    metrics["loss"] = float(unwrapped.head_spec.loss(logits, labels))
    return metrics


def train(model, train_data, eval_data=None, config: TrainConfig | None = None) -> dict[str, float]:
    """Train ``model``'s adapter and head on ``train_data``; evaluate on ``eval_data`` each epoch.

    Returns the final metrics: ``train_loss``, ``eval_accuracy``, ``eval_macro_f1``, ``eval_loss``
    (when there is eval data), ``steps``, ``world_size``, ``train_seconds``, ``train_examples_per_second``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be an adapters.TrainConfig, got {type(config).__name__}")
    if not model.trainable_parameters():
        raise ConfigError("the model has no trainable parameters")
    trackers = _trackers(config.output_dir)
    accelerator = Accelerator(
        cpu=cpu_only(),
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=config.mixed_precision,
        log_with=trackers or None,
        project_dir=config.output_dir,
        # the same shuffled order whatever the number of processes: runs are comparable
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"launched with WORLD_SIZE={launched} but Accelerate runs {accelerator.num_processes} process(es): "
            f"each would train alone. On CPUs, create Accelerate state with cpu=True (or let adapters create it: "
            f"do not call PartialState()/Accelerator() before adapters.adapt)")
    set_seed(config.seed)
    encoded = encode_dataset(train_data, model.tokenizer, model.head_spec, config.text_column,
                             config.label_column, model.max_length, "train dataset")
    eval_encoded = None
    if eval_data is not None:
        eval_encoded = encode_dataset(eval_data, model.tokenizer, model.head_spec, config.text_column,
                                      config.label_column, model.max_length, "eval dataset")
    collate = Collator(model.tokenizer)
    train_loader = DataLoader(encoded, batch_size=config.batch_size, shuffle=True, collate_fn=collate)
    eval_loader = None
    if eval_encoded is not None:
        eval_loader = DataLoader(eval_encoded, batch_size=config.eval_batch_size or 2 * config.batch_size,
                                 collate_fn=collate)

    if config.gradient_checkpointing:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = _optimizer(model, config)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    # the prepared loader is this process's shard: 1/N of the data per epoch
    local_steps = config.max_steps or max(1, math.ceil(math.ceil(len(train_loader) / config.grad_accum) * config.epochs))
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(
        config.scheduler, int(config.warmup_ratio * local_steps), local_steps, accelerator.num_processes)))
    if trackers:
        accelerator.init_trackers("qadapters", config={k: v for k, v in asdict(config).items() if v is not None})
    accelerator.print(f"training on {accelerator.num_processes} process(es) ({accelerator.device}), "
                      f"{len(encoded)} examples, effective batch "
                      f"{config.batch_size * accelerator.num_processes * config.grad_accum}, {local_steps} steps")

    progress = tqdm(total=local_steps, desc="train", disable=not (config.progress and accelerator.is_local_main_process))
    model.train()
    step, epoch, examples, started = 0, 0, 0, time.perf_counter()
    running, running_count, last_loss, metrics = 0.0, 0, float("nan"), {}
    while step < local_steps:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch)["loss"]
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            examples += batch["input_ids"].shape[0]
            running += loss.detach().float().item()
            running_count += 1
            if accelerator.sync_gradients:
                step += 1
                progress.update(1)
                if step % config.log_every == 0 or step == local_steps:
                    last_loss = float(accelerator.reduce(torch.tensor(running / running_count, device=accelerator.device), "mean"))
                    running, running_count = 0.0, 0
                    progress.set_postfix(loss=f"{last_loss:.4f}")
                    accelerator.log({"train_loss": last_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch}, step=step)
                if step >= local_steps:
                    break
        epoch += 1
        if eval_loader is not None:
            metrics = {f"eval_{k}": v for k, v in _evaluate_loader(model, eval_loader, accelerator).items()}
            accelerator.log(metrics, step=step)
            accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    progress.close()
    seconds = time.perf_counter() - started
    result = {
        "train_loss": last_loss,
        **metrics,
        "steps": step,
        "epochs": epoch,
        "world_size": accelerator.num_processes,
        "train_seconds": seconds,
        "train_examples_per_second": examples * accelerator.num_processes / seconds,
    }
    # not end_training(): it destroys the process group, which saving and evaluating still need
    for tracker in accelerator.trackers:
        tracker.finish()
    if config.gradient_checkpointing:
        accelerator.unwrap_model(model).base_model.gradient_checkpointing_disable()
    return result
