"""Held-out metrics: every example counted once, whatever the number of processes.

The head spec says what to gather per batch (``eval_outputs``: logits and labels, or per-token
predictions) and how to turn the gathered columns into metrics (``metrics``); Accelerate's
``gather_for_metrics`` drops the duplicates that pad the last batch of each process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adapters.backbone import allocator
from adapters.backbone.loading import cpu_only, eval_mode
from adapters.backbone.sharded import inference_context
from adapters.config.training import TrainConfig
from adapters.data.encoding import IGNORE
from adapters.training.loaders import eval_loader, eval_rows


def evaluate(
    model: Any,
    data: Any,
    config: TrainConfig | None = None,
    accelerator: Any = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    batch_size: int | None = None,
    compute_metrics: Any = None,
    metric_key_prefix: str = "eval",
    generate: bool = True,
) -> dict[str, float]:
    """The head's metrics (and loss) of ``model`` on ``data``, every example counted once, named as
    ``train`` names its evaluations (``eval_accuracy``, ``eval_loss``; ``metric_key_prefix``, as the
    Trainer's ``evaluate`` has it: ``"test"`` gives ``test_accuracy``, ``""`` the bare names).

    Columns and the batch size (rows per batch; default: by a budget of padded tokens) come from the
    keywords, else from ``config`` (a ``TrainConfig``, as ``train`` uses), else the defaults.
    ``compute_metrics``: more metrics from the gathered outputs (see ``callbacks.py``). For a head that
    generates text (``CausalLM``), ``generate`` also scores its greedy answers against the references:
    exact match, token F1 and ROUGE-L (each process generates for every row; off: loss and perplexity only)."""
    from accelerate import Accelerator

    text_column = text_column or (config.text_column if config else "text")
    label_column = label_column or (config.label_column if config else "label")
    if batch_size is None and config is not None:
        batch_size = config.eval_batch_size
    # inference runs without autocast, as predict() and a reloaded artifact do
    accelerator = accelerator or Accelerator(cpu=cpu_only())
    if accelerator.unwrap_model(model).device.type == "cpu":
        allocator.keep_freed_memory()  # each batch's activations reuse freed pages (backbone/allocator.py)
    processes = accelerator.num_processes
    spec = accelerator.unwrap_model(model).head_spec
    batch_size = eval_rows(spec, batch_size, config.batch_size if config else TrainConfig.batch_size, processes)
    loader = eval_loader(accelerator.unwrap_model(model), data, text_column, label_column, batch_size, processes)
    metrics = evaluate_loader(model, accelerator.prepare(loader), accelerator, compute_metrics)
    if generate:
        metrics.update(spec.generated_metrics(accelerator.unwrap_model(model), data, text_column, label_column))
    return prefixed(metrics, metric_key_prefix)


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``{"accuracy": ...}`` -> ``{"eval_accuracy": ...}`` (no prefix: unchanged)."""
    return {f"{prefix}_{k}" if prefix else k: v for k, v in metrics.items()}


def evaluate_loader(model: Any, loader: Any, accelerator: Any, compute_metrics: Any = None) -> dict[str, float]:
    """The head's metrics over ``loader``, every example counted once across processes (and the user's
    ``compute_metrics`` of the gathered outputs)."""
    spec = accelerator.unwrap_model(model).head_spec
    gathered: list[list[torch.Tensor]] = []
    with eval_mode(model), inference_context(model):
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"})["logits"]
            outputs = spec.eval_outputs(logits, batch["labels"])
            # per-token outputs differ in length between processes: pad before gathering
            outputs = tuple(
                accelerator.pad_across_processes(t, dim=1, pad_index=IGNORE)
                if t.dim() > 1 and spec.labels_per_token
                else t
                for t in outputs
            )
            outputs = accelerator.gather_for_metrics(outputs)
            gathered.append([t.cpu() for t in outputs])
    columns = _concatenate(gathered, spec.labels_per_token)
    metrics = spec.metrics(*columns)
    if compute_metrics is not None:
        metrics.update(_user_metrics(compute_metrics, columns, metrics))
    return metrics


def _user_metrics(compute_metrics: Any, columns: list[torch.Tensor], own: dict[str, Any]) -> dict[str, float]:
    """``compute_metrics(EvalPrediction(predictions, label_ids))``, checked: a dict of numbers."""
    from transformers import EvalPrediction

    from adapters.errors import ConfigError

    found = compute_metrics(EvalPrediction(predictions=columns[0].numpy(), label_ids=columns[1].numpy()))
    if not isinstance(found, dict) or not all(isinstance(v, (int, float)) for v in found.values()):
        raise ConfigError(f"compute_metrics must return a dict of numbers, got {found!r:.100}")
    clash = sorted(set(found) & set(own))
    if clash:
        raise ConfigError(f"compute_metrics returned {clash}, which the head computes already; name them otherwise")
    return {k: float(v) for k, v in found.items()}


def _concatenate(gathered: list[list[torch.Tensor]], labels_per_token: bool) -> list[torch.Tensor]:
    """Per-batch outputs -> one tensor per output; per-token ones padded to one length first."""
    columns = []
    for parts in zip(*gathered, strict=False):
        if parts[0].dim() > 1 and labels_per_token:
            longest = max(p.shape[1] for p in parts)
            parts = tuple(F.pad(p, (0, longest - p.shape[1]), value=IGNORE) for p in parts)
        columns.append(torch.cat(parts))
    return columns
