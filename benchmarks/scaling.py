"""How cost grows with sequence length and batch size, with and without gradient checkpointing.

    python benchmarks/scaling.py --quick     # lengths 64-256 at batch 4 (about 6 minutes on 2 CPU cores)
    python benchmarks/scaling.py             # lengths 64-1024 at batch 2, batches 1-16 at length 128

For QLoRA (nf4, LoRA r=8 on all linear layers) and the Pfeiffer bottleneck adapter (nf4) on the
packaged LLM: training tokens/s and peak memory (RSS on CPU, max allocated on GPU), each setting
in its own subprocess, as the length doubles (at a fixed batch) and as the batch doubles (at a
fixed length), with and without gradient checkpointing. Two sweeps through one point rather
than the full length x batch product: the product's corner (1024 x 16) alone is 16,384 tokens a
step, minutes per step and over 40 GB of activations on a CPU machine without checkpointing.
Inputs are random token ids of exactly the given length (no padding), so the numbers are about
the model, not the data. Writes results/scaling[-quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

# lengths run at batch "at_batch"; batches run at length "at_length"
GRIDS = {
    "quick": {"lengths": [64, 128, 256], "at_batch": 4, "batches": [4], "at_length": 64, "steps": 2},
    "full": {
        "lengths": [64, 128, 256, 512, 1024],
        "at_batch": 2,
        "batches": [1, 2, 4, 8, 16],
        "at_length": 128,
        "steps": 2,
    },
}


def settings(grid: dict) -> list[tuple[int, int]]:
    """(length, batch) pairs of the two sweeps, the shared point once, in order."""
    pairs = [(n, grid["at_batch"]) for n in grid["lengths"]] + [(grid["at_length"], b) for b in grid["batches"]]
    return list(dict.fromkeys(pairs))


ADAPTERS = ("QLoRA nf4", "bottleneck Pfeiffer nf4")


def run_one(args) -> dict:
    """One setting in this process: a few real training steps on fixed-length random tokens."""
    import torch
    from common import peak_memory_mb

    import adapters

    adapter = adapters.LoRA(r=8) if args.adapter == "QLoRA nf4" else adapters.Bottleneck(placement="pfeiffer")
    model = adapters.adapt(
        args.model,
        adapter=adapter,
        head=adapters.Classification(labels=["a", "b"]),
        quantization="nf4",
        max_length=max(args.length, 16),
    )
    if args.checkpointing:
        from adapters.backbone.loading import enable_checkpointing

        enable_checkpointing(model.backbone)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.backbone.get_input_embeddings().weight.shape[0]
    batch = {
        "input_ids": torch.randint(0, vocab, (args.batch, args.length), generator=generator).to(model.device),
        "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long, device=model.device),
        "labels": torch.randint(0, 2, (args.batch,), generator=generator).to(model.device),
    }
    model(**batch)["loss"].backward()  # a warm-up step, not timed
    optimizer.step()
    optimizer.zero_grad()
    started = time.perf_counter()
    for _ in range(args.steps):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = (time.perf_counter() - started) / args.steps
    return {
        "adapter": args.adapter,
        "length": args.length,
        "batch": args.batch,
        "checkpointing": args.checkpointing,
        "seconds_per_step": seconds,
        "tokens_per_second": args.batch * args.length / seconds,
        "peak_mb": peak_memory_mb(),
    }


def plot(rows: list[dict], grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [
        ("length", "batch", grid["at_batch"], "sequence length"),
        ("batch", "length", grid["at_length"], "batch size"),
    ]
    sweeps = [s for s in sweeps if len({r[s[0]] for r in rows if r[s[1]] == s[2]}) > 1]  # only sweeps that vary
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(12, 4.5 * len(sweeps)), squeeze=False)
    for (x, fixed, at, xlabel), (left, right) in zip(sweeps, axes, strict=False):
        for adapter in ADAPTERS:
            for ckpt in (False, True):
                sel = sorted(
                    (r for r in rows if r["adapter"] == adapter and r["checkpointing"] == ckpt and r[fixed] == at),
                    key=lambda r: r[x],
                )
                label = f"{adapter}{' + checkpointing' if ckpt else ''}"
                left.plot([r[x] for r in sel], [r["tokens_per_second"] for r in sel], marker="o", label=label)
                right.plot([r[x] for r in sel], [r["peak_mb"] for r in sel], marker="o", label=label)
        for ax, title in ((left, "training tokens/s"), (right, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"{xlabel} ({fixed} {at})")
            ax.set_title(title)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--lengths", type=int, nargs="*", help="sequence lengths of the length sweep instead of the grid's")
    p.add_argument("--batches", type=int, nargs="*", help="batch sizes of the batch sweep instead of the grid's")
    p.add_argument("--at-batch", type=int, help="batch size of the length sweep instead of the grid's")
    p.add_argument("--at-length", type=int, help="sequence length of the batch sweep instead of the grid's")
    p.add_argument("--adapter", help=argparse.SUPPRESS)  # internal: one setting in this process
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.adapter:
        print(json.dumps(run_one(args)))
        return
    from common import machine, run_child, write_results

    grid = dict(GRIDS["quick" if args.quick else "full"])
    grid.update(
        {
            k: v
            for k, v in (
                ("lengths", args.lengths),
                ("batches", args.batches),
                ("at_batch", args.at_batch),
                ("at_length", args.at_length),
            )
            if v
        }
    )
    rows = []
    for adapter in ADAPTERS:
        for length, batch in settings(grid):
            for ckpt in (False, True):
                extra = ["--checkpointing"] if ckpt else []
                rows.append(
                    run_child(
                        __file__,
                        [
                            "--adapter",
                            adapter,
                            "--length",
                            str(length),
                            "--batch",
                            str(batch),
                            "--steps",
                            str(grid["steps"]),
                            "--model",
                            args.model,
                            *extra,
                        ],
                        warm=args.warm_start,
                    )
                )
                r = rows[-1]
                print(
                    f"{adapter:<24} len {length:>5} batch {batch:>3} ckpt {ckpt!s:<5} "
                    f"{r['tokens_per_second']:8.0f} tok/s  {r['peak_mb']:7.0f} MB",
                    flush=True,
                )
    lines = [
        "| adapter | length | batch | checkpointing | s/step | tokens/s | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['adapter']} | {r['length']} | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | "
        f"{r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | {r['peak_mb']:.0f} |"
        for r in rows
    ]
    text = "\n".join(lines) + (
        f"\n\nModel `{args.model}` in NF4; {grid['steps']} timed steps after one warm-up step, "
        f"random tokens of exactly the given length, AdamW."
    )
    name = "scaling" + ("-quick" if args.quick else "")
    path = write_results(
        name,
        {"machine": machine(), "model": args.model, "grid": grid, "results": rows},
        text,
        args.out,
    )
    plot(rows, grid, path.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
