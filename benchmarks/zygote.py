"""A warm start for the benchmarks' fresh processes: import once, fork one child per run.

Every benchmark run (a ``--side``, a method, a cell) is a fresh process, so that its peak memory, its allocator
and its threads are its own. Starting one costs 5-7 s on a 2-core CPU before it computes anything (importing
torch, transformers and peft: 6.4 s on a 2-core AVX2 EPYC), more than a quick-mode run computes. This process
pays that once. Started with the run's exact environment, it imports the libraries and does nothing else; then,
for each request on its stdin, it forks a child that runs the script as ``python script args`` would. The idea
is Android's zygote (gunicorn's ``--preload`` and Python's ``forkserver`` preload are the same).

What a child shares with a fresh process: the environment from the start (glibc reads its ``MALLOC_*_`` settings
and tqdm its ``TQDM_*`` ones when the process starts, here when the zygote does), the state right after the
imports, and no tensors or threads from before (the zygote computes nothing: torch starts its thread pool on first
use). Python's ``random`` is reseeded at fork; torch's generator starts from its fixed default, as afresh. What
differs: its peak RSS leaves out the library pages it never touches, which a fresh process's import faults in
(right after the imports: 355 MB forked against 476 MB afresh on a 2-core AVX2 EPYC). So it is an option
(``--warm-start``) for checking a benchmark, as the tests do; the published tables start every run afresh.

Protocol, one JSON line each way: the parent sends ``{"script", "args", "cwd", "stdout", "stderr"}`` (the last
two: files for the child's output, one file for both when equal) and optionally ``"module"`` (``script`` names a
module, run as ``python -m``) and ``"session"`` (the child starts a session, so a timeout can kill its group); the
zygote answers ``{"pid"}`` once the child runs, then ``{"returncode"}``.
It exits when its stdin closes. ``common.run_child`` drives it: ``python zygote.py [module ...]``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import sys
import traceback

PRELOAD = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "adapters")
"""What every benchmark run imports, unless named on the command line; the package last (it quiets a
bitsandbytes import-time warning first)."""


def _redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags, 0o600)
    os.dup2(opened, fd)
    os.close(opened)


def _exit_code(stop: SystemExit) -> int:
    """What ``python script`` exits with after ``sys.exit(code)``."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def _run(request: dict) -> int:
    """The script (or with ``module``, the module, as ``python -m`` runs it) as ``__main__`` with its arguments and
    its folder (the working folder) first on ``sys.path``, as the interpreter runs it."""
    try:
        if request.get("module"):
            sys.argv = [request["script"], *request["args"]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(request["script"], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(request["script"])
            sys.argv = [script, *request["args"]]
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as stop:
        return _exit_code(stop)
    except BaseException:
        traceback.print_exc()
        return 1


def _child(request: dict) -> None:
    """In the forked child: output to the parent's files, the script run, then the process's exit, never a return."""
    code = 1
    try:
        if request.get("session"):
            os.setsid()  # a process group of its own: a timeout kills whatever it started too
        os.chdir(request["cwd"])
        _redirect(0, os.devnull, os.O_RDONLY)
        _redirect(1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        if request["stderr"] == request["stdout"]:  # one stream, in the order written
            os.dup2(1, 2)
        else:
            _redirect(2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's own stdin until it exits
        code = _run(request)
        atexit._run_exitfuncs()  # what the interpreter runs at exit; os._exit below skips it
    except BaseException:  # setting the child up failed (a folder gone): said where its stderr goes, exit code 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):  # a script may have closed them (json.tool closes stdout)
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)  # always: the child never returns into the zygote's loop


def serve(requests, answers) -> None:
    """One forked child per request line, answered with its pid and then its exit code."""
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answers.close()  # the protocol's pipe stays the zygote's alone
            _child(request)
        print(json.dumps({"pid": pid}), file=answers, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)


def main(preload: list[str]) -> None:
    for name in preload or PRELOAD:
        importlib.import_module(name)
    answers = os.fdopen(os.dup(1), "w")  # the protocol's channel: nothing a library prints can mix into it
    os.dup2(2, 1)
    serve(sys.stdin, answers)


if __name__ == "__main__":
    main(sys.argv[1:])
