"""glibc's malloc set to keep freed memory on CPU: done once, where the user has not tuned or replaced the
allocator, and measurably so (a freed block comes back without new page faults)."""

import json
import subprocess
import sys

import pytest

from adapters.backbone.allocator import user_tuned

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc", reason="glibc only"
)

# a 16 MiB block allocated, written and freed 40 times, after keep_freed_memory(): the minor page faults
SCRIPT = """
import json, resource, torch
from adapters.backbone.allocator import keep_freed_memory
kept = keep_freed_memory()
torch.empty(4 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.empty(4 << 20).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "again": keep_freed_memory(), "faults": faults}))
"""


def _run(env: dict) -> dict:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "QADAPTERS_MALLOC"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "environ,reason",
    [
        ({}, None),
        ({"QADAPTERS_MALLOC": "system"}, "QADAPTERS_MALLOC=system"),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES sets glibc.malloc"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD loads jemalloc"),
        ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, None),
    ],
)
def test_the_users_own_settings_are_recognised(environ, reason):
    assert user_tuned(environ) == reason


@glibc
def test_freed_memory_is_reused_without_page_faults():
    kept = _run({})
    assert kept["kept"] is True and kept["again"] is True
    # 40 x 16 MiB freed and taken again: at most one block's pages (4,096) fault in anew, not 40 blocks'
    assert kept["faults"] <= 2 * 4096
    # the user's own setting stands (here: every block over 64 KiB its own mapping, faulted in anew)
    theirs = _run({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert theirs["kept"] is False and theirs["faults"] > 40 * 4096 * 0.9
    assert _run({"QADAPTERS_MALLOC": "system"})["kept"] is False
