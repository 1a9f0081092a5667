"""Where training logs go: ``metrics.jsonl`` always (with an ``output_dir``), TensorBoard when installed,
both through Accelerate's tracker API (``accelerator.log``)."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker

from adapters.config.training import TRACKERS  # noqa: F401 (the names report_to accepts)
from adapters.errors import ConfigError


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


NEEDS_FOLDER = ("tensorboard", "aim", "dvclive")  # they write into the run's folder


def trackers_for(output_dir: str | None, report_to: list[str] | None = None) -> list:
    """The trackers a run logs to: ``metrics.jsonl`` whenever there is an ``output_dir``, plus
    ``report_to`` (Accelerate's trackers by name), or by default TensorBoard when it is installed."""
    import accelerate.utils as available

    trackers: list = [JSONLTracker(output_dir)] if output_dir is not None else []
    if report_to is None:
        if output_dir is not None and available.is_tensorboard_available():
            trackers.append("tensorboard")
        return trackers
    for name in report_to:
        if not getattr(available, f"is_{name}_available")():
            raise ConfigError(
                f"report_to={report_to}: {name!r} is not installed (pip install {name.replace('_', '-')})"
            )
        if name in NEEDS_FOLDER and output_dir is None:
            raise ConfigError(f"report_to={name!r} writes its logs into output_dir; set TrainConfig(output_dir=...)")
        trackers.append(name)
    return trackers
