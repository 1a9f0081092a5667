"""The CPU precision policy (backbone/precision.py): flags, the measured probe, its cache, the override,
and what ``"auto"`` resolves to from them."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.backbone import precision


@pytest.fixture
def policy(monkeypatch, tmp_path):
    """The policy with the override unset, the cache in ``tmp_path`` and the flags and probe mocked."""
    monkeypatch.delenv(precision.OVERRIDE, raising=False)
    monkeypatch.setattr(precision, "CACHE", tmp_path / "cpu_bf16.json")
    precision.cpu_prefers_bf16.cache_clear()
    yield monkeypatch
    precision.cpu_prefers_bf16.cache_clear()


def _cpu(monkeypatch, native: bool, amx: bool = False, speedup: float = 1.0) -> list:
    measured = []
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: (native, amx))
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: measured.append(1) or speedup)
    return measured


@pytest.mark.parametrize(
    "native,amx,speedup,expected",
    [
        (False, False, 3.0, False),  # no bf16 instructions: fp32 whatever a probe would say
        (True, False, 2.0, True),  # AVX512-BF16 and faster (the Zen 4 EPYC: 58 vs 29 GFLOP/s)
        (True, False, 0.55, False),  # AVX512-BF16 but slower than MKL's fp32 (the 2-core Xeon)
        (True, True, 0.5, True),  # AMX: taken without measuring
    ],
)
def test_auto_follows_flags_and_measurement(policy, native, amx, speedup, expected):
    _cpu(policy, native, amx, speedup)
    assert precision.cpu_prefers_bf16() is expected
    assert precision.resolve_mixed_precision("auto", "cpu") == ("bf16" if expected else "no")
    assert precision.default_compute_dtype(torch.device("cpu")) == (torch.bfloat16 if expected else torch.float32)
    assert precision.resolve_mixed_precision("no", "cpu") == "no"  # asked for: kept
    assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_mixed_precision("auto", "mps") == "no"


def test_measurement_is_cached_per_cpu(policy):
    measured = _cpu(policy, True, speedup=1.5)
    assert precision.cpu_bf16_speedup() == 1.5
    assert precision.cpu_bf16_speedup() == 1.5
    assert len(measured) == 1  # the second read came from the file
    cached = json.loads(precision.CACHE.read_text())
    (key,) = cached
    assert f"{torch.get_num_threads()} threads" in key and torch.__version__ in key


def test_processes_starting_together_measure_once(policy):
    """Ranks of one launch decide alike: the first measures under the cache's lock, the others read it."""
    import threading
    import time

    measured = []

    def slow_probe():
        measured.append(1)
        time.sleep(0.3)  # the others arrive while it measures
        return 0.6

    policy.setattr(precision, "measure_bf16_speedup", slow_probe)
    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(precision.cpu_bf16_speedup())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [0.6, 0.6, 0.6] and len(measured) == 1
    assert not list(precision.CACHE.parent.glob("*.tmp"))  # written whole, through a temporary file


def test_override_decides_without_flags_or_probe(policy):
    measured = _cpu(policy, False)
    policy.setenv(precision.OVERRIDE, "1")
    assert precision.cpu_prefers_bf16()
    precision.cpu_prefers_bf16.cache_clear()
    policy.setenv(precision.OVERRIDE, "0")
    _cpu(policy, True, amx=True)
    assert not precision.cpu_prefers_bf16()
    assert not measured


def test_flags_read_from_linux_when_torch_cannot_say(policy):
    policy.setattr(torch, "cpu", object())  # a torch without the cpuinfo probes
    policy.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision.cpu_native_bf16() == (True, False)
    policy.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert precision.cpu_native_bf16() == (False, False)
    policy.setattr(precision, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert precision.cpu_native_bf16() == (True, True)


def test_probe_measures_a_ratio():
    speedup = precision.measure_bf16_speedup(repeats=1)
    assert 0 < speedup < 100
