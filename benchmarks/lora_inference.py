"""Evaluation with LoRA unmerged: peft's forward vs the lean inference path, and the batch size.

    python benchmarks/lora_inference.py              # 500 held-out rows of the vs_peft_trainer job, 2 rounds
    python benchmarks/lora_inference.py --quick --model PATH

Each side loads the job's model (NF4 + LoRA r=8 on all linear layers; the LoRA ``B`` matrices set to
seeded random values, as after training, so the update is really computed), then times
``adapters.evaluate`` on the held-out rows in a fresh process; the sides alternate their order
between rounds; medians. Sides:

* ``peft``: peft's own LoRA forward, batches of up to 8,192 padded tokens (this library before the lean
  path);
* ``lean-8192``: the lean path (``adapters/lora_fused.py``), the same batches;
* ``lean``: the lean path with the defaults (2,048 padded tokens per batch on CPU).

All sides must report the same loss (the same numbers, computed differently). Writes
results/lora_inference[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

SIDES = {
    "peft": "peft's LoRA forward, batches of <= 8,192 tokens",
    "lean-8192": "lean path, batches of <= 8,192 tokens",
    "lean": "lean path, batches of <= 2,048 tokens (defaults)",
}
ROWS = {"quick": 40, "full": 500}


def run_side(side: str, model_name: str, rows: int, seed: int) -> dict:
    from common import random_lora_b
    from vs_peft_trainer import BUDGETS, SETTINGS, _data

    import adapters
    from adapters.data import batching

    _, test_rows = _data(BUDGETS["full"], seed)
    model = adapters.adapt(
        model_name,
        adapter=adapters.LoRA(r=SETTINGS["r"], alpha=SETTINGS["alpha"], fused=side != "peft"),
        head=adapters.Classification(labels=["negative", "positive"]),
        quantization="nf4",
        max_length=SETTINGS["max_length"],
        seed=seed,
    )
    random_lora_b(model, seed)
    if side in ("peft", "lean-8192"):
        batching.INFERENCE_TOKENS = {"cpu": 8192, "gpu": 8192}
    started = time.perf_counter()
    metrics = adapters.evaluate(model, test_rows[:rows])
    return {
        "side": side,
        "eval_seconds": time.perf_counter() - started,
        "loss": metrics["eval_loss"],
        "accuracy": metrics["eval_accuracy"],
        "rows": metrics["eval_count"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: one run
    args = p.parse_args(argv)
    rows = ROWS["quick" if args.quick else "full"]
    if args.side:
        print(json.dumps(run_side(args.side, args.model, rows, args.seed)))
        return {}
    from common import alternating_runs, machine, write_results

    runs = alternating_runs(
        __file__,
        list(SIDES),
        args.rounds,
        ["--model", args.model, "--seed", str(args.seed)] + (["--quick"] if args.quick else []),
        lambda x: f"eval {x['eval_seconds']:.1f} s, loss {x['loss']:.5f}",
        warm=args.warm_start,
    )
    losses = [x["loss"] for side in SIDES for x in runs[side]]
    same = max(losses) - min(losses) < 1e-4
    base = statistics.median(x["eval_seconds"] for x in runs["peft"])
    lines = ["| side | evaluation s (median) | x peft | loss |", "|---|---|---|---|"]
    for side, label in SIDES.items():
        med = statistics.median(x["eval_seconds"] for x in runs[side])
        lines.append(f"| {label} | {med:.1f} | {med / base:.2f} | {runs[side][0]['loss']:.5f} |")
    text = "\n".join(lines) + (
        f"\n\n`{args.model}` in NF4, LoRA r=8 on all linear layers (B seeded random), `adapters.evaluate` on "
        f"{rows} held-out rows of the vs_peft_trainer job, {args.rounds} round(s) in alternating order, each run in "
        f"a fresh process (MALLOC_MMAP_THRESHOLD_=65536, as vs_peft_trainer). Same loss on every side: "
        f"{'yes' if same else 'NO'} (spread {max(losses) - min(losses):.1e})."
    )
    payload = {"machine": machine(), "model": args.model, "rows": rows, "runs": runs, "same_loss": same}
    write_results("lora_inference" + ("-quick" if args.quick else ""), payload, text, args.out)
    print(text)
    return payload


if __name__ == "__main__":
    main()
