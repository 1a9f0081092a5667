"""Micro-batches per served model, with a bounded queue.

The first request of a batch waits at most ``max_wait_ms`` for others, up to ``max_batch`` inputs, and
the batch runs in one call (sorted by length inside ``AdaptedModel.logits``) in a thread of its own
(``threads.py``). A batch that fails is retried request by request, so one bad request never fails another's. At most
``max_queue`` inputs wait per model: a request that would go past it is refused at once (``QueueFull``,
HTTP 503 with ``Retry-After``) instead of waiting behind work the server cannot finish soon, and a
request whose caller stopped waiting (its timeout) is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters.serving.backbones import Served
from adapters.serving.threads import MODEL_WORK


class QueueFull(Exception):
    """A model's queue holds ``max_queue`` inputs already."""


@dataclass
class Limits:
    """What one server accepts; each bound answers fast instead of queueing without end."""

    max_batch: int = 32
    """Inputs run together in one batch at most."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_texts: int = 256
    """Inputs one request may hold."""
    max_chars: int = 20_000
    """Characters one input may hold."""
    max_queue: int = 1024
    """Inputs waiting per model at most; past it a request is refused with 503 and ``Retry-After``."""
    timeout_s: float = 60.0
    """How long a request may wait for its answer; past it, 504 (and it is dropped if it has not run)."""
    max_loras: int = 8
    """Artifacts loaded at run time (``/v1/load_lora_adapter``) resident at once."""


@dataclass
class _Request:
    inputs: list[Any]
    probabilities: bool
    future: asyncio.Future[list[Any]]
    settings: dict[str, Any]

    def key(self) -> tuple[Any, ...]:
        """Requests batch together only when they ask for the same kind of answer."""
        return (self.probabilities, tuple(sorted(self.settings.items())))


class Batcher:
    """Micro-batches of one artifact's requests: a short wait, a maximum size, one call per batch.
    ``on_batch(size)`` is told the size of every batch run (the server's metrics)."""

    def __init__(self, served: Served, limits: Limits, on_batch: Callable[[int], None] = lambda size: None):
        self.served, self.limits, self.on_batch = served, limits, on_batch
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.waiting = 0  # inputs queued and not yet taken into a batch
        self.task: asyncio.Task[None] | None = None

    async def predict(self, inputs: list[Any], probabilities: bool, **settings: Any) -> list[Any]:
        """The predictions for ``inputs``; ``QueueFull`` at once when the queue has no room for them,
        ``TimeoutError`` after ``timeout_s``."""
        if self.waiting + len(inputs) > self.limits.max_queue:
            raise QueueFull(
                f"{self.waiting} inputs are waiting for {self.served.name!r} (at most {self.limits.max_queue})"
            )
        request = _Request(inputs, probabilities, asyncio.get_running_loop().create_future(), settings)
        self.waiting += len(inputs)
        await self.queue.put(request)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.limits.timeout_s)
        finally:
            if not request.future.done():
                request.future.cancel()  # the caller stopped waiting: a batch that has not run skips it

    async def _take(self) -> _Request:
        request = await self.queue.get()
        self.waiting -= len(request.inputs)
        return request

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._take()]
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            while sum(len(r.inputs) for r in batch) < self.limits.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self._take(), max(0.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    break
            batch = [r for r in batch if not r.future.done()]  # timed out while waiting: nobody reads it
            for key in dict.fromkeys(r.key() for r in batch):  # in arrival order
                part = [r for r in batch if r.key() == key]
                self.on_batch(sum(len(r.inputs) for r in part))
                await loop.run_in_executor(MODEL_WORK, self._answer, part, loop)

    def _answer(self, part: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        """Run one batch (in a worker thread); a failing batch is retried request by request."""
        inputs = [x for r in part for x in r.inputs]
        probabilities, settings = part[0].probabilities, part[0].settings
        try:
            results = self.served.predict(inputs, probabilities, **settings)
        except Exception:  # noqa: BLE001 - find which request it was, answer the others
            for one in part:
                try:
                    answer = self.served.predict(one.inputs, probabilities, **settings)
                    loop.call_soon_threadsafe(_resolve, one.future, answer, None)
                except Exception as err:  # noqa: BLE001
                    loop.call_soon_threadsafe(_resolve, one.future, None, err)
            return
        start = 0
        for one in part:
            loop.call_soon_threadsafe(_resolve, one.future, results[start : start + len(one.inputs)], None)
            start += len(one.inputs)


def _resolve(future: asyncio.Future[list[Any]], value: list[Any] | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value or [])
