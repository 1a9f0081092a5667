"""The training and evaluation loop, on Accelerate.

One loop for CPU, one GPU or many (``accelerate launch`` / ``torchrun``): Accelerate wraps the
model for data parallelism, shards the data, accumulates gradients (``accumulate``), and
gathers evaluation results without the padding duplicates of the last batch
(``gather_for_metrics``). Only adapter and head parameters reach the optimizer, so the
frozen (quantized) base never changes.

Robustness (see ``checkpoint.py``): periodic atomic checkpoints and exact resume (``resume=
"auto"``), a checkpoint then a clear exit on SIGTERM/SIGINT, a stop (or skip) on a NaN/inf loss
before it reaches the weights, early stopping with the best weights restored, and no silent
reuse of an output folder that holds an earlier run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker
from torch.utils.data import DataLoader

from .base import cpu_only, resolve_mixed_precision
from .batching import LengthGroupedSampler, by_length, inference_batches, packable, row_length
from .checkpoint import (checkpoint_dir, complete_checkpoints, keep_trainable_only, load_checkpoint,
                         resolve_resume, save_checkpoint)
from .data import Collator, encode_dataset
from .errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from .heads import IGNORE

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


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
    """Rows per evaluation batch. Default: rows sorted by length in batches of up to 8,192 padded tokens
    on one process, 4 x batch_size under several (and for CausalLM heads, whose logits span the vocabulary)."""
    grad_accum: int = 1
    """Forward passes per optimizer step: effective batch = batch_size x processes x grad_accum."""
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    """``"adamw"`` (torch), ``"adamw_8bit"`` or ``"paged_adamw_8bit"`` (bitsandbytes)."""
    mixed_precision: str = "auto"
    """``"auto"``: bf16 autocast on GPUs that support it, none on CPU; or ``"no"``, ``"bf16"``, ``"fp16"``."""
    seed: int = 42
    text_column: str = "text"
    label_column: str = "label"
    output_dir: str | None = None
    """Where logs (metrics.jsonl, TensorBoard when installed) go; nothing is written when None."""
    log_every: int = 10
    gradient_checkpointing: bool = False
    progress: bool = True
    eval_every: int | None = None
    """Evaluate every this many steps (default: at the end of each epoch)."""
    save_every: int | None = None
    """Save a resumable checkpoint under ``output_dir/checkpoints`` every this many steps."""
    keep_last: int | None = 3
    """Checkpoints kept (the best one, with early stopping, is kept besides); None keeps all."""
    resume: str | None = None
    """``"auto"``: continue from the newest complete checkpoint in ``output_dir`` (or start fresh);
    a path: continue from that checkpoint."""
    overwrite: bool = False
    """Start afresh in an ``output_dir`` that holds an earlier run (its checkpoints and logs are deleted)."""
    skip_nonfinite: bool = False
    """Skip a step whose loss is NaN/inf instead of stopping with an error."""
    early_stopping_metric: str | None = None
    """Stop when this eval metric (e.g. ``"eval_macro_f1"``; ``*loss`` is minimised) stops improving."""
    early_stopping_patience: int = 3
    """Evaluations without improvement before stopping."""
    load_best: bool = False
    """End with the weights of the best evaluation (by ``early_stopping_metric``, default ``eval_loss``)."""
    group_by_length: bool = True
    """Batches of rows of similar length (seeded, every row once per epoch; see ``batching.py``): far less
    padding for the same optimisation. Not used with packing, whose batches have no padding at all."""
    packing: bool | None = None
    """Padding-free batches for decoders with a pooling head (rows concatenated, positions restarting,
    pooled per row; see ``batching.py``). None: on where the model and head allow it."""
    auto_batch_size: bool = False
    """Use the largest per-device batch that fits the device's free memory (memory estimate, then one
    real step that backs off on out-of-memory), with gradient accumulation keeping the effective
    batch ``batch_size x grad_accum`` per device; see ``batch_size.py``."""

    def __post_init__(self):
        self._check_types()
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
            (self.eval_every is None or self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1"),
            (self.save_every is None or self.save_every >= 1, f"save_every={self.save_every} must be >= 1"),
            (self.keep_last is None or self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1 or None"),
            (self.early_stopping_patience >= 1, f"early_stopping_patience={self.early_stopping_patience} must be >= 1"),
            (self.output_dir is not None or (self.save_every is None and self.resume is None),
             "save_every and resume need an output_dir to keep checkpoints in"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


    def _check_types(self) -> None:
        """Numbers must be finite numbers and counts integers, before any comparison (``lr="abc"``
        would end in a bare TypeError, ``lr=inf`` would train to NaN)."""
        for name in ("epochs", "lr", "head_lr", "warmup_ratio", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is None and name in ("head_lr", "max_grad_norm"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"TrainConfig({name}={value!r}): must be a finite number")
        for name in ("max_steps", "batch_size", "eval_batch_size", "grad_accum", "seed", "log_every", "eval_every",
                     "save_every", "keep_last", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"TrainConfig({name}={value!r}): must be an integer")
        if self.packing not in (None, True, False):
            raise ConfigError(f"TrainConfig(packing={self.packing!r}): must be True, False or None (automatic)")


class JSONLTracker(GeneralTracker):
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
    from accelerate.utils import is_tensorboard_available

    trackers: list = [JSONLTracker(output_dir)]
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


def _eval_loader(model, data, config: TrainConfig, processes: int = 1) -> DataLoader:
    """Evaluation batches of ``data`` for ``model`` (unprepared): encoded, sorted by length (metrics do
    not depend on the order), padded per batch; by token budget on one process (``batching.py``), and of
    ``eval_batch_size`` rows (default 4 x batch_size) under several, whose shards must be of one size."""
    encoded = encode_dataset(data, model.tokenizer, model.head_spec, config.text_column, config.label_column,
                             model.max_length, "eval dataset")
    rows = config.eval_batch_size
    if rows is None and (processes > 1 or model.head_spec.kind == "causal_lm"):  # vocabulary-wide logits
        rows = 4 * config.batch_size
    lengths = [row_length(ids) for ids in encoded["input_ids"]]
    collate = Collator(model.tokenizer, model.head_spec)
    if processes > 1:  # Accelerate shards a sampler with a fixed batch size evenly across processes
        return DataLoader(encoded, batch_size=rows, sampler=by_length(lengths), collate_fn=collate)
    return DataLoader(encoded, batch_sampler=inference_batches(lengths, rows), collate_fn=collate)


def _train_loader(model, encoded, config: TrainConfig, processes: int = 1) -> DataLoader:
    """Training batches: packed (no padding) where the model and head allow it and ``packing`` is not
    False; else length-grouped (``group_by_length``) or plainly shuffled, padded per batch."""
    allowed = packable(model.head_spec, model.backbone_info.is_decoder)
    if config.packing and not allowed:
        raise ConfigError(f"packing=True needs a decoder and a classification, multi-label or regression head on "
                          f"plain rows; this is a {'decoder' if model.backbone_info.is_decoder else 'encoder'} with a "
                          f"{model.head_spec.kind} head. Pass packing=None (automatic) or False")
    packed = allowed if config.packing is None else config.packing
    collate = Collator(model.tokenizer, model.head_spec, pack=packed)
    if config.group_by_length and not packed:
        # grouped in units of the global batch: Accelerate hands consecutive batches to the processes,
        # so N processes see the same rows per step as one process with an N times larger batch
        sampler = LengthGroupedSampler([row_length(ids) for ids in encoded["input_ids"]],
                                       config.batch_size * processes, config.seed)
        return DataLoader(encoded, batch_size=config.batch_size, sampler=sampler, collate_fn=collate)
    return DataLoader(encoded, batch_size=config.batch_size, shuffle=True, collate_fn=collate)


def evaluate(model, data, config: TrainConfig | None = None, accelerator=None) -> dict[str, float]:
    """The head's metrics (and loss) of ``model`` on ``data``, every example counted once."""
    from accelerate import Accelerator

    config = config or TrainConfig()
    # inference runs without autocast, as predict() and a reloaded artifact do
    accelerator = accelerator or Accelerator(cpu=cpu_only())
    loader = accelerator.prepare(_eval_loader(accelerator.unwrap_model(model), data, config, accelerator.num_processes))
    return _evaluate_loader(model, loader, accelerator)


