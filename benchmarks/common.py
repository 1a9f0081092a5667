"""Shared pieces of the benchmarks: machine stamp, subprocess runs, peak memory, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

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


def run_child(script: str, args: list[str], timeout: int = 3600, env: dict | None = None) -> dict:
    """Run ``script`` in a fresh process (so its peak memory is its own); it prints one JSON line last."""
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternating_runs(
    script: str, sides: list[str], rounds: int, args: list[str], describe, env: dict | None = EXACT_RSS
) -> dict[str, list[dict]]:
    """Every side of ``script`` (its ``--side`` option) in a fresh process, ``rounds`` times, the order
    reversed every other round so that no side always runs first; ``args``: the script's other
    arguments; ``describe(result)``: the progress line of one run. Returns the results by side."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            result = run_child(script, ["--side", side, *args], env=env)
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
