"""A CausalLM training step on the legal assistant's conversations: the vocabulary logits of every position
against those of the positions the loss reads (the ones before a response token), the default.

    python benchmarks/lm_loss.py              # packaged SmolLM2-135M, 2 rounds (about 10 minutes on 2 cores)
    python benchmarks/lm_loss.py --quick --model PATH

A conversation of the assistant recipe (``recipes/legal_assistant.py``) is long and its answers are short:
a system message listing 5 retrieved licences and what their categories ask, the client's notice, then 8
exchanges, every assistant turn learned. Projecting every position onto a 49k vocabulary in fp32 makes
(batch x length x vocabulary) logits, their log-softmax and their gradient; only the positions before a
response token are needed (``CausalLM.loss_targets``). Sides, each in a fresh process, alternating order:

* ``every``: every position's logits (what the loss computed before);
* ``response``: the logits of the positions the loss reads (``adapters.CausalLM``'s default).

Each: LoRA r=16 on the recipe's model (fp32), one batch of 8 training conversations (retrieval over the
conversations' licences and 40 others, the recipe's ``--quick`` index: the same message lengths), 2 steps
(forward, backward, AdamW) on it; peak resident memory (MALLOC_MMAP_THRESHOLD_, ``common.EXACT_RSS``), the
median step time, the first step's loss (the sides must agree). Writes results/lm_loss[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

SIDES = {"every": "every position's logits", "response": "logits where the loss reads (default)"}


def _batch(model, rows: int, max_length: int) -> dict:
    """``rows`` training conversations of the assistant recipe, collated as training collates them."""
    from legal_assistant import conversation, licence_index, parse_args, retrieve, split

    from adapters.data.encoding import Collator, encode_rows

    # --quick's 128 tokens end inside the retrieved licences' list: no MiniLM index then (the rows, cut from the
    # start, keep their last 128 tokens whether or not the list was there)
    args = parse_args(["--quick", "--output", "/nonexistent/unused", "--retrieval", "5" if max_length > 128 else "0"])
    train_rows, _ = split(args)
    train_rows = train_rows[:rows]
    retrieve(licence_index(args, train_rows), train_rows, args.retrieval, gold=True, seed=0, guide=True)
    data = [{"messages": conversation(row)} for row in train_rows]
    columns, _ = encode_rows(data, model.tokenizer, model.head_spec, "text", "label", max_length, "data")
    return Collator(model.tokenizer, model.head_spec)([{k: columns[k][i] for k in columns} for i in range(rows)])


def run_side(side: str, model_name: str, rows: int, max_length: int) -> dict:
    import torch
    from common import peak_memory_mb

    import adapters
    from adapters.heads.causal import CausalLM, every_position

    if side == "every":  # every position but the last, as the memory estimate counts it
        CausalLM.loss_targets = lambda self, labels: every_position(labels)  # type: ignore[method-assign]
    head = adapters.CausalLM(mask_history=False)
    model = adapters.adapt(
        model_name, adapter=adapters.LoRA(r=16, alpha=32, dropout=0.0), head=head, max_length=max_length, seed=0
    )
    batch = _batch(model, rows, max_length)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    model.train()
    losses, seconds = [], []
    for _ in range(2):
        started = time.perf_counter()
        loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss))
    labelled = int((batch["labels"] != -100).sum())
    return {
        "side": side,
        "peak_mb": peak_memory_mb(),
        "step_seconds": statistics.median(seconds),
        "loss": losses[0],
        "shape": list(batch["input_ids"].shape),
        "labelled_tokens": labelled,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rows of 128 tokens, one round, no retrieval")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: one run
    args = p.parse_args(argv)
    rows, max_length = (2, 128) if args.quick else (8, 960)
    if args.side:
        print(json.dumps(run_side(args.side, args.model, rows, max_length)))
        return {}
    from common import alternating_runs, machine, write_results

    runs = alternating_runs(
        __file__,
        list(SIDES),
        1 if args.quick else args.rounds,
        ["--model", args.model] + (["--quick"] if args.quick else []),
        lambda x: f"peak {x['peak_mb']:.0f} MB, step {x['step_seconds']:.2f} s, loss {x['loss']:.5f}",
        warm=args.warm_start,
    )
    payload = {"machine": machine(), "model": args.model, "runs": runs}
    text = _table(payload, args)
    write_results("lm_loss" + ("-quick" if args.quick else ""), payload, text, args.out)
    print(text)
    return payload


def _table(payload: dict, args) -> str:
    runs = payload["runs"]
    losses = [x["loss"] for side in SIDES for x in runs[side]]
    base = {k: statistics.median(x[k] for x in runs["every"]) for k in ("peak_mb", "step_seconds")}
    lines = ["| logits | peak MB (median) | x every | step s (median) | x every | loss |", "|---|---|---|---|---|---|"]
    for side, label in SIDES.items():
        peak = statistics.median(x["peak_mb"] for x in runs[side])
        step = statistics.median(x["step_seconds"] for x in runs[side])
        lines.append(
            f"| {label} | {peak:.0f} | {peak / base['peak_mb']:.2f} | {step:.2f} | "
            f"{step / base['step_seconds']:.2f} | {runs[side][0]['loss']:.5f} |"
        )
    first = runs["every"][0]
    return "\n".join(lines) + (
        f"\n\n`{args.model}` fp32, LoRA r=16, a batch of {first['shape'][0]} legal assistant conversations padded "
        f"to {first['shape'][1]} tokens, {first['labelled_tokens']} of them learned; 2 steps on it (their mean), "
        f"{len(runs['every'])} round(s) alternating, each side in a fresh process (MALLOC_MMAP_THRESHOLD_=65536). "
        f"Loss spread across sides {max(losses) - min(losses):.1e}."
    )


if __name__ == "__main__":
    main()