def _evaluate_loader(model, loader, accelerator) -> dict[str, float]:
    """The head's metrics over ``loader``, every example counted once across processes."""
    spec = accelerator.unwrap_model(model).head_spec
    was_training = model.training
    model.eval()
    gathered: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"})["logits"]
            outputs = spec.eval_outputs(logits, batch["labels"])
            # per-token outputs differ in length between processes: pad before gathering
            outputs = tuple(accelerator.pad_across_processes(t, dim=1, pad_index=IGNORE) if t.dim() > 1 and
                            spec.sequence_labels else t for t in outputs)
            outputs = accelerator.gather_for_metrics(outputs)
            gathered.append([t.cpu() for t in outputs])
    model.train(was_training)
    columns = []
    for parts in zip(*gathered):
        if parts[0].dim() > 1 and spec.sequence_labels:  # pad batches to one length to concatenate
            longest = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, longest - p.shape[1]), value=IGNORE) for p in parts]
        columns.append(torch.cat(parts))
    return spec.metrics(*columns)


RUN_FILE = "run.json"  # written when a run finishes


def _prepare_output_dir(config: TrainConfig, is_main: bool) -> None:
    """Refuse to silently start over in a folder holding an earlier run; clear it on overwrite."""
    if config.output_dir is None:
        return
    out = Path(config.output_dir)
    earlier = (out / RUN_FILE).exists() or bool(complete_checkpoints(out)) or (out / "metrics.jsonl").exists()
    if earlier and config.resume is None:
        if not config.overwrite:
            raise ConfigError(f"{out} holds an earlier run (checkpoints or logs); pass resume='auto' to continue it "
                              f"or overwrite=True to start afresh (deleting its checkpoints and logs)")
        if is_main:  # delete only what a run writes, never the user's other files
            shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
            for name in (RUN_FILE, "metrics.jsonl"):
                (out / name).unlink(missing_ok=True)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked after each step (main thread only)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0)


