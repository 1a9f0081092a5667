"""``train`` and ``evaluate``: the one-call entries to the loop (``loop.py``) and to held-out metrics
(``evaluation.py``), with ``TrainConfig`` (``config/training.py``) saying how."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from adapters.config.training import TrainConfig
from adapters.model import AdaptedModel
from adapters.training.evaluation import evaluate
from adapters.training.loop import TrainingLoop

__all__ = ["TrainConfig", "evaluate", "train"]


def train(
    model: AdaptedModel,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    compute_metrics: Callable[[Any], dict[str, float]] | None = None,
    callbacks: Iterable[Any] = (),
) -> dict[str, float]:
    """Train ``model``'s adapter and head on ``train_data``; evaluate on ``eval_data``.

    Returns the final metrics: ``train_loss``, ``eval_accuracy``, ``eval_macro_f1``, ``eval_loss``
    (when there is eval data), ``steps``, ``world_size``, ``train_seconds``,
    ``train_examples_per_second`` and, with early stopping, ``best_step``/``best_<metric>``.
    ``compute_metrics`` adds metrics of your own to every evaluation; ``callbacks`` are called on log,
    evaluate, save, and at the start and end (``callbacks.py``), as with ``transformers.Trainer``.
    """
    return TrainingLoop(model, train_data, eval_data, config, compute_metrics, callbacks).run()
