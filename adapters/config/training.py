"""How to train: ``TrainConfig``, validated when built (a leaf module: the YAML config, the memory
estimate and the loop all read it, and it reads none of them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapters.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
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
    layer_lr_decay: float | None = None
    """Layer-wise learning-rate decay in (0, 1]: the adapter in block ``i`` of ``N`` learns at
    ``lr * layer_lr_decay ** (N - 1 - i)`` (the top block at ``lr``; see ``optim.py``). None: one rate."""
    batch_size: int = 16
    """Examples per device per forward pass."""
    eval_batch_size: int | None = None
    """Rows per evaluation batch. Default: rows sorted by length in batches of up to 2,048 padded tokens
    on CPU (8,192 on GPUs) on one process, 4 x batch_size under several (and for CausalLM heads, whose logits
    span the vocabulary)."""
    grad_accum: int = 1
    """Forward passes per optimizer step: effective batch = batch_size x processes x grad_accum."""
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    """``"adamw"`` (torch), ``"adamw_8bit"`` or ``"paged_adamw_8bit"`` (bitsandbytes)."""
    mixed_precision: str = "auto"
    """``"auto"``: bf16 autocast on GPUs that support it and on CPUs where bf16 is native and measured faster
    (``backbone/precision.py``), none elsewhere; or ``"no"``, ``"bf16"``, ``"fp16"``."""
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
    """Batches of rows of similar length (seeded, every row once per epoch; see ``data/batching.py``): far less
    padding for the same optimisation. Not used with packing, whose batches have no padding at all."""
    packing: bool | None = None
    """Padding-free batches for decoders with a pooling head (rows concatenated, positions restarting,
    pooled per row; see ``data/batching.py``). None: on where the model and head allow it."""
    report_to: list[str] | None = None
    """Experiment trackers to log to through Accelerate (``"tensorboard"``, ``"wandb"``, ``"mlflow"``,
    ``"comet_ml"``, ``"aim"``, ``"clearml"``, ``"dvclive"``, ``"swanlab"``, ``"trackio"``); each must be
    installed. None: TensorBoard when installed and there is an ``output_dir``; ``[]``: none.
    ``metrics.jsonl`` is always written into ``output_dir``."""
    linear_probe: bool = False
    """LP-FT: before training, fit the head's linear layer on the frozen model's features of the training
    rows (one pass without gradients, then L-BFGS; see ``training/probe.py``), so training starts from a fitted
    head instead of a random one (or one initialised from label words, which the fit replaces). For
    pooled heads (classification, multi-label, regression, multiple choice with ``scoring="head"``)."""
    fsdp: bool = False
    """Shard the frozen base, the trained parameters, their gradients and optimizer states over the processes
    of a multi-process launch (``torchrun --nproc-per-node N``), with torch's FSDP2 per transformer block, on
    CPUs and GPUs (``sharding/fsdp.py``); each process then holds about 1/N of the weights. With one process
    there is nothing to shard and the run says so. ``accelerate launch --use_fsdp`` asks for the same."""
    compile: bool = False
    """Regional ``torch.compile``: each transformer block compiled, the rest eager; compiled at the first
    step, and kept for evaluation and predict (``training/compiled.py``)."""
    auto_batch_size: bool = False
    """Use the largest per-device batch that fits the device's free memory (memory estimate, then one
    real step that backs off on out-of-memory), with gradient accumulation keeping the effective
    batch ``batch_size x grad_accum`` per device; see ``batch_size.py``."""

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            (self.epochs > 0, f"epochs={self.epochs} must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.head_lr is None or self.head_lr > 0, f"head_lr={self.head_lr} must be > 0"),
            (
                self.layer_lr_decay is None or 0 < self.layer_lr_decay <= 1,
                f"layer_lr_decay={self.layer_lr_decay} must be in (0, 1] (typical: 0.8-0.95) or None",
            ),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (
                self.eval_batch_size is None or self.eval_batch_size >= 1,
                f"eval_batch_size={self.eval_batch_size} must be >= 1",
            ),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)"),
            (self.scheduler in SCHEDULERS, f"scheduler={self.scheduler!r} must be one of {SCHEDULERS}"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (
                self.max_grad_norm is None or self.max_grad_norm > 0,
                f"max_grad_norm={self.max_grad_norm} must be > 0 or None",
            ),
            (self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}"),
            (
                self.mixed_precision in MIXED_PRECISION,
                f"mixed_precision={self.mixed_precision!r} must be one of {MIXED_PRECISION}",
            ),
            (self.log_every >= 1, f"log_every={self.log_every} must be >= 1"),
            (self.eval_every is None or self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1"),
            (self.save_every is None or self.save_every >= 1, f"save_every={self.save_every} must be >= 1"),
            (self.keep_last is None or self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1 or None"),
            (self.early_stopping_patience >= 1, f"early_stopping_patience={self.early_stopping_patience} must be >= 1"),
            (
                self.output_dir is not None or (self.save_every is None and self.resume is None),
                "save_every and resume need an output_dir to keep checkpoints in",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def _check_types(self) -> None:
        """Numbers must be finite numbers and counts integers, before any comparison (``lr="abc"``
        would end in a bare TypeError, ``lr=inf`` would train to NaN)."""
        for name in ("epochs", "lr", "head_lr", "layer_lr_decay", "warmup_ratio", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is None and name in ("head_lr", "layer_lr_decay", "max_grad_norm"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"TrainConfig({name}={value!r}): must be a finite number")
        for name in (
            "max_steps",
            "batch_size",
            "eval_batch_size",
            "grad_accum",
            "seed",
            "log_every",
            "eval_every",
            "save_every",
            "keep_last",
            "early_stopping_patience",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"TrainConfig({name}={value!r}): must be an integer")
        if self.report_to is not None:
            if isinstance(self.report_to, str):
                self.report_to = [self.report_to]
            unknown = [n for n in self.report_to if n not in TRACKERS]
            if not isinstance(self.report_to, list) or unknown:
                raise ConfigError(f"TrainConfig(report_to={self.report_to!r}): name trackers among {list(TRACKERS)}")
            _check_installed(self.report_to)  # here, before any model loads, not when training starts
        if self.packing not in (None, True, False):
            raise ConfigError(f"TrainConfig(packing={self.packing!r}): must be True, False or None (automatic)")


def _check_installed(trackers: list[str]) -> None:
    """Every tracker of ``report_to`` importable (Accelerate's own availability checks)."""
    import accelerate.utils as available

    for name in trackers:
        if not getattr(available, f"is_{name}_available")():
            raise ConfigError(f"report_to={trackers}: {name!r} is not installed (pip install {name.replace('_', '-')})")
