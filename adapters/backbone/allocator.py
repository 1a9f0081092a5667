"""Keep freed memory in the process on CPU, so that each batch's tensors do not fault in fresh pages.

glibc's malloc hands out large blocks with ``mmap`` and gives freed ones back to the kernel (``munmap``,
or trimming the heap's top once more than ``M_TRIM_THRESHOLD`` is free). Its threshold is dynamic (it
rises to the size of a freed mmapped block, up to 32 MiB, and the trim threshold with it to twice that),
but a model's forward pass frees and reallocates tens of megabytes of activations per batch, so the heap's
top keeps being trimmed and refilled. Each refill is a page fault per 4 KiB page, and the kernel zeroes
every page it hands back. Measured on a 2-core Xeon VM (the sentiment job's evaluation, SmolLM2-135M in
NF4, 500 rows): 1.9 million page faults (7.6 GB of pages) and 16.2 s per evaluation with glibc's defaults;
about 1,200 faults and 13.7 s with freed memory kept. Page faults cost ~0.3 ms per MiB on that VM.

This is what PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc (caching allocators);
``mallopt`` gets it from glibc in-process, without a preload: the mmap threshold at its ceiling (32 MiB,
so a batch's activations come from the heap) and trimming only above ``TRIM_THRESHOLD``. The cost is that
the process's resident memory stays near its peak after the peak: while training or evaluating, that is the
memory the next batch needs again. So ``train`` and ``evaluate`` set it on CPU, and loading, ``predict`` and
the server do not: serving three artifacts on one base (``benchmarks/serve.py``, same Xeon) it held 994 MB
against 790 with glibc's defaults, for 40.7 against 39.4 requests/s at 16 clients (one run each).

Left alone: non-glibc systems; a process whose malloc the user has already tuned (``MALLOC_*_`` variables,
``glibc.malloc`` tunables) or replaced (``LD_PRELOAD``); and ``QADAPTERS_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

OVERRIDE = "QADAPTERS_MALLOC"
M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's ceiling for the mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks up to
this size come from the heap and are reused; larger ones (a vocabulary-wide logits tensor) are still mapped."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap's top kept before any is given back to the kernel."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def user_tuned(environ: os._Environ | dict = os.environ) -> str | None:
    """Why the user's own malloc settings stand (a reason), or None when there are none."""
    if environ.get(OVERRIDE, "").lower() == "system":
        return f"{OVERRIDE}=system"
    for name in USER_SETTINGS:
        if name in environ:
            return f"{name} is set"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = environ.get("LD_PRELOAD", "")
    for allocator in OTHER_ALLOCATORS:
        if allocator in preload:
            return f"LD_PRELOAD loads {allocator}"
    return None


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (once per process); True when it was set here."""
    if user_tuned() is not None or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # glibc returns 1 on success; the mmap threshold first: setting either turns the dynamic one off
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
