"""Model work in threads that end with it, so that the scheduler's thread keeps OpenMP's workers spinning.

PyTorch's CPU kernels (and bitsandbytes' 4-bit ones, built against the same ``libgomp``) run their parallel
regions on OpenMP. ``libgomp`` gives every thread that starts a parallel region its own pool of workers, kept
until that thread exits, and as soon as the process holds more pooled threads than it has CPUs it makes every
worker go to sleep after about 100 spins instead of about 300,000 (``gomp_throttled_spin_count_var`` in
libgomp's ``env.c``): each parallel region then waits for its workers to be woken. A decoding step is
hundreds of small regions (NF4 dequantizes every weight's block scales, then its blocks), so a step run in a
second thread while the main thread keeps the pool it loaded the model with measured 1.3-1.5x slower on 2
cores (NF4, SmolLM2-135M, one row; the dequantization kernels 3-5x per call under the profiler; fp32, made of
fewer and larger regions, about 1.05x).

So everything the server computes besides the scheduler's decoding runs in a thread of its own that ends
when its work does: ``MODEL_WORK`` runs classification batches and runtime adapter loads, and
``in_passing_thread`` the loading of the models at start. A thread costs tens of microseconds to start, a
batch milliseconds to seconds, and the scheduler's thread is left as the only lasting pool (one per base that
generates: a server of several such bases has several).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class ThreadPerCall(Executor):
    """An executor that runs each call in a new thread, ``max_workers`` at once at most (the others' threads
    wait their turn), and whose threads end with their call."""

    def __init__(self, max_workers: int = 8) -> None:
        self._slots = threading.BoundedSemaphore(max_workers)
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()

        def run() -> None:
            with self._slots:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as err:  # noqa: BLE001 - the caller's future carries it
                        future.set_exception(err)
            with self._lock:
                self._threads.discard(threading.current_thread())

        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            thread = threading.Thread(target=run, daemon=True, name="qadapters-work")
            self._threads.add(thread)
        thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # ``cancel_futures`` has nothing to act on: every call has its thread from the start
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()


def in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run in a new thread, waited for: its OpenMP pool ends with it."""
    with ThreadPerCall(1) as executor:
        return executor.submit(fn, *args, **kwargs).result()


MODEL_WORK = ThreadPerCall()
"""Where the server runs a classification batch or loads an adapter (``loop.run_in_executor(MODEL_WORK, ...)``)."""
