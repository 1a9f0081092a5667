"""Which precision a device computes in: bf16 where the hardware runs it natively *and faster*, fp32 elsewhere.

bfloat16 keeps fp32's exponent range with an 8-bit mantissa (Kalamkar et al. 2019,
https://arxiv.org/abs/1905.12322), so training in it needs no loss scaling; mixed precision keeps the
trained weights, optimizer states, norms' reductions and the loss in fp32 (Micikevicius et al. 2018,
https://arxiv.org/abs/1710.03740). On GPUs with bf16 tensor cores (Ampere and later) it is the faster choice.

On CPUs the instruction is not the answer by itself. Native bf16 means AVX512-BF16 (``VDPBF16PS``: Cooper
Lake, Sapphire Rapids, Zen 4) or AMX tiles; torch and bitsandbytes read the same flags. But measured on two
2-core machines with AVX512-BF16 and no AMX, a 1024 x 576 x 1536 matmul ran at 58 vs 29 GFLOP/s (bf16 vs
fp32) on a Zen 4 EPYC (issue #33's measurement), and at 160 vs 300 GFLOP/s on a Xeon (oneDNN's bf16 kernel
against MKL's fp32; ``benchmarks/results/precision.md``).
So ``"auto"`` asks the flags first and then measures, once: the matmul above in both dtypes; bf16 when it
is at least ``MIN_SPEEDUP`` times faster. The measurement takes ~0.2 s and is kept per CPU model, thread
count and torch version in ``~/.cache/qadapters/cpu_bf16.json``; ``QADAPTERS_CPU_BF16=1`` or ``0``
decides without measuring. AMX is taken without measuring (its bf16 tiles are several times AVX512's fp32).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch

MIN_SPEEDUP = 1.2
"""bf16 must beat fp32 by this much on the probe to be the CPU default: less would not pay for the
rounding and the casts around the fp32 parts."""
OVERRIDE = "QADAPTERS_CPU_BF16"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qadapters" / "cpu_bf16.json"
PROBE_SHAPE = (1024, 576, 1536)  # tokens x hidden x MLP width of a batch of 16 x 64 on a small LLM


def _cpuinfo(field: str) -> str | None:
    """The value of ``field`` in ``/proc/cpuinfo`` (its first processor), None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (``/proc/cpuinfo``); empty where they cannot be read."""
    return set((_cpuinfo("flags") or "").split())


def cpu_native_bf16() -> tuple[bool, bool]:
    """(native bf16, AMX) for this CPU: torch's own detection (cpuinfo), else the Linux flags."""
    probe = getattr(torch, "cpu", None)
    avx512 = getattr(probe, "_is_avx512_bf16_supported", None)
    amx = getattr(probe, "_is_amx_tile_supported", None)
    if avx512 is not None and amx is not None:
        has_amx = bool(amx())
        return bool(avx512()) or has_amx, has_amx
    flags = cpu_flags()
    has_amx = "amx_bf16" in flags
    return "avx512_bf16" in flags or has_amx, has_amx


def _cpu_name() -> str:
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def measure_bf16_speedup(repeats: int = 5) -> float:
    """fp32 time / bf16 time of the probe matmul on this CPU (best of ``repeats`` each)."""
    m, k, n = PROBE_SHAPE
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        torch.nn.functional.linear(a, b)  # warm-up: kernel selection, page faults
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best = min(best, time.perf_counter() - started)
        times[dtype] = best
    return times[torch.float32] / times[torch.bfloat16]


def cpu_bf16_speedup() -> float:
    """The probe's speedup on this CPU: from the cache when this CPU, thread count and torch were measured.

    Processes of one launch (torchrun) measure one at a time under a lock on the cache, so the first
    measures and the others read its result: every rank decides the same, and no probe runs while another
    takes the cores."""
    key = f"{_cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE.with_suffix(".lock"), "a")  # noqa: SIM115 - held for the whole measurement
    except OSError:  # a read-only home: measure, keep nothing
        return measure_bf16_speedup()
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # not POSIX: no lock
            pass
        try:
            known = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(key), (int, float)):
            return float(known[key])
        speedup = measure_bf16_speedup()
        written = CACHE.with_suffix(f".{os.getpid()}.tmp")
        written.write_text(json.dumps({**known, key: round(speedup, 3)}, indent=2))
        os.replace(written, CACHE)  # readers see the old file or the new one, never half of it
        return speedup


@functools.lru_cache(maxsize=1)
def cpu_prefers_bf16() -> bool:
    """Whether ``"auto"`` computes in bf16 on this CPU (see the module docstring)."""
    override = os.environ.get(OVERRIDE)
    if override is not None:
        return override.strip().lower() in ("1", "true", "yes", "on")
    native, amx = cpu_native_bf16()
    if not native:
        return False
    return amx or cpu_bf16_speedup() >= MIN_SPEEDUP


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen base computes in when the user does not say: bf16 on GPUs that have it (fp16 on
    older ones) and on CPUs where it is native and faster, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_prefers_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_mixed_precision(value: str, device_type: str | None = None) -> str:
    """``"auto"`` -> ``"bf16"`` autocast where bf16 is the compute dtype (the QLoRA recipe: the 4-bit base
    computes in bf16 anyway, and LoRA's fp32 master weights then run their matmuls in bf16 instead of
    upcasting every adapter input to fp32), ``"no"`` elsewhere (fp16 autocast needs loss scaling, so it
    is never chosen for the user). Other values pass through."""
    if value != "auto":
        return value
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        return "bf16" if cpu_prefers_bf16() else "no"
    if device_type != "cuda":
        return "no"
    # an estimate for a GPU made on a machine without one assumes a bf16-capable GPU
    return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "no"


def load_dtype(dtype: str | None, mixed_precision: str, device_type: str) -> str | None:
    """The dtype to load a base in for a run that asks for ``mixed_precision``: ``"no"`` on a CPU means fp32
    throughout, the frozen base included, unless ``dtype`` names one. (On a GPU ``"no"`` only turns autocast
    off: an fp32 base would double its memory.)"""
    if dtype is None and mixed_precision == "no" and device_type == "cpu":
        return "float32"
    return dtype
