"""The server's model work runs in threads that end with it (adapters/serving/threads.py): each OpenMP pool a
thread starts lasts as long as the thread, and more pools than CPUs make every worker sleep between regions."""

import asyncio
import threading
import time

import pytest

from adapters.serving.threads import MODEL_WORK, ThreadPerCall, in_passing_thread


def test_each_call_runs_in_a_thread_that_ends_with_it():
    executor = ThreadPerCall()
    ran_in = executor.submit(threading.current_thread).result()
    assert ran_in is not threading.current_thread() and ran_in.name == "qadapters-work"
    ran_in.join(5)
    assert not ran_in.is_alive()
    executor.shutdown()


def test_results_and_errors_reach_the_caller():
    assert in_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)


def test_at_most_max_workers_calls_run_at_once():
    executor, running, peak, lock = ThreadPerCall(max_workers=2), [0], [0], threading.Lock()

    def work() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    futures = [executor.submit(work) for _ in range(6)]
    for future in futures:
        future.result(5)
    assert peak[0] == 2
    executor.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        executor.submit(work)


def test_the_event_loop_runs_work_on_it():
    async def main() -> str:
        return await asyncio.get_running_loop().run_in_executor(MODEL_WORK, lambda: threading.current_thread().name)

    assert asyncio.run(main()) == "qadapters-work"
