"""Prometheus metrics of one server (``GET /metrics``, the text format ``prometheus_client`` writes):
requests by model and status, their latency, the inputs waiting per model, and the batch sizes run; for
generation, per shared base, the sequences running and waiting, rows per decoding step, the time to the
first token and the tokens generated.
Each app has its own registry, so two apps in one process (the tests) never share counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's counters, histograms and gauges; ``render`` gives the exposition text."""

    def __init__(self, queue_depth: Callable[[str], int], models: list[str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "qadapters_requests",
            "Prediction requests answered, by model and HTTP status",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qadapters_request_seconds",
            "Time from a request's arrival to its answer",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "qadapters_batch_inputs",
            "Inputs per batch run through a model",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge("qadapters_queue_inputs", "Inputs waiting for a batch", ["model"], registry=self.registry)
        self.queue_depth = queue_depth
        for name in models:
            self.watch_model(name)
        self._generation: dict[str, Any] | None = None

    def watch_model(self, name: str) -> None:
        """Report ``name``'s queue (an artifact served from the start or loaded at run time)."""
        self.queue.labels(model=name).set_function(_depth_of(self.queue_depth, name))

    def forget_model(self, name: str) -> None:
        """An unloaded artifact's queue gauge leaves the exposition (its counters keep their history)."""
        try:
            self.queue.remove(name)
        except KeyError:
            pass

    def add_generation(self, schedulers: dict[int, Any]) -> None:
        """The continuous batches' own figures, per shared base: sequences running and waiting (gauges), rows
        per decoding step and seconds to the first token (histograms), tokens generated (a counter)."""
        for index, scheduler in schedulers.items():
            self.watch_base(index, scheduler)

    def watch_base(self, index: int, scheduler: Any) -> None:
        """Report the continuous batch of base ``index`` (also one whose first generative artifact was loaded
        at run time)."""
        metrics = self._generation_metrics()
        base = str(index)
        metrics["running"].labels(base=base).set_function(_running(scheduler))
        metrics["waiting"].labels(base=base).set_function(_waiting(scheduler))
        observers = {
            "batch_size": metrics["steps"].labels(base=base).observe,
            "first_token": metrics["first"].labels(base=base).observe,
            "generated_tokens": metrics["tokens"].labels(base=base).inc,
        }
        scheduler.observe = lambda name, value, o=observers: o[name](value)

    def _generation_metrics(self) -> dict[str, Any]:
        from prometheus_client import Counter, Gauge, Histogram

        if self._generation is None:
            registry = self.registry
            self._generation = {
                "running": Gauge("qadapters_generation_running", "Sequences decoding", ["base"], registry=registry),
                "waiting": Gauge("qadapters_generation_waiting", "Sequences waiting", ["base"], registry=registry),
                "steps": Histogram(
                    "qadapters_generation_batch_rows", "Rows per decoding step", ["base"], buckets=BATCH_BUCKETS,
                    registry=registry,
                ),
                "first": Histogram(
                    "qadapters_generation_first_token_seconds", "Time from a generation's arrival to its first token",
                    ["base"], buckets=LATENCY_BUCKETS, registry=registry,
                ),
                "tokens": Counter("qadapters_generated_tokens", "Tokens generated", ["base"], registry=registry),
            }  # fmt: skip
        return self._generation

    def answered(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model=model, status=str(status)).inc()
        self.latency.labels(model=model).observe(seconds)

    def batch_observer(self, model: str) -> Callable[[int], None]:
        histogram = self.batch_size.labels(model=model)
        return histogram.observe

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _running(scheduler: Any) -> Callable[[], float]:
    return lambda: float(scheduler.running)


def _waiting(scheduler: Any) -> Callable[[], float]:
    return lambda: float(len(scheduler.waiting))


def _depth_of(queue_depth: Callable[[str], int], name: str) -> Callable[[], float]:
    return lambda: float(queue_depth(name))
