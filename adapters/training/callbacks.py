"""Hooks into the training loop, for users coming from ``transformers.Trainer``.

A callback is an object with any of the methods below (subclass ``Callback`` to get no-op defaults);
``train(..., callbacks=[...])`` calls them on the main process at the matching phase of the loop
(``loop.py``), as the Trainer does, with what they may read and what they may ask:

* ``config``: the run's ``TrainConfig`` (read it; changing it mid-run changes nothing);
* ``state``: the loop's ``TrainState`` (step, epoch, metrics, best so far: ``checkpoint.py``);
* ``control``: a ``Control``; set ``control.should_stop = True`` to end training after the current
  step, as early stopping does, with a final evaluation.

A callback never receives the loop itself: the loop's internals can change without breaking it.

``compute_metrics`` (``train`` and ``evaluate``) is the Trainer's: a function of a
``transformers.EvalPrediction`` (``predictions``: the head's gathered outputs, e.g. the logits, and
``label_ids``) returning a dict of numbers, added to the head's own metrics with the ``eval_`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Control:
    """What a callback may ask of the loop."""

    should_stop: bool = False
    """End training after the current step (a final evaluation follows, as with early stopping)."""


class Callback:
    """No-op hooks; override the ones you need."""

    def on_train_begin(self, config: Any, state: Any, control: Control) -> None:
        """After setup (data, optimizer, resume), before the first step."""

    def on_log(self, config: Any, state: Any, control: Control, logs: dict[str, float]) -> None:
        """Each time the training loss is logged (every ``log_every`` steps)."""

    def on_evaluate(self, config: Any, state: Any, control: Control, metrics: dict[str, float]) -> None:
        """After each evaluation, with its ``eval_*`` metrics."""

    def on_save(self, config: Any, state: Any, control: Control, path: Path) -> None:
        """After a checkpoint is written to ``path``."""

    def on_train_end(self, config: Any, state: Any, control: Control, result: dict[str, float]) -> None:
        """At the end, with the result ``train`` returns."""


def call(callbacks: Iterable[Any], event: str, config: Any, state: Any, control: Control, *args: Any) -> None:
    """Call ``event`` on every callback that has it (the caller runs it on the main process only)."""
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(config, state, control, *args)
