"""Hooks into the training loop, for users coming from ``transformers.Trainer``.

A callback is an object with any of the methods below (subclass ``Callback`` to get no-op defaults);
``train(..., callbacks=[...])`` calls them on the main process at the matching phase of the loop
(``loop.py``). ``loop`` is the running ``TrainingLoop``: ``loop.state`` (a ``TrainState``: step, epoch,
metrics...), ``loop.config``, ``loop.unwrapped`` (the model). Setting ``loop.should_stop = True``
ends training after the current step, as early stopping does, with a final evaluation.

``compute_metrics`` (``train`` and ``evaluate``) is the Trainer's: a function of a
``transformers.EvalPrediction`` (``predictions``: the head's gathered outputs, e.g. the logits, and
``label_ids``) returning a dict of numbers, added to the head's own metrics with the ``eval_`` prefix.
"""

from __future__ import annotations

from pathlib import Path


class Callback:
    """No-op hooks; override the ones you need."""

    def on_train_begin(self, loop) -> None:
        """After setup (data, optimizer, resume), before the first step."""

    def on_log(self, loop, logs: dict) -> None:
        """Each time the training loss is logged (every ``log_every`` steps)."""

    def on_evaluate(self, loop, metrics: dict) -> None:
        """After each evaluation, with its ``eval_*`` metrics."""

    def on_save(self, loop, path: Path) -> None:
        """After a checkpoint is written to ``path``."""

    def on_train_end(self, loop, result: dict) -> None:
        """At the end, with the result ``train`` returns."""


def call(callbacks, event: str, loop, *args) -> None:
    """Call ``event`` on every callback that has it (main process only)."""
    if not loop.accelerator.is_main_process:
        return
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(loop, *args)
