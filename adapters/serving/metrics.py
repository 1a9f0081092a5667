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
        queue = Gauge("qadapters_queue_inputs", "Inputs waiting for a batch", ["model"], registry=self.registry)
        for name in models:
            queue.labels(model=name).set_function(_depth_of(queue_depth, name))

    def add_generation(self, schedulers: dict[int, Any]) -> None:
        """The continuous batches' own figures, per shared base: sequences running and waiting (gauges), rows
        per decoding step and seconds to the first token (histograms), tokens generated (a counter)."""
        from prometheus_client import Counter, Gauge, Histogram

        running = Gauge("qadapters_generation_running", "Sequences decoding", ["base"], registry=self.registry)
        waiting = Gauge("qadapters_generation_waiting", "Sequences waiting", ["base"], registry=self.registry)
        steps = Histogram(
            "qadapters_generation_batch_rows",
            "Rows per decoding step",
            ["base"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        first = Histogram(
            "qadapters_generation_first_token_seconds",
            "Time from a generation's arrival to its first token",
            ["base"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        tokens = Counter("qadapters_generated_tokens", "Tokens generated", ["base"], registry=self.registry)
        for index, scheduler in schedulers.items():
            base = str(index)
            running.labels(base=base).set_function(_running(scheduler))
            waiting.labels(base=base).set_function(_waiting(scheduler))
            observers = {
                "batch_size": steps.labels(base=base).observe,
                "first_token": first.labels(base=base).observe,
                "generated_tokens": tokens.labels(base=base).inc,
            }
            scheduler.observe = lambda name, value, o=observers: o[name](value)

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
