"""Sharded loading at scale: per-rank memory and load time of ``adapt(..., fsdp=True)`` on 2 ranks against
one process's ordinary load, and the estimate beside them.

Each cell runs in fresh processes (``torchrun --nproc-per-node 2`` for 2 ranks): it loads the model
(``adapt``, LoRA r=8 on every linear layer of the blocks, a classification head, NF4), then trains 2 steps
of batch 1 x ``--tokens`` tokens (``train(..., TrainConfig(fsdp=...))``). A thread samples the process's
``/proc/self/status`` every 10 ms: resident memory (``VmRSS``) and anonymous memory (``RssAnon``: what the
process allocated, without mapped files and libraries), their peaks per phase (load, train), plus the
kernel's exact peak RSS (``VmHWM``). Models are random weights of real shapes (``shapes.py``): every number
here is for memory and time, and says so. Every cell runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``
(``common.EXACT_RSS``): each allocation above 64 KiB is its own mapping, returned when freed, so the peaks
follow the live tensors rather than the heap's holes, alike for every cell.

    python benchmarks/shard_load.py                     # 1B and 8B shapes: 1 process vs 2 ranks
    python benchmarks/shard_load.py --shapes llama-3.2-1b:2 llama-3.1-8b:1   # rounds per shape
    python benchmarks/shard_load.py --big               # the 32B-class shape (Qwen2.5-32B), 2 ranks, pre-quantized

Writes ``results/shard_load.{json,md,png}`` (``shard_load-32b`` for ``--big``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import EXACT_RSS, RESULTS, machine, write_results  # noqa: E402

MIB = 2**20
CELLS = [  # (name, processes, sharded load, base)
    ("1 process, whole load", 1, False, "bf16"),
    ("2 ranks, sharded load", 2, True, "bf16"),
    ("2 ranks, sharded load of the pre-quantized base", 2, True, "nf4"),
]


class Sampler(threading.Thread):
    """Peaks of VmRSS and RssAnon (bytes) of this process, sampled every ``every`` seconds, per phase."""

    def __init__(self, every: float = 0.01):
        super().__init__(daemon=True)
        self.every, self.phase, self.peaks, self.stopped = every, "start", {}, False

    @staticmethod
    def status() -> dict[str, int]:
        found = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
        return found

    def run(self) -> None:
        while not self.stopped:
            self.sample()
            time.sleep(self.every)

    def sample(self) -> None:
        now = self.status()
        peak = self.peaks.setdefault(self.phase, {"rss": 0, "anon": 0})
        peak["rss"], peak["anon"] = max(peak["rss"], now["VmRSS"]), max(peak["anon"], now["RssAnon"])


def worker(args: argparse.Namespace) -> None:
    """One rank (or the one process) of a cell: load, train 2 steps, write its measurements."""
    sampler = Sampler()
    sampler.start()
    import torch.distributed as dist

    import adapters

    world = int(os.environ.get("WORLD_SIZE", "1"))
    sampler.sample()
    sampler.phase = "load"
    start = time.perf_counter()
    model = adapters.adapt(
        args.model,
        adapter=adapters.LoRA(r=8, dropout=0.0),
        head=adapters.Classification(labels=["a", "b"]),
        quantization="nf4",
        max_length=args.tokens,
        fsdp=args.sharded,
    )
    load_seconds = time.perf_counter() - start
    sampler.sample()
    sampler.phase = "train"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(4 * args.tokens)), "label": i % 2}
            for i in range(4 * world)]  # fmt: skip
    start = time.perf_counter()
    config = adapters.TrainConfig(
        max_steps=2, batch_size=1, fsdp=world > 1, progress=False, gradient_checkpointing=args.checkpointing
    )
    adapters.train(model, rows, config=config)
    train_seconds = time.perf_counter() - start
    sampler.sample()
    sampler.stopped = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = {
        "rank": rank,
        "world": world,
        "load_seconds": load_seconds,
        "train_seconds": train_seconds,
        "peaks": sampler.peaks,
        "hwm": sampler.status()["VmHWM"],
        "frozen_bytes_here": model.shard_report.frozen_bytes_here if model.shard_report else None,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))


def run_cell(
    model: str, processes: int, sharded: bool, tokens: int, out: Path, checkpointing: bool = False
) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, __file__, "--worker", "--model", model, "--tokens", str(tokens), "--out", str(out)]
    threads = str(max(1, (os.cpu_count() or 2) // processes))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": threads, **EXACT_RSS}
    flags = (["--sharded"] if sharded else []) + (["--checkpointing"] if checkpointing else [])
    done = subprocess.run(cmd + flags, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def estimate(model: str, processes: int, tokens: int, checkpointing: bool = False) -> dict:
    import adapters

    found = adapters.estimate_memory(
        model, adapter=adapters.LoRA(r=8, dropout=0.0), head=adapters.Classification(labels=["a", "b"]),
        quantization="nf4", batch_size=1, seq_len=tokens, world_size=processes, fsdp=processes > 1, device="cpu",
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    return {"total": found.total, "peak_rss": found.peak_rss, "peak_anonymous": found.peak_anonymous}


def measure(shapes: list[str], rounds: int, tokens: int, work: Path) -> list[dict]:
    from shapes import write, write_quantized

    rows = []
    for spec in shapes:
        shape, _, count = spec.partition(":")  # "llama-3.1-8b:1": that shape's own number of rounds
        bases = {"bf16": str(write(shape)), "nf4": str(write_quantized(shape, "nf4"))}
        for r in range(int(count or rounds)):
            cells = CELLS if r % 2 == 0 else CELLS[::-1]  # alternate which cell runs first
            for name, processes, sharded, base in cells:
                ranks = run_cell(bases[base], processes, sharded, tokens, work / shape / name.replace(" ", "_"))
                row = {"shape": shape, "cell": name, "processes": processes, "round": r, "ranks": ranks}
                row["estimate"] = estimate(bases[base], processes, tokens)
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _worst(ranks: list[dict], phase: str, kind: str) -> int:
    return max(r["peaks"].get(phase, {}).get(kind, 0) for r in ranks)


def _line(row: dict) -> str:
    ranks = row["ranks"]
    peak_rss = max(r["hwm"] for r in ranks)
    peak_anon = max(_worst(ranks, p, "anon") for p in ("load", "train"))
    return (
        f"{row['shape']} | {row['cell']}: load {max(r['load_seconds'] for r in ranks):.1f} s, "
        f"peak RSS {peak_rss / MIB:,.0f} MiB, peak anon {peak_anon / MIB:,.0f} MiB "
        f"(estimate {row['estimate']['peak_rss'] / MIB:,.0f} / {row['estimate']['peak_anonymous'] / MIB:,.0f})"
    )


def summarize(rows: list[dict]) -> tuple[list[dict], str]:
    """Medians per (shape, cell) and the ratios to the one-process cell of the same shape."""
    from statistics import median

    table = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        base = None
        for name, *_ in CELLS:
            cell = [r for r in rows if r["shape"] == shape and r["cell"] == name]
            if not cell:
                continue
            m = {
                "shape": shape, "cell": name,
                "load_s": median(max(x["load_seconds"] for x in c["ranks"]) for c in cell),
                "load_rss": median(_worst(c["ranks"], "load", "rss") for c in cell),
                "load_anon": median(_worst(c["ranks"], "load", "anon") for c in cell),
                "train_rss": median(_worst(c["ranks"], "train", "rss") for c in cell),
                "train_anon": median(_worst(c["ranks"], "train", "anon") for c in cell),
                "peak_rss": median(max(x["hwm"] for x in c["ranks"]) for c in cell),
                "estimate": cell[0]["estimate"],
            }  # fmt: skip
            m["peak_anon"] = max(m["load_anon"], m["train_anon"])
            base = base or m
            m["rss_ratio"], m["anon_ratio"] = m["peak_rss"] / base["peak_rss"], m["peak_anon"] / base["peak_anon"]
            m["load_ratio"] = m["load_s"] / base["load_s"]
            table.append(m)
    lines = [
        "| shape (random weights) | cell | load s | peak RSS MiB (load / train) | peak anon MiB (load / train) | "
        "peak RSS vs 1 process | peak anon vs 1 process | load time vs 1 process | estimate RSS / anon MiB "
        "(error) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in table:
        e = m["estimate"]
        errors = (e["peak_rss"] / m["peak_rss"] - 1, e["peak_anonymous"] / m["peak_anon"] - 1)
        lines.append(
            f"| {m['shape']} | {m['cell']} | {m['load_s']:.1f} | {m['peak_rss'] / MIB:,.0f} "
            f"({m['load_rss'] / MIB:,.0f} / {m['train_rss'] / MIB:,.0f}) | {m['peak_anon'] / MIB:,.0f} "
            f"({m['load_anon'] / MIB:,.0f} / {m['train_anon'] / MIB:,.0f}) | {m['rss_ratio']:.2f}x | "
            f"{m['anon_ratio']:.2f}x | {m['load_ratio']:.2f}x | {e['peak_rss'] / MIB:,.0f} / "
            f"{e['peak_anonymous'] / MIB:,.0f} ({errors[0]:+.1%} / {errors[1]:+.1%}) |"
        )
    return table, "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(m["shape"] for m in table))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        cells = [m for m in table if m["shape"] == shape]
        x = range(len(cells))
        ax.bar([i - 0.2 for i in x], [m["peak_rss"] / 2**30 for m in cells], 0.4, label="peak RSS")
        ax.bar([i + 0.2 for i in x], [m["peak_anon"] / 2**30 for m in cells], 0.4, label="peak anonymous")
        ax.scatter(x, [m["estimate"]["peak_rss"] / 2**30 for m in cells], color="k", marker="_", s=400,
                   label="estimate (RSS)", zorder=3)  # fmt: skip
        ax.set_xticks(list(x), [m["cell"].replace(", ", "\n") for m in cells], fontsize=7)
        ax.set_ylabel("GiB per rank")
        ax.set_title(f"{shape} (random weights), NF4 + LoRA")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def big(tokens: int, work: Path) -> None:
    """The 32B-class shape, written directly in NF4, trained 2 steps on 2 ranks with activation checkpointing
    (without it the estimate is 11.5 GiB per rank: more than half of this 23 GiB machine); its estimate beside."""
    from shapes import write_quantized

    base = str(write_quantized("qwen2.5-32b", "nf4"))
    ranks = run_cell(base, 2, True, tokens, work / "32b", checkpointing=True)
    cell = "2 ranks, sharded load of the pre-quantized base, checkpointing"
    row = {"shape": "qwen2.5-32b", "cell": cell, "processes": 2, "round": 0, "ranks": ranks,
           "estimate": estimate(base, 2, tokens, checkpointing=True)}  # fmt: skip
    print(_line(row), flush=True)
    total = sum(r["hwm"] for r in ranks)
    seconds = max(r["load_seconds"] for r in ranks), max(r["train_seconds"] for r in ranks)
    table = (
        _line(row) + f"\n\nRandom weights of the Qwen2.5-32B shape. Both ranks together: peak RSS {total / 2**30:.2f} "
        f"GiB (the machine has 23 GiB). Load {seconds[0]:.0f} s, 2 training steps {seconds[1]:.0f} s."
    )
    write_results("shard_load-32b", {"machine": machine(), "tokens": tokens, "rows": [row]}, table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--big", action="store_true", help="the 32B-class shape instead")
    p.add_argument("--work", default="/tmp/qadapters-shard-load")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.big:
        return big(args.tokens, Path(args.work))
    rows = measure(args.shapes, args.rounds, args.tokens, Path(args.work))
    table, text = summarize(rows)
    write_results("shard_load", {"machine": machine(), "tokens": args.tokens, "rows": rows, "table": table}, text)
    plot(table, RESULTS / "shard_load.png")
    print(text)


if __name__ == "__main__":
    main()
