"""The training loop, in phases, on Accelerate.

``TrainingLoop(model, train_data, eval_data, config).run()`` is what ``train()`` calls. Its phases,
in order (the layout of torchtune's recipes and litgpt's ``fit``):

* **setup**: encode the data, choose the batch size (``auto_batch_size``), create the Accelerator
  (processes, gradient accumulation, fp16 scaler, trackers), check the output folder, build the
  loaders, the optimizer and the schedule, and restore a checkpoint when resuming, or else fit the
  head on the frozen features first (``linear_probe``, LP-FT; ``probe.py``);
* **epoch_batches**: one epoch's batches, in the seeded order; a run resumed mid-epoch gets the
  same order minus the batches already done;
* **train_step**: forward (under our bf16 autocast), the non-finite loss guard, backward, clipping,
  optimizer and scheduler steps, with Accelerate's gradient accumulation;
* **after_step**: logging, the stop signal, periodic checkpoints and evaluations;
* **evaluate** (metrics, early stopping, best weights) and **checkpoint** (``checkpoint.py``);
* **finish**: the final evaluation, the best weights, the result and the training record.

Everything a checkpoint must restore that is not a tensor lives in ``self.state``, a
``checkpoint.TrainState``. Only adapter and head parameters reach the optimizer, so the frozen
(quantized) base never changes.

Robustness: periodic atomic checkpoints and exact resume (``resume="auto"``), a checkpoint then a
clear exit on SIGTERM/SIGINT, a stop (or skip) on a NaN/inf loss before it reaches the weights,
early stopping with the best weights restored, and no silent reuse of an output folder that holds
an earlier run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from adapters.backbone import allocator
from adapters.backbone.loading import cpu_only, enable_checkpointing, process_state
from adapters.backbone.precision import resolve_mixed_precision
from adapters.backbone.sharded import full_trainable_state, load_trainable_state
from adapters.config.training import TrainConfig
from adapters.data.encoding import encode_dataset
from adapters.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from adapters.files import probe_writable
from adapters.sharding.fsdp import ShardReport, accelerate_fsdp_requested, check_fsdp, shard
from adapters.sharding.load import launched_world
from adapters.training.batch_size import choose_batch_size
from adapters.training.callbacks import Control, call
from adapters.training.checkpoint import (
    TrainState,
    check_output_dir,
    complete_checkpoints,
    keep_trainable_only,
    load_newest_good,
    output_lock,
    prepare_output_dir,
    read_checkpoint_weights,
    resolve_resume,
    save_checkpoint,
    step_checkpoint,
    write_run_record,
)
from adapters.training.compiled import compile_blocks
from adapters.training.evaluation import evaluate_loader, prefixed
from adapters.training.fsdp import full_state_optimizer
from adapters.training.loaders import eval_loader, eval_rows, inference_loader, train_loader
from adapters.training.optim import build_optimizer, lr_schedule
from adapters.training.probe import check_probe, fit_head
from adapters.training.tracking import trackers_for

logger = logging.getLogger(__name__)


class TrainingLoop:
    """One training run of ``model`` (an unwrapped ``AdaptedModel``) on ``train_data``."""

    def __init__(
        self, model, train_data, eval_data=None, config: TrainConfig | None = None, compute_metrics=None, callbacks=()
    ):
        config = config or TrainConfig()
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be an adapters.TrainConfig, got {type(config).__name__}")
        if not model.trainable_parameters():
            raise ConfigError("the model has no trainable parameters")
        if (config.early_stopping_metric or config.load_best) and eval_data is None:
            raise ConfigError("early stopping and load_best need eval data: pass eval_data to train()")
        if config.linear_probe:
            check_probe(model)
        if process_state().is_main_process:  # the main process owns output_dir: it checks, clears and writes
            check_output_dir(config.output_dir, config.resume, config.overwrite)  # before any slow work
            if config.output_dir is not None:
                probe_writable(config.output_dir, "output_dir")
        self.precision = resolve_mixed_precision(config.mixed_precision, model.device.type)
        if config.mixed_precision == "no" and model.device.type == "cpu" and model.base.compute_dtype != torch.float32:
            logger.warning(
                "mixed_precision='no' turns autocast off, but the base computes in %s (its dtype at load, the "
                "default on this CPU); for fp32 throughout, load it with adapt(..., dtype='float32')",
                model.base.compute_dtype,
            )
        # a model adapt(fsdp=True) loaded sharded trains sharded whatever the config says: it has no whole copy
        self.fsdp = config.fsdp or accelerate_fsdp_requested() or model.shard_report is not None
        if self.fsdp:
            check_fsdp(model.base.quantization, self.precision)
        self.shard_report: ShardReport | None = None
        self.model = self.unwrapped = model
        self.train_data, self.eval_data, self.config = train_data, eval_data, config
        self.state = TrainState()
        self.metric_name = config.early_stopping_metric or ("eval_loss" if config.load_best else None)
        self.best_weights: dict | None = None
        self.auto_batch: dict | None = None
        self.eval_seconds = 0.0  # kept out of the training time and throughput
        self.counts = {"examples": 0, "tokens": 0, "processed": 0}
        self.compute_metrics, self.callbacks = compute_metrics, list(callbacks or ())
        self.control = Control()  # what callbacks may ask: stop after this step
        self.probe: dict[str, float] = {}

    def _callback(self, event: str, *args: Any) -> None:
        """``event`` on every callback, on the main process, with the config, state and control."""
        if self.accelerator.is_main_process:
            call(self.callbacks, event, self.config, self.state, self.control, *args)

    def run(self) -> dict[str, float]:
        with output_lock(self.config.output_dir, process_state().is_main_process):
            return self._run()

    def _run(self) -> dict[str, float]:
        if self.model.device.type == "cpu":
            allocator.keep_freed_memory()  # each step's activations reuse freed pages (backbone/allocator.py)
        self.setup()
        self._callback("on_train_begin")
        with _StopSignal() as self.stop_signal:
            self.fit()
        result = self.finish()
        self._callback("on_train_end", result)
        return result

    # --- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate.utils import set_seed

        self.encoded = encode_dataset(
            self.train_data,
            self.model.tokenizer,
            self.model.head_spec,
            self.config.text_column,
            self.config.label_column,
            self.model.max_length,
            "train dataset",
        )
        if self.config.auto_batch_size:
            self._choose_batch_size()
        self._setup_accelerator()
        self.resume_from = resolve_resume(self.config.resume, self.config.output_dir)
        prepare_output_dir(  # a resumed run clears only a killed run's partial checkpoint
            self.config.output_dir, self.config.resume, self.config.overwrite, self.accelerator.is_main_process
        )
        self.accelerator.wait_for_everyone()
        set_seed(self.config.seed)
        self._setup_data()
        if self.resume_from is None:  # a resumed run's adapter and head come from its checkpoint
            self.start_adapter_from_data()  # on the whole model, before any sharding
        if self.config.linear_probe and self.resume_from is None:
            self.probe_head()
        self._setup_optimizer()
        if self.resume_from is not None:
            trainable = {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}
            self.state, self.resume_from = load_newest_good(
                self.accelerator,
                self.config.resume,
                self.resume_from,
                self.config.output_dir,
                trainable,
                self.unwrapped if self.fsdp else None,
            )
            self.accelerator.print(f"resumed from {self.resume_from} at step {self.state.step}")
        if self.trackers:  # metrics.jsonl is appended to: a resumed run's log goes on where it stopped
            self.accelerator.init_trackers("qadapters", config=_set_fields(self.config))
        self.accelerator.print(
            f"training on {self.accelerator.num_processes} process(es) ({self.accelerator.device}), "
            f"{len(self.encoded)} examples, effective batch "
            f"{self.config.batch_size * self.accelerator.num_processes * self.config.grad_accum}, "
            f"{self.total_steps} steps"
        )

    def _choose_batch_size(self) -> None:
        batch_size, grad_accum, self.auto_batch = choose_batch_size(
            self.model, self.encoded, self.config, launched_world()
        )
        self.config = replace(self.config, batch_size=batch_size, grad_accum=grad_accum)
        found = self.auto_batch
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"auto_batch_size: {batch_size} per device x {grad_accum} accumulation steps (requested "
                f"{found['requested_per_device']} per device per step; sequences up to {found['seq_len']} tokens; "
                f"estimate {found['estimate_bytes'] / 2**30:.2f} GiB of {found['free_bytes'] / 2**30:.2f} GiB free)"
            )

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        config = self.config
        self.trackers = trackers_for(config.output_dir, config.report_to)
        # bf16 autocast is ours, around the training forward only: Accelerate's would wrap the model's forward
        # for good and pin one precision per process (a second model trained in fp32 in the same process is
        # refused; seen on an H200). fp16 needs its loss scaler, so that one stays Accelerate's.
        # "auto" follows the model's device: a model kept on the CPU of a GPU machine trains in fp32.
        precision = self.precision
        self.autocast = torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        # FSDP is ours (sharding/fsdp.py): Accelerate must not wrap the model in its own FSDP or DDP
        fsdp_env = os.environ.pop("ACCELERATE_USE_FSDP", None)
        try:
            self.accelerator = Accelerator(
                cpu=cpu_only(),
                gradient_accumulation_steps=config.grad_accum,
                mixed_precision="fp16" if precision == "fp16" else "no",
                log_with=self.trackers or None,
                project_dir=config.output_dir,
                # the same shuffled order whatever the number of processes: runs are comparable
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            )
        finally:
            if fsdp_env is not None:
                os.environ["ACCELERATE_USE_FSDP"] = fsdp_env
        if self.fsdp and self.accelerator.num_processes == 1:
            self.accelerator.print(
                "fsdp=True but this run has 1 process: there is nothing to shard, so it trains unsharded. "
                "Launch it with torchrun --nproc-per-node N (or accelerate launch) to shard over N processes"
            )
            self.fsdp = False
        launched = launched_world()
        if launched != self.accelerator.num_processes:
            raise ConfigError(
                f"launched with WORLD_SIZE={launched} but Accelerate runs "
                f"{self.accelerator.num_processes} process(es): "
                f"each would train alone. On CPUs, create Accelerate state with cpu=True (or let adapters create it: "
                f"do not call PartialState()/Accelerator() before adapters.adapt)"
            )
        if self.auto_batch is not None and self.accelerator.num_processes > 1:
            # every rank must step together: all take the smallest batch any of them can hold
            sizes = self.accelerator.gather(torch.tensor([config.batch_size], device=self.accelerator.device))
            smallest = int(sizes.min())
            if smallest != config.batch_size:
                self.config = replace(
                    config, batch_size=smallest, grad_accum=config.batch_size * config.grad_accum // smallest
                )
                self.accelerator.gradient_accumulation_steps = self.config.grad_accum

    def _setup_data(self) -> None:
        processes = self.accelerator.num_processes
        self.eval_loader = None
        if self.eval_data is not None:
            rows = eval_rows(self.model.head_spec, self.config.eval_batch_size, self.config.batch_size, processes)
            self.eval_loader = eval_loader(
                self.model, self.eval_data, self.config.text_column, self.config.label_column, rows, processes
            )
        self.train_loader = train_loader(self.model, self.encoded, self.config, processes)

    def _setup_optimizer(self) -> None:
        config, accelerator = self.config, self.accelerator
        if config.gradient_checkpointing:
            enable_checkpointing(self.unwrapped.backbone)
        if self.fsdp:
            self.shard_report = self.unwrapped.shard_report or shard(
                self.unwrapped, self.precision, accelerator.num_processes
            )
            accelerator.print(self.shard_report.summary())
            # the sharded model itself, not a DDP wrapper; the optimizer's state is saved whole
            self.optimizer, self.train_loader = accelerator.prepare(
                build_optimizer(self.unwrapped, config), self.train_loader
            )
            full_state_optimizer(self.optimizer.optimizer, self.unwrapped)  # after prepare(), which reloads it
        else:
            optimizer = build_optimizer(self.unwrapped, config)
            self.model, self.optimizer, self.train_loader = accelerator.prepare(
                self.model, optimizer, self.train_loader
            )
        if config.compile:  # after sharding, as FSDP2 asks
            accelerator.print(compile_blocks(self.unwrapped.backbone).summary())
        if self.eval_loader is not None:
            self.eval_loader = accelerator.prepare(self.eval_loader)
        # the prepared loader is this process's shard: 1/N of the data per epoch
        per_epoch = math.ceil(len(self.train_loader) / config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        self.scheduler = accelerator.prepare(
            torch.optim.lr_scheduler.LambdaLR(
                self.optimizer,
                lr_schedule(
                    config.scheduler,
                    int(config.warmup_ratio * self.total_steps),
                    self.total_steps,
                    accelerator.num_processes,
                ),
            )
        )
        accelerator.register_save_state_pre_hook(keep_trainable_only(accelerator.unwrap_model))

    def start_adapter_from_data(self) -> None:
        """An adapter that starts from data (LoRA's EVA) reads its layer inputs on the first training rows, the
        same rows on every process, so every process starts alike."""
        adapter = self.unwrapped.adapter
        if adapter is None or not adapter.starts_from_data() or self.unwrapped.adapter_started:
            return  # a loaded artifact, or a model already trained once, keeps its weights
        from adapters.methods.lora_init import EVA_ROWS, padded_batches

        rows = self.encoded[: min(EVA_ROWS, len(self.encoded))]["input_ids"]
        if not rows or not isinstance(rows[0][0], int):
            raise ConfigError(f"{adapter.describe()} starts from one token sequence per row; this head's rows differ")
        pad = self.unwrapped.tokenizer.pad_token_id or 0
        batches = padded_batches(rows, pad, self.config.batch_size, self.unwrapped.device)
        started, training = time.perf_counter(), self.unwrapped.training
        self.unwrapped.eval()  # the layer inputs as inference sees them (no dropout)
        with torch.no_grad():
            adapter.initialize_from_data(self.unwrapped, batches)
        self.unwrapped.train(training)
        self.unwrapped.adapter_started = True
        seconds = time.perf_counter() - started
        self.accelerator.print(
            f"{adapter.describe()}: started from the first {len(rows)} training rows ({seconds:.0f} s)"
        )

    def probe_head(self) -> None:
        """LP-FT's first stage: the head fitted on the frozen features of the training rows (``probe.py``)."""
        started = time.perf_counter()
        accelerator = self.accelerator
        # each process reads its own slice of the rows, unprepared: a prepared loader would even out the
        # shards by repeating rows, which the fit would then count twice
        shard = (
            self.encoded.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
            if accelerator.num_processes > 1
            else self.encoded
        )
        loader = inference_loader(self.unwrapped, shard, self.config.eval_batch_size)
        self.probe = fit_head(self.unwrapped, loader, accelerator, self.config.progress)
        self.probe["probe_seconds"] = time.perf_counter() - started
        self.accelerator.print(
            f"linear probe on {self.probe['probe_rows']} rows: head loss "
            f"{self.probe['probe_loss_before']:.4f} -> {self.probe['probe_loss_after']:.4f} "
            f"({self.probe['probe_seconds']:.0f} s)"
        )

    # --- the epochs -------------------------------------------------------------------------------

    def fit(self) -> None:
        from tqdm.auto import tqdm

        state = self.state
        self.progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="train",
            disable=not (self.config.progress and self.accelerator.is_local_main_process),
        )
        self.model.train()
        self.started = time.perf_counter()
        while state.step < self.total_steps and not state.stopped_early:
            finished_epoch = True
            for batch in self.epoch_batches():
                state.batch_in_epoch += 1
                if not self.train_step(batch):
                    continue
                self.after_step()
                if state.step >= self.total_steps or state.stopped_early:
                    finished_epoch = state.batch_in_epoch >= len(self.train_loader)
                    break
            if finished_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
                if self.eval_loader is not None and not self.config.eval_every and not state.stopped_early:
                    state.stopped_early = self.evaluate()
        self.progress.close()
        self.train_seconds = time.perf_counter() - self.started - self.eval_seconds

    def epoch_batches(self) -> Iterator[dict]:
        """This epoch's batches; resuming mid-epoch, the same order minus the batches already done."""
        self.train_loader.set_epoch(self.state.epoch)  # type: ignore[attr-defined]  # Accelerate's loader
        if not self.state.batch_in_epoch:
            return iter(self.train_loader)
        # Starting an iterator draws from the global RNG; the run that saved this checkpoint drew it
        # at the start of the epoch, so restore the RNG state after drawing again. (Accelerate's
        # loaders are generators: the draw happens at the first batch.)
        rng = torch.get_rng_state()
        batches = iter(self.accelerator.skip_first_batches(self.train_loader, self.state.batch_in_epoch))
        first = next(batches, None)
        torch.set_rng_state(rng)
        return itertools.chain([first] if first is not None else [], batches)

    def train_step(self, batch: dict) -> bool:
        """Forward and backward one batch; True when it completed an optimizer step."""
        accelerator, config, state = self.accelerator, self.config, self.state
        with accelerator.accumulate(self.model):
            with self.autocast:
                loss = self.model(**batch)["loss"]
            if _any_rank(accelerator, not bool(torch.isfinite(loss.detach()))):
                self._nonfinite_loss(loss)
                return False
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self._count(batch)
        state.running += loss.detach().float().item()
        state.running_count += 1
        if not accelerator.sync_gradients:
            return False
        state.step += 1
        self.progress.update(1)
        return True

    def _nonfinite_loss(self, loss: torch.Tensor) -> None:
        """Stop before a NaN/inf loss reaches the weights, or skip its step (``skip_nonfinite``)."""
        if not self.config.skip_nonfinite:
            saved = complete_checkpoints(self.config.output_dir) if self.config.output_dir else []
            where = saved[-1] if saved else None
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.state.step + 1}; the weights were not updated. "
                f"Last good checkpoint: {where or 'none saved (set save_every)'}. Lower the learning "
                f"rate, check the data, or pass skip_nonfinite=True to skip such steps"
            )
        self.optimizer.zero_grad()
        self.state.skipped_steps += 1

    def _count(self, batch: dict) -> None:
        self.counts["examples"] += batch["labels"].shape[0]  # texts, not windows or choices
        real = batch["segments"] >= 0 if "segments" in batch else batch["attention_mask"]
        self.counts["tokens"] += int(real.sum())
        self.counts["processed"] += batch["input_ids"].numel()

    def after_step(self) -> None:
        """Log, obey a stop signal, checkpoint and evaluate when due."""
        config, state, accelerator = self.config, self.state, self.accelerator
        step = state.step
        if step % config.log_every == 0 or step == self.total_steps:
            self._log_loss()
        if _any_rank(accelerator, self.stop_signal.signum is not None):
            if config.output_dir is None:
                raise TrainingInterrupted(f"interrupted at step {step}; no output_dir, so nothing was saved")
            path = self.checkpoint()
            raise TrainingInterrupted(
                f"interrupted at step {step}; checkpoint saved to {path}. Resume with the same run and "
                f"resume='auto' (TrainConfig(resume='auto', output_dir={config.output_dir!r}); on the command "
                f"line: qadapters train CONFIG train.resume=auto)"
            )
        if config.save_every and step % config.save_every == 0:
            self.checkpoint()
        if self.eval_loader is not None and config.eval_every and step % config.eval_every == 0:
            state.stopped_early = self.evaluate()
        if _any_rank(accelerator, self.control.should_stop):
            state.stopped_early = True

    def _log_loss(self) -> None:
        state, accelerator = self.state, self.accelerator
        mean = torch.tensor(state.running / max(state.running_count, 1), device=accelerator.device)
        state.last_loss = float(accelerator.reduce(mean, "mean"))
        state.running, state.running_count = 0.0, 0
        self.progress.set_postfix(loss=f"{state.last_loss:.4f}")
        # the scheduler's groups: the head's first, then the adapter's (per block with layer_lr_decay); the
        # logged rate is the base rate (config.lr, scheduled), the head's is named as such
        rates = self.scheduler.get_last_lr()
        logs = {
            "train_loss": state.last_loss,
            "lr": self._base_rate(rates),
            "head_lr": rates[0],
            "epoch": self.epochs_done(),
        }
        accelerator.log(logs, step=state.step)
        self._callback("on_log", logs)

    def _base_rate(self, rates: list[float]) -> float:
        """The scheduled ``config.lr`` now: the head's rate scaled back when the head has its own rate."""
        config = self.config
        return rates[0] * config.lr / (config.head_lr or config.lr)

    def epochs_done(self) -> float:
        """Epochs trained so far, fractional: a run that stops mid-epoch says how far it got."""
        batches = len(self.train_loader)
        return round(self.state.epoch + (self.state.batch_in_epoch / batches if batches else 0.0), 4)

    # --- evaluation and checkpoints ---------------------------------------------------------------

    def evaluate(self) -> bool:
        """Evaluate, log, track the best; True when early stopping says stop."""
        state, accelerator = self.state, self.accelerator
        started = time.perf_counter()
        metrics = evaluate_loader(self.model, self.eval_loader, accelerator, self.compute_metrics)
        state.metrics = prefixed(metrics, "eval")
        state.metrics_step = state.step
        self.eval_seconds += time.perf_counter() - started
        accelerator.log(state.metrics, step=state.step)
        accelerator.print(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in state.metrics.items()))
        self._callback("on_evaluate", state.metrics)
        return self._early_stopping()

    def _early_stopping(self) -> bool:
        """Track the best evaluation (its weights kept, its checkpoint protected); True when it is time to stop."""
        name, state, config = self.metric_name, self.state, self.config
        if name is None:
            return False
        if name not in state.metrics:
            raise ConfigError(
                f"early_stopping_metric={name!r} is not an eval metric; choose one of {sorted(state.metrics)}"
            )
        value = state.metrics[name]
        minimise = name.endswith("loss")
        if state.best is None or (value < state.best if minimise else value > state.best):
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            self.best_weights = full_trainable_state(self.unwrapped)
            if config.output_dir is not None:
                self.checkpoint(protect_best=True)
            return False
        state.bad_evals += 1
        return config.early_stopping_metric is not None and state.bad_evals >= config.early_stopping_patience

    def checkpoint(self, protect_best: bool = False) -> Path:
        """Save a resumable checkpoint of this step (``protect_best``: it holds the best weights so far)."""
        state, output_dir = self.state, self.config.output_dir
        saved = replace(state)
        if protect_best:
            saved.best_checkpoint = str(step_checkpoint(output_dir, state.step))
        protect = Path(saved.best_checkpoint) if saved.best_checkpoint else None
        path = save_checkpoint(
            self.accelerator, output_dir, saved, self.config.keep_last, protect, self.unwrapped if self.fsdp else None
        )
        state.best_checkpoint = saved.best_checkpoint
        self._callback("on_save", path)
        return path

    # --- the end ----------------------------------------------------------------------------------

    def finish(self) -> dict[str, float]:
        """Final metrics (of the final, or best, weights), the result, the training record; unwrap the model."""
        state, accelerator, config = self.state, self.accelerator, self.config
        # the final metrics describe the final weights: evaluate again when the last evaluation came earlier
        # (max_steps stopping mid-epoch after an end-of-epoch evaluation)
        if self.eval_loader is not None and (not state.metrics or state.metrics_step != state.step):
            self.evaluate()
        if config.load_best and state.best_step is not None and state.best_step != state.step:
            if self.best_weights is None:  # best seen before a resume: read it from its checkpoint
                self.best_weights = read_checkpoint_weights(Path(str(state.best_checkpoint)))
            load_trainable_state(self.unwrapped, self.best_weights)
            accelerator.print(
                f"restored the best weights (step {state.best_step}, {self.metric_name}={state.best:.4f})"
            )
        result = self._result()
        self.unwrapped.training_record = {
            "metrics": result,
            "train_rows": len(self.encoded),
            "trainable_parameters": self.unwrapped.parameter_counts()["trainable"],
            "eval_rows": len(self.eval_loader.dataset) if self.eval_loader is not None else 0,  # type: ignore[arg-type]
            "config": _set_fields(config),
        }
        if config.output_dir is not None and accelerator.is_main_process:
            write_run_record(config.output_dir, finished=True, artifact=None, **result)
        # not end_training(): it destroys the process group, which saving and evaluating still need
        for tracker in accelerator.trackers:
            tracker.finish()
        if config.gradient_checkpointing:
            self.unwrapped.backbone.gradient_checkpointing_disable()
        # with fp16, prepare() wrapped forward in autocast; inference (predict, evaluate, a reloaded artifact)
        # runs without it, so the trained model must too (seen on an H200 with bf16: logits moved by bf16
        # rounding between the trained model and its own reload)
        accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return result

    def _result(self) -> dict[str, float]:
        state, processes, seconds = self.state, self.accelerator.num_processes, self.train_seconds
        result = {
            "train_loss": state.last_loss if state.last_loss is not None else float("nan"),
            **state.metrics,
            "steps": state.step,
            "epochs": self.epochs_done(),
            "world_size": processes,
            "train_seconds": seconds,
            "train_examples_per_second": self.counts["examples"] * processes / seconds,
            "train_tokens_per_second": self.counts["tokens"] * processes / seconds,
            # of the tokens the model computed, the share that were real (not padding): 1.0 when packed
            "train_real_token_fraction": self.counts["tokens"] / max(self.counts["processed"], 1),
        }
        if self.auto_batch is not None:
            result.update(batch_size=self.config.batch_size, grad_accum=self.config.grad_accum)
        result.update(self.probe)
        if self.shard_report is not None:
            result.update(self.shard_report.metrics())
        if state.skipped_steps:
            result["skipped_steps"] = state.skipped_steps
        if self.encoded.truncated_rows:
            result["train_truncated_rows"] = self.encoded.truncated_rows
        if self.metric_name is not None and state.best_step is not None:
            result.update(
                {
                    "best_step": state.best_step,
                    f"best_{self.metric_name}": state.best,
                    "stopped_early": state.stopped_early,
                }
            )
        return result


def _set_fields(config: TrainConfig) -> dict:
    """The config's fields that are set (None ones left out), as logged and recorded."""
    return {k: v for k, v in asdict(config).items() if v is not None}


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
