"""Shared pieces of the benchmarks: machine stamp, subprocess runs, peak memory, result files."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import platform
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from zygote import PRELOAD

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    import accelerate
    import bitsandbytes
    import peft
    import transformers

    import adapters  # noqa: F401 - first: it quiets a bitsandbytes import-time warning

    cpu, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    bf16 = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]  # what decides bf16 speed on CPU
    cpu += f" ({', '.join(bf16) if bf16 else 'no bf16 flags'})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def peak_memory_mb() -> float:
    """Peak memory of this process: allocated GPU memory on a GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_lora_b(model, seed: int, adapter: str = "default") -> None:
    """Every LoRA ``B`` matrix of ``adapter`` set to seeded random values (std 0.02), as after training, so a
    timed forward really computes the low-rank update (at ``B = 0`` it is a product of zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [m for m in model.modules() if hasattr(m, "lora_B")]:
            weight = layer.lora_B[adapter].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)


# glibc keeps freed heap memory for reuse, so on CPU a process's peak RSS also counts holes left by
# earlier, differently shaped batches: the same training step measured 3.9 GB at fixed shapes and
# 4.7-5.0 GB after six dynamically padded batches. Serving every allocation over 64 KiB with its own
# mmap returns it to the system when freed, so peak RSS follows the live tensors (2.9 GB for the same
# run). It costs time (each big tensor is faulted in afresh: about 1.4x slower steps on 2 cores),
# so it is for comparisons of memory where both sides pay it alike.
EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(script: str, args: list[str], timeout: int = 3600, env: dict | None = None, warm: bool = False) -> dict:
    """Run ``script`` in a fresh process (so its peak memory is its own); it prints one JSON line last.
    ``warm``: forked from a zygote that has the libraries imported (``add_warm_start``)."""
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    returncode, stdout, stderr = fresh_process(script, args, env, timeout, warm)
    if returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def fresh_process(
    script: str, args: list[str], env: dict, timeout: float | None, warm: bool, preload: tuple[str, ...] = PRELOAD
) -> tuple[int, str, str]:
    """``python script args`` in a fresh process under ``env``: its exit code, stdout and stderr. ``warm``: forked
    from a zygote (``zygote.py``: the ``preload`` imports paid once per environment) where fork is safe, else
    started afresh. ``timeout``: seconds, None for none."""
    if not (warm and forking_is_safe()):
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env)
        return done.returncode, done.stdout, done.stderr
    return zygote(env, preload).run(script, args, timeout)


def zygote(env: dict, preload: tuple[str, ...] = PRELOAD) -> Zygote:
    """The running zygote of ``env`` and ``preload``, started when there is none."""
    key = (preload, tuple(sorted(env.items())))
    if key not in _ZYGOTES:
        while len(_ZYGOTES) >= MAX_ZYGOTES:  # the oldest environment's goes: each holds the imports' memory
            _ZYGOTES.pop(next(iter(_ZYGOTES))).close()
        _ZYGOTES[key] = Zygote(env, preload)
    return _ZYGOTES[key]


def forking_is_safe() -> bool:
    """Linux without CUDA: a child forked after its parent initialised the CUDA driver cannot use it, and the
    zygote's imports initialise it (bitsandbytes' import reads the device's compute capability to pick its library);
    elsewhere ``fork`` is missing or unsafe with the system's libraries (macOS)."""
    return sys.platform == "linux" and not torch.cuda.is_available()


def add_warm_start(parser) -> None:
    """The ``--warm-start`` option of a benchmark whose runs are fresh processes."""
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="fork each run from a process that has the libraries imported (zygote.py): 5-7 s less per run on "
        "2 CPU cores, for checking the benchmark (the tests); a forked run's peak RSS leaves out library pages it "
        "never touches (about 120 MB), so the published tables start every run afresh",
    )


MAX_ZYGOTES = 3
"""Zygotes kept alive at once, one per environment (a few hundred MB each: the imported libraries)."""
_ZYGOTES: dict[tuple, Zygote] = {}  # by (preload, environment)


