"""LoRA on all blocks, the top half, or the top quarter: training time, peak memory and accuracy.

    python benchmarks/lora_layers.py            # the sentiment job of vs_peft_trainer.py at its full budget
    python benchmarks/lora_layers.py --quick --model PATH

Nothing below the lowest adapted block needs a gradient, so autograd keeps no activation there and
backward stops at that block (``LoRA(layers=...)``): the classic "freeze the early layers". Same job,
settings and seed as ``vs_peft_trainer.py``'s ``ours`` side (packing, shared dropout), each
configuration in a fresh process, the order alternating between rounds; medians. Writes
results/lora_layers[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

SIDES = [
    ("ours", "all blocks"),
    ("ours-top-half", "top half of the blocks"),
    ("ours-top-quarter", "top quarter of the blocks"),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    from common import alternating_runs, machine, write_results
    from vs_peft_trainer import BUDGETS, SETTINGS

    budget = "quick" if args.quick else "full"
    script = str(Path(__file__).with_name("vs_peft_trainer.py"))
    runs = alternating_runs(
        script,
        [side for side, _ in SIDES],
        args.rounds,
        ["--budget", budget, "--model", args.model, "--seed", str(args.seed)],
        lambda x: (
            f"train {x['train_seconds']:.0f} s, {x['peak_mb']:.0f} MB, "
            f"accuracy {x['accuracy']:.3f}, {x['trainable']:,} trainable"
        ),
        warm=args.warm_start,
    )
    full = {k: statistics.median(x[k] for x in runs["ours"]) for k in ("train_seconds", "peak_mb")}
    lines = [
        "| LoRA on | blocks | trainable params | training s | x all | peak MB | x all | eval s | accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side, label in SIDES:
        med = {
            k: statistics.median(x[k] for x in runs[side])
            for k in ("train_seconds", "peak_mb", "eval_seconds", "accuracy", "trainable")
        }
        layers = runs[side][0]["lora_layers"]
        blocks = "all" if layers is None else f"{layers[0]}-{layers[-1]}"
        lines.append(
            f"| {label} | {blocks} | {med['trainable']:,.0f} | {med['train_seconds']:.0f} | "
            f"{med['train_seconds'] / full['train_seconds']:.2f} | {med['peak_mb']:.0f} | "
            f"{med['peak_mb'] / full['peak_mb']:.2f} | {med['eval_seconds']:.0f} | {med['accuracy']:.3f} |"
        )
    b = BUDGETS[budget]
    text = "\n".join(lines) + (
        f"\n\n`{args.model}` in NF4, LoRA r={SETTINGS['r']} alpha={SETTINGS['alpha']} on all linear layers of the "
        f"chosen blocks, lr {SETTINGS['lr']}, batch {SETTINGS['batch_size']}, 1 epoch of {b['train']} rows, "
        f"{b['eval']} held-out rows, seed {args.seed}, {args.rounds} round(s), each run in a fresh process (peak RSS "
        f"with MALLOC_MMAP_THRESHOLD_=65536)."
    )
    payload = {"machine": machine(), "model": args.model, "budget": b, "settings": SETTINGS, "runs": runs}
    write_results("lora_layers" + ("-quick" if args.quick else ""), payload, text, args.out)
    print(text)
    return payload


if __name__ == "__main__":
    main()
