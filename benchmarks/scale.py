"""Loading and training at real model sizes on this machine (random weights of real shapes: ``shapes.py``).

    python benchmarks/scale.py                       # 1B and 8B shapes (about 10 minutes on 2 cores)
    python benchmarks/scale.py --presets llama-3.2-1b --train-steps 2

For each preset, in a fresh process:

* **load**: ``adapters.adapt(folder, quantization="nf4")`` of the sharded bf16 checkpoint, timed; its memory
  sampled every 10 ms as the process's *anonymous* resident memory (``RssAnon``: what the process allocated,
  not the safetensors files the kernel maps in and can drop). The claim checked: the peak stays within
  **the loaded model + one checkpoint shard + the runtime** (the process's anonymous memory before loading),
  that is, the checkpoint streams through one shard at a time and is never held whole;
* **train** (``--train-steps``, 1B only by default): LoRA training steps at batch 1 x 128 tokens, step time
  and tokens/s on this CPU.

Random weights: the numbers are load time, memory and speed, never accuracy. Results:
``results/scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

GIB = 2**30


def anonymous_rss() -> int:
    """This process's anonymous resident bytes (``RssAnon`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """The highest ``anonymous_rss`` seen while the block runs (sampled every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakSampler:
        self.peak = anonymous_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_rss())


def tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer, and of the 4-bit quantization constants (absmax, code)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for value in state.as_dict().values():
                if isinstance(value, torch.Tensor):
                    add(value)
    return total


def measure(preset: str, train_steps: int) -> dict:
    """One preset, in this (fresh) process."""
    import gc

    from shapes import PRESETS, write

    import adapters

    folder = write(preset, progress=False)
    shard = max(f.stat().st_size for f in folder.glob("*.safetensors"))
    gc.collect()
    runtime = anonymous_rss()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        model = adapters.adapt(
            str(folder),
            adapter=adapters.LoRA(r=16),
            head=adapters.Classification(labels=["a", "b"]),
            quantization="nf4",
        )
    load_seconds = time.perf_counter() - started
    gc.collect()
    loaded = tensor_bytes(model)
    result = {
        "preset": preset,
        "parameters": PRESETS[preset].parameters,
        "load_seconds": round(load_seconds, 1),
        "runtime_bytes": runtime,
        "model_tensor_bytes": loaded,
        "largest_shard_bytes": shard,
        "bound_bytes": loaded + shard + runtime,
        "peak_anonymous_bytes": sampler.peak,
        "after_load_anonymous_bytes": anonymous_rss(),
    }
    result["within_bound"] = result["peak_anonymous_bytes"] <= result["bound_bytes"]
    if train_steps:
        result.update(_train(model, train_steps))
    return result


def _train(model, steps: int, batch: int = 1, seq_len: int = 128) -> dict:
    import torch

    from adapters.config.training import TrainConfig
    from adapters.training.optim import build_optimizer

    optimizer = build_optimizer(model, TrainConfig())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (batch, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    labels = torch.zeros(batch, dtype=torch.long)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        started = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, labels=labels)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    step = sorted(times[1:])[len(times[1:]) // 2]
    return {
        "train_batch": f"{batch} x {seq_len}",
        "step_seconds": round(step, 2),
        "tokens_per_second": round(batch * seq_len / step, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "**Random weights of real shapes** (`benchmarks/shapes.py`): load time, memory and speed only.",
        "",
        "| shape | parameters | load (NF4) | model tensors | largest shard | runtime | bound | peak anonymous RSS | "
        "within bound | train step (1 x 128) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['parameters'] / 1e9:.2f} B | {r['load_seconds']:.0f} s | "
            f"{r['model_tensor_bytes'] / GIB:.2f} GiB | {r['largest_shard_bytes'] / GIB:.2f} GiB | "
            f"{r['runtime_bytes'] / GIB:.2f} GiB | {r['bound_bytes'] / GIB:.2f} GiB | "
            f"{r['peak_anonymous_bytes'] / GIB:.2f} GiB | {'yes' if r['within_bound'] else '**no**'} | "
            f"{_seconds(r.get('step_seconds'))} | {r.get('tokens_per_second', '-')} |"
        )
    lines += [
        "",
        "Bound = the loaded model's tensors (4-bit weights with their constants; embeddings and norms in the CPU "
        "compute dtype, fp32) + the largest checkpoint shard + the process's anonymous memory before loading.",
    ]
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value} s"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    p.add_argument("--train-steps", type=int, default=2, help="training steps measured on the 1B shape (0: none)")
    p.add_argument("--name", default="scale")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one preset, in a subprocess
    args = p.parse_args(argv)
    if args.measure:
        preset, steps = args.measure.split(":")
        print("RESULT " + json.dumps(measure(preset, int(steps))))
        return {}
    from tqdm.auto import tqdm

    rows = []
    for preset in tqdm(args.presets, desc="shapes"):
        steps = args.train_steps if "1b" in preset else 0
        done = subprocess.run(
            [sys.executable, __file__, "--measure", f"{preset}:{steps}"], capture_output=True, text=True, check=False
        )
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not found:
            raise SystemExit(f"{preset} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        rows.append(json.loads(found[-1][len("RESULT ") :]))
        print(json.dumps(rows[-1]))
    stamp = machine()
    write_results(args.name, {"machine": stamp, "rows": rows}, table(rows))
    return {"rows": rows}


if __name__ == "__main__":
    main()