class Zygote:
    """A ``zygote.py`` process started under one environment with ``preload`` imported; ``run`` forks a child of
    it per script run."""

    def __init__(self, env: dict, preload: tuple[str, ...]):
        script = Path(__file__).resolve().parent / "zygote.py"
        self.process = subprocess.Popen(
            [sys.executable, str(script), *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.pending = b""  # read from the zygote, not yet a whole line
        atexit.register(self.close)

    def run(
        self,
        script: str,
        args: list[str],
        timeout: float | None,
        cwd: str | None = None,
        *,
        module: bool = False,
        session: bool = False,
        merged: bool = False,
    ) -> tuple[int, str, str]:
        """``script`` run with ``args`` in a forked child: its exit code, stdout and stderr. ``module`` and
        ``session``: the protocol's; ``merged``: stderr into stdout, returned as stdout. On a timeout the child (with
        ``session``, its whole group) is killed and ``subprocess.TimeoutExpired`` carries its output so far."""
        with tempfile.TemporaryDirectory(prefix="zygote-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / ("stdout" if merged else "stderr")
            request = {
                "script": script,
                "args": args,
                "cwd": cwd or os.getcwd(),
                "stdout": str(out),
                "stderr": str(err),
            }
            self._send({**request, "module": module, "session": session})
            pid = self._answer(None)["pid"]
            try:
                returncode = self._answer(timeout)["returncode"]
            except TimeoutError:
                kill = os.killpg if session else os.kill  # a session: its group, as a GPU check part
                with contextlib.suppress(ProcessLookupError):  # it may have ended since
                    kill(pid, signal.SIGKILL)  # as subprocess.run does on its timeout, then the same error
                self._answer(None)
                output = out.read_text(errors="replace")
                raise subprocess.TimeoutExpired([script, *args], timeout, output=output) from None
            stderr = "" if merged else err.read_text(errors="replace")
            return returncode, out.read_text(errors="replace"), stderr

    def _send(self, request: dict) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()

    def _answer(self, timeout: float | None) -> dict:
        """The zygote's next line; TimeoutError when none comes within ``timeout`` s, RuntimeError if it died.
        Unbuffered reads: a buffered reader could hold the next line where ``select`` does not see it."""
        assert self.process.stdout is not None
        fd, deadline = self.process.stdout.fileno(), None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left is not None and not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the zygote (pid {self.process.pid}) exited with code {self.process.wait()}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # its loop ends at the end of its input
            self.process.wait()


def alternating_runs(
    script: str,
    sides: list[str],
    rounds: int,
    args: list[str],
    describe,
    env: dict | None = EXACT_RSS,
    warm: bool = False,
) -> dict[str, list[dict]]:
    """Every side of ``script`` (its ``--side`` option) in a fresh process, ``rounds`` times, the order
    reversed every other round so that no side always runs first; ``args``: the script's other
    arguments; ``describe(result)``: the progress line of one run; ``warm``: ``run_child``'s. Returns the
    results by side."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            result = run_child(script, ["--side", side, *args], env=env, warm=warm)
            runs[side].append(result)
            print(f"round {r + 1} {side}: {describe(result)}", flush=True)
    return runs


def folder_mb(path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def write_results(name: str, payload: dict, table: str, out: Path | str | None = None) -> Path:
    """``<out>/<name>.json`` and ``<out>/<name>.md`` (the table, stamped with the machine); ``out``: a script's
    ``--out``, None (not given) for ``RESULTS``."""
    out = Path(out) if out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    stamp = payload["machine"]
    header = (
        f"Measured {stamp['date']} on {stamp['cpu']} ({stamp['cores']} cores)"
        f"{', GPU ' + stamp['gpu'] if stamp['gpu'] else ', no GPU'}; torch {stamp['torch']}, "
        f"transformers {stamp['transformers']}, peft {stamp['peft']}, bitsandbytes {stamp['bitsandbytes']}.\n\n"
    )
    (out / f"{name}.md").write_text(header + table + "\n")
    return out / f"{name}.md"
