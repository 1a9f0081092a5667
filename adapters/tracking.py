"""Where training logs go: ``metrics.jsonl`` always (with an ``output_dir``), TensorBoard when installed,
both through Accelerate's tracker API (``accelerator.log``)."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker


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


def trackers_for(output_dir: str | None) -> list:
    """The trackers a run with this ``output_dir`` logs to (none without one)."""
    if output_dir is None:
        return []
    from accelerate.utils import is_tensorboard_available

    trackers: list = [JSONLTracker(output_dir)]
    if is_tensorboard_available():
        trackers.append("tensorboard")
    return trackers