def train(model, train_data, eval_data=None, config: TrainConfig | None = None) -> dict[str, float]:
    """Train ``model``'s adapter and head on ``train_data``; evaluate on ``eval_data``.

    Returns the final metrics: ``train_loss``, ``eval_accuracy``, ``eval_macro_f1``, ``eval_loss``
    (when there is eval data), ``steps``, ``world_size``, ``train_seconds``,
    ``train_examples_per_second`` and, with early stopping, ``best_step``/``best_<metric>``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be an adapters.TrainConfig, got {type(config).__name__}")
    if not model.trainable_parameters():
        raise ConfigError("the model has no trainable parameters")
    if (config.early_stopping_metric or config.load_best) and eval_data is None:
        raise ConfigError("early stopping and load_best need eval data: pass eval_data to train()")
    encoded = encode_dataset(train_data, model.tokenizer, model.head_spec, config.text_column,
                             config.label_column, model.max_length, "train dataset")
    auto_batch = None
    if config.auto_batch_size:
        from .batch_size import choose_batch_size

        batch_size, grad_accum, auto_batch = choose_batch_size(model, encoded, config,
                                                               int(os.environ.get("WORLD_SIZE", "1")))
        config = replace(config, batch_size=batch_size, grad_accum=grad_accum)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"auto_batch_size: {batch_size} per device x {grad_accum} accumulation steps (requested "
                  f"{auto_batch['requested_per_device']} per device per step; sequences up to {auto_batch['seq_len']} "
                  f"tokens; estimate {auto_batch['estimate_bytes'] / 2**30:.2f} GiB of "
                  f"{auto_batch['free_bytes'] / 2**30:.2f} GiB free)")
    trackers = _trackers(config.output_dir)
    # bf16 autocast is ours, around the training forward only: Accelerate's would wrap the model's forward
    # for good and pin one precision per process (a second model trained in fp32 in the same process is
    # refused; seen on an H200). fp16 needs its loss scaler, so that one stays Accelerate's.
    # "auto" follows the model's device: a model kept on the CPU of a GPU machine trains in fp32.
    precision = resolve_mixed_precision(config.mixed_precision, model.device.type)
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    accelerator = Accelerator(
        cpu=cpu_only(),
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision="fp16" if precision == "fp16" else "no",
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
    if auto_batch is not None and accelerator.num_processes > 1:
        # every rank must step together: all take the smallest batch any of them can hold
        smallest = int(accelerator.gather(torch.tensor([config.batch_size], device=accelerator.device)).min())
        if smallest != config.batch_size:
            config = replace(config, batch_size=smallest, grad_accum=config.batch_size * config.grad_accum // smallest)
            accelerator.gradient_accumulation_steps = config.grad_accum
    resume_from = resolve_resume(config.resume, config.output_dir)
    if resume_from is None:
        _prepare_output_dir(config, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    eval_loader = _eval_loader(model, eval_data, config, accelerator.num_processes) if eval_data is not None else None
    train_loader = _train_loader(model, encoded, config, accelerator.num_processes)

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
    unwrapped = accelerator.unwrap_model(model)
    accelerator.register_save_state_pre_hook(keep_trainable_only(accelerator.unwrap_model))

    run = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "running": 0.0, "running_count": 0, "last_loss": None,
           "best": None, "best_step": None, "best_checkpoint": None, "bad_evals": 0, "skipped_steps": 0,
           "stopped_early": False, "metrics": {}, "metrics_step": None}
    if resume_from is not None:
        run.update(load_checkpoint(accelerator, resume_from))
        accelerator.print(f"resumed from {resume_from} at step {run['step']}")
    if trackers:  # metrics.jsonl is appended to: a resumed run's log goes on where it stopped
        accelerator.init_trackers("qadapters", config={k: v for k, v in asdict(config).items() if v is not None})
    accelerator.print(f"training on {accelerator.num_processes} process(es) ({accelerator.device}), "
                      f"{len(encoded)} examples, effective batch "
                      f"{config.batch_size * accelerator.num_processes * config.grad_accum}, {local_steps} steps")

    metric_name = config.early_stopping_metric or ("eval_loss" if config.load_best else None)
    minimise = metric_name is not None and metric_name.endswith("loss")
    best_weights = None
    eval_seconds = 0.0  # kept out of the training time and throughput

    def checkpoint(protect_best: bool = False) -> Path:
        state = {k: v for k, v in run.items()}
        if protect_best:
            state["best_checkpoint"] = str(checkpoint_dir(config.output_dir) / f"step-{run['step']:06d}")
        protect = Path(state["best_checkpoint"]) if state.get("best_checkpoint") else None
        path = save_checkpoint(accelerator, config.output_dir, state, config.keep_last, protect)
        run["best_checkpoint"] = state["best_checkpoint"]
        return path

    def evaluate_now() -> bool:
        """Evaluate, log, track the best; True when early stopping says stop."""
        nonlocal best_weights, eval_seconds
        eval_started = time.perf_counter()
        run["metrics"] = {f"eval_{k}": v for k, v in _evaluate_loader(model, eval_loader, accelerator).items()}
        run["metrics_step"] = run["step"]
        eval_seconds += time.perf_counter() - eval_started
        accelerator.log(run["metrics"], step=run["step"])
        accelerator.print(f"step {run['step']}: "
                          + ", ".join(f"{k}={v:.4f}" for k, v in run["metrics"].items()))
        if metric_name is None:
            return False
        if metric_name not in run["metrics"]:
            raise ConfigError(f"early_stopping_metric={metric_name!r} is not an eval metric; "
                              f"choose one of {sorted(run['metrics'])}")
        value = run["metrics"][metric_name]
        if run["best"] is None or (value < run["best"] if minimise else value > run["best"]):
            run.update(best=value, best_step=run["step"], bad_evals=0)
            best_weights = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
            if config.output_dir is not None:
                checkpoint(protect_best=True)
            return False
        run["bad_evals"] += 1
        return config.early_stopping_metric is not None and run["bad_evals"] >= config.early_stopping_patience

    progress = tqdm(total=local_steps, initial=run["step"], desc="train",
                    disable=not (config.progress and accelerator.is_local_main_process))
    model.train()
    started, examples, tokens, processed = time.perf_counter(), 0, 0, 0
    with _StopSignal() as stop_signal:
        while run["step"] < local_steps and not run["stopped_early"]:
            train_loader.set_epoch(run["epoch"])
            if run["batch_in_epoch"]:  # resuming mid-epoch: the same order, minus what was done
                # Starting an iterator draws from the global RNG; the run that saved this checkpoint
                # drew it at the start of the epoch, so restore the RNG state after drawing again.
                # (Accelerate's loaders are generators: the draw happens at the first batch.)
                rng = torch.get_rng_state()
                batches = iter(accelerator.skip_first_batches(train_loader, run["batch_in_epoch"]))
                first = next(batches, None)
                torch.set_rng_state(rng)
                batches = itertools.chain([first] if first is not None else [], batches)
            else:
                batches = iter(train_loader)
            finished_epoch = True
            for batch in batches:
                run["batch_in_epoch"] += 1
                with accelerator.accumulate(model):
                    with autocast:
                        loss = model(**batch)["loss"]
                    if _any_rank(accelerator, not bool(torch.isfinite(loss.detach()))):
                        if not config.skip_nonfinite:
                            saved = complete_checkpoints(config.output_dir) if config.output_dir else []
                            where = saved[-1] if saved else None
                            raise NonFiniteLossError(
                                f"loss became {loss.item()} at step {run['step'] + 1}; the weights were not updated. "
                                f"Last good checkpoint: {where or 'none saved (set save_every)'}. Lower the learning "
                                f"rate, check the data, or pass skip_nonfinite=True to skip such steps")
                        optimizer.zero_grad()
                        run["skipped_steps"] += 1
                        continue
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                examples += batch["labels"].shape[0]  # texts, not windows or choices
                real = batch["segments"] >= 0 if "segments" in batch else batch["attention_mask"]
                tokens += int(real.sum())
                processed += batch["input_ids"].numel()
                run["running"] += loss.detach().float().item()
                run["running_count"] += 1
                if not accelerator.sync_gradients:
                    continue
                run["step"] += 1
                progress.update(1)
                step = run["step"]
                if step % config.log_every == 0 or step == local_steps:
                    mean = torch.tensor(run["running"] / max(run["running_count"], 1), device=accelerator.device)
                    run["last_loss"] = float(accelerator.reduce(mean, "mean"))
                    run["running"], run["running_count"] = 0.0, 0
                    progress.set_postfix(loss=f"{run['last_loss']:.4f}")
                    accelerator.log({"train_loss": run["last_loss"], "lr": scheduler.get_last_lr()[0],
                                     "epoch": run["epoch"]}, step=step)
                if _any_rank(accelerator, stop_signal.signum is not None):
                    if config.output_dir is None:
                        raise TrainingInterrupted(f"interrupted at step {step}; no output_dir, so nothing was saved")
                    path = checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted at step {step}; checkpoint saved to {path}. Resume with the same call and "
                        f"TrainConfig(resume='auto', output_dir={config.output_dir!r})")
                if config.save_every and step % config.save_every == 0:
                    checkpoint()
                if eval_loader is not None and config.eval_every and step % config.eval_every == 0:
                    run["stopped_early"] = evaluate_now()
                if step >= local_steps or run["stopped_early"]:
                    finished_epoch = run["batch_in_epoch"] >= len(train_loader)
                    break
            if finished_epoch:
                run["epoch"] += 1
                run["batch_in_epoch"] = 0
                if eval_loader is not None and not config.eval_every and not run["stopped_early"]:
                    run["stopped_early"] = evaluate_now()
    progress.close()
    seconds = time.perf_counter() - started - eval_seconds
    # the final metrics describe the final weights: evaluate again when the last evaluation came earlier
    # (max_steps stopping mid-epoch after an end-of-epoch evaluation)
    if eval_loader is not None and (not run["metrics"] or run.get("metrics_step") != run["step"]):
        evaluate_now()
    if config.load_best and run["best_step"] is not None and run["best_step"] != run["step"]:
        if best_weights is None:  # best seen before a resume: read it from its checkpoint
            best_weights = _read_checkpoint_weights(Path(run["best_checkpoint"]))
        unwrapped.load_state_dict(best_weights, strict=False)
        accelerator.print(f"restored the best weights (step {run['best_step']}, {metric_name}={run['best']:.4f})")
    result = {
        "train_loss": run["last_loss"] if run["last_loss"] is not None else float("nan"),
        **run["metrics"],
        "steps": run["step"],
        "epochs": run["epoch"],
        "world_size": accelerator.num_processes,
        "train_seconds": seconds,
        "train_examples_per_second": examples * accelerator.num_processes / seconds,
        "train_tokens_per_second": tokens * accelerator.num_processes / seconds,
        # of the tokens the model computed, the share that were real (not padding): 1.0 when packed
        "train_real_token_fraction": tokens / max(processed, 1),
    }
    if auto_batch is not None:
        result.update(batch_size=config.batch_size, grad_accum=config.grad_accum)
    if run["skipped_steps"]:
        result["skipped_steps"] = run["skipped_steps"]
    if encoded.truncated_rows:
        result["train_truncated_rows"] = encoded.truncated_rows
    if metric_name is not None and run["best_step"] is not None:
        result.update({"best_step": run["best_step"], f"best_{metric_name}": run["best"],
                       "stopped_early": run["stopped_early"]})
    unwrapped.training_record = {"metrics": result, "train_rows": len(encoded),
                                 "trainable_parameters": unwrapped.parameter_counts()["trainable"],
                                 "eval_rows": len(eval_loader.dataset) if eval_loader is not None else 0,
                                 "config": {k: v for k, v in asdict(config).items() if v is not None}}
    if config.output_dir is not None and accelerator.is_main_process:
        Path(config.output_dir, RUN_FILE).write_text(json.dumps({"finished": True, **result}, indent=2))
    # not end_training(): it destroys the process group, which saving and evaluating still need
    for tracker in accelerator.trackers:
        tracker.finish()
    if config.gradient_checkpointing:
        unwrapped.base_model.gradient_checkpointing_disable()
    # with fp16, prepare() wrapped forward in autocast; inference (predict, evaluate, a reloaded artifact)
    # runs without it, so the trained model must too (seen on an H200 with bf16: logits moved by bf16
    # rounding between the trained model and its own reload)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return result


def _read_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    return {k.removeprefix("module."): v for k, v in weights.items()}
