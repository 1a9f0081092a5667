"""One decoding step of a served batch that mixes LoRA adapters: peft's mixed-batch forward against our segmented
step, and against the same batch through one adapter.

    python benchmarks/mixed_batch.py                 # SmolLM2-135M, fp32 and NF4, 3 rounds
    python benchmarks/mixed_batch.py --quick --model PATH

Each side loads two LoRA chat artifacts (r=8 on all linear layers, ``B`` seeded random so the update is really
computed) into one served base, prefills 16 prompts through the scheduler (``serving/scheduler.py``) and
times its decoding steps, in a fresh process; sides alternate their order between rounds; medians. Sides:

* ``peft``: rows through peft's own ``adapter_names`` hooks (a gather and scatter per adapter in every layer);
* ``segmented``: the default (``methods/lora_fused.py``), each adapter's update added to its own contiguous rows;
* ``one``: the 16 rows all on one adapter (the plain lean forward): what mixing costs is the gap to it.

Both mixed sides must produce the same greedy tokens. A stacked variant (every adapter's ``A`` in one product,
each row's columns scaled by its own adapter's ``alpha/r``) measured no faster than the segmented step at two
adapters (fp32 116 vs 110 ms, NF4 169 vs 138 ms per step, 2026-12-07, this script) and was not kept.
Writes results/mixed_batch[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

SIDES = {
    "peft": "peft's mixed-batch forward (adapter_names)",
    "segmented": "segmented step (default: each adapter on its own rows)",
    "one": "one adapter for all rows (no mixing)",
}
PROMPT = "Review: a fine film with a great cast and a story that holds together\nThe review says"


def _artifacts(model_name: str, quantization: str | None, folder: Path, seed: int) -> dict[str, Path]:
    from common import random_lora_b

    import adapters

    paths = {}
    for i in range(2):
        model = adapters.adapt(
            model_name,
            adapter=adapters.LoRA(r=8),
            head=adapters.CausalLM(max_new_tokens=8),
            quantization=quantization,
            dtype="float32",
            seed=seed + i,
        )
        random_lora_b(model, seed + i)
        paths[f"gen{i}"] = model.save_pretrained(folder / f"gen{i}-{quantization}")
    return paths


def run_side(side: str, model_name: str, quantization: str | None, steps: int, seed: int) -> dict:
    import torch

    from adapters.methods import lora
    from adapters.serving.backbones import load_served
    from adapters.serving.scheduler import Scheduler, Sequence

    if side == "peft":
        lora._all_lean = lambda model: False  # the route falls back to peft's adapter_names hooks
    with tempfile.TemporaryDirectory() as tmp:
        served = load_served(_artifacts(model_name, quantization, Path(tmp), seed))
        model = served["gen0"].group.model
        prompt = model.tokenizer(PROMPT)["input_ids"]
        names = ["gen0"] if side == "one" else ["gen0", "gen1"]
        scheduler = Scheduler(served["gen0"].group)
        rows = [
            Sequence(member=served[names[i % len(names)]], prompt=list(prompt), max_new_tokens=10_000, emit=_ignore)
            for i in range(16)
        ]
        scheduler.waiting += rows
        with torch.inference_mode():
            scheduler._prefill_together(rows)
            scheduler._decode_step()  # warm-up
            started = time.perf_counter()
            for _ in range(steps):
                scheduler._decode_step()
            seconds = (time.perf_counter() - started) / steps
    return {"side": side, "step_ms": 1000 * seconds, "tokens": [r.generated for r in scheduler.batch.rows]}


def _ignore(piece, finish) -> None:
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps, one round, fp32 only")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--quantization", help=argparse.SUPPRESS)  # internal: one run
    args = p.parse_args(argv)
    steps = 4 if args.quick else 40
    if args.side:
        quantization = None if args.quantization in (None, "none") else args.quantization
        print(json.dumps(run_side(args.side, args.model, quantization, steps, args.seed)))
        return {}
    from common import alternating_runs, machine, write_results

    rounds = 1 if args.quick else args.rounds
    results, lines = {}, ["| base | side | ms per step (median) | x segmented | same tokens |", "|---|---|---|---|---|"]
    for quantization in ["none"] if args.quick else ["none", "nf4"]:
        runs = alternating_runs(
            __file__,
            list(SIDES),
            rounds,
            ["--model", args.model, "--seed", str(args.seed), "--quantization", quantization]
            + (["--quick"] if args.quick else []),
            lambda x: f"{x['step_ms']:.0f} ms per step",
            env=None,  # glibc's malloc as the server runs it (common.EXACT_RSS would map every dequantized weight)
            warm=args.warm_start,
        )
        reference = runs["segmented"][0]["tokens"]
        segmented = statistics.median(x["step_ms"] for x in runs["segmented"])
        for side, label in SIDES.items():
            median = statistics.median(x["step_ms"] for x in runs[side])
            same = "-" if side == "one" else ("yes" if all(x["tokens"] == reference for x in runs[side]) else "NO")
            name = "fp32" if quantization == "none" else quantization
            lines.append(f"| {name} | {label} | {median:.1f} | {median / segmented:.2f} | {same} |")
        results[quantization] = {
            side: [{k: v for k, v in x.items() if k != "tokens"} for x in r] for side, r in runs.items()
        }
    text = "\n".join(lines) + (
        f"\n\n`{args.model}`, two LoRA r=8 artifacts (all linear layers, B seeded random) served on one base, 16 rows "
        f"(8 per adapter, sorted into one run each) decoding {steps} steps after a prompt of "
        f"{len(PROMPT.split())} words; {rounds} round(s) in alternating order, each side in a fresh process with "
        "glibc's malloc as it comes (as the server runs)."
    )
    payload = {"machine": machine(), "model": args.model, "steps": steps, "runs": results}
    write_results("mixed_batch" + ("-quick" if args.quick else ""), payload, text, args.out)
    print(text)
    return payload


if __name__ == "__main__":
    main()
