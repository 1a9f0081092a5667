"""Adaptation methods side by side: same data, budget, length and seed for every method.

    python benchmarks/methods.py --quick                # sentiment, < 10 minutes on 2 CPU cores
    python benchmarks/methods.py                        # the full budget (what results are reported from)
    python benchmarks/methods.py --task legal --quick   # the legal category task (licence notices)
    python benchmarks/methods.py --model minilm-l6      # the packaged encoder instead of the LLM

Tasks: ``sentiment`` (Rotten Tomatoes, split by movie, max length 64) and ``legal`` (licence
notice -> one of 4 categories, split by licence within each category, class-weighted loss,
max length 128; the data of ``recipes/legal.py --task category``).

For each method, in its own subprocess (so peak memory is its own): trainable parameters,
peak memory (RSS on CPU, max allocated on GPU), training throughput (examples/s and tokens/s,
load and evaluation excluded; load time reported apart), held-out accuracy and macro-F1, and
artifact size. Writes results/methods[-quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

METHODS = {
    # name: (adapter, quantization, train every base weight)
    "full fine-tuning": ("none", None, True),
    "head only": ("none", "nf4", False),
    "LoRA": ("lora", None, False),
    "QLoRA nf4": ("lora", "nf4", False),
    "LoRA int8": ("lora", "int8", False),
    "DoRA nf4": ("dora", "nf4", False),
    "bottleneck Pfeiffer nf4": ("pfeiffer", "nf4", False),
    "bottleneck Houlsby nf4": ("houlsby", "nf4", False),
}
# The full budgets are sized so that all eight methods of both tasks run in about 80 minutes on 2 CPU cores
# (measured: sentiment 40, legal 37);
# the legal recipe's own numbers (recipes/results) come from its larger budget (2,000 rows, 2 epochs).
BUDGETS = {"quick": {"train": 160, "eval": 200, "epochs": 1}, "full": {"train": 1600, "eval": 500, "epochs": 1}}
LEGAL_BUDGETS = {"quick": {"train": 160, "eval": 200, "epochs": 1}, "full": {"train": 480, "eval": 300, "epochs": 1}}


def task_data(task: str, budget: dict, seed: int) -> tuple[list[dict], list[dict], object, int]:
    """(train rows, held-out rows, head, max length) of ``task``."""
    import adapters
    from adapters.data.sources import group_split, rotten_tomatoes, sample

    if task == "sentiment":
        train_rows, test_rows = group_split(rotten_tomatoes(), "group", 0.2, seed)
        head, max_length = adapters.Classification(labels=["negative", "positive"]), 64
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
        import legal

        licences = legal.read_licences(legal.data_root())
        notices = legal.cap_per_licence(legal.read_notices(legal.data_root(), licences), 60, seed)
        train_rows, test_rows = group_split(
            legal.category_task(licences, notices), "group", 0.2, seed, stratify="label"
        )
        head, max_length = None, 128
    train_rows, test_rows = sample(train_rows, budget["train"], seed), sample(test_rows, budget["eval"], seed)
    if head is None:  # class-weighted, as the legal recipe
        head = adapters.Classification(
            labels=legal.NOTICE_CATEGORIES,
            class_weights=legal.inverse_frequency_weights(train_rows, legal.NOTICE_CATEGORIES),
        )
    return train_rows, test_rows, head, max_length


def run_one(args) -> dict:
    """One method, in this process: build, train, evaluate, save; print the measurements."""
    import torch
    from common import folder_mb, peak_memory_mb

    import adapters

    kind, quantization, full = METHODS[args.method]
    budget = (BUDGETS if args.task == "sentiment" else LEGAL_BUDGETS)[args.budget]
    train_rows, test_rows, head, max_length = task_data(args.task, budget, args.seed)
    adapter = {
        "none": None,
        "lora": adapters.LoRA(r=8),
        "dora": adapters.LoRA(r=8, dora=True),
        "pfeiffer": adapters.Bottleneck(placement="pfeiffer"),
        "houlsby": adapters.Bottleneck(placement="houlsby"),
    }[kind]
    started = time.perf_counter()
    model = adapters.adapt(
        args.model, adapter=adapter, head=head, quantization=quantization, max_length=max_length, seed=args.seed
    )
    if full:  # every weight trains: the reference point of the parameter-efficient methods
        for p in model.parameters():
            p.requires_grad_(True)
    load_seconds = time.perf_counter() - started
    counts = model.parameter_counts()
    lr = {"none": 1e-3 if not full else 5e-5, "pfeiffer": 1e-3, "houlsby": 1e-3}.get(kind, 5e-4)
    metrics = adapters.train(
        model,
        train_rows,
        test_rows,
        adapters.TrainConfig(
            epochs=budget["epochs"], lr=lr, head_lr=2e-3, batch_size=16, seed=args.seed, progress=False
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "artifact")
        size = folder_mb(Path(tmp) / "artifact")
    if full:  # the artifact of full fine-tuning is the whole model
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {
        "method": args.method,
        "trainable": counts["trainable"],
        "total": counts["total"],
        "trainable_pct": 100 * counts["trainable"] / counts["total"],
        "peak_mb": peak_memory_mb(),
        "load_seconds": load_seconds,
        "examples_per_second": metrics["train_examples_per_second"],
        "tokens_per_second": metrics["train_tokens_per_second"],
        "accuracy": metrics["eval_accuracy"],
        "macro_f1": metrics["eval_macro_f1"],
        "eval_count": int(metrics["eval_count"]),
        "artifact_mb": size,
        "lr": lr,
        "steps": metrics["steps"],
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | % | peak MB | load s | examples/s | tokens/s | accuracy | macro-F1 "
        "| artifact MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['load_seconds']:.1f} | {r['examples_per_second']:.2f} | {r['tokens_per_second']:.0f} | "
            f"{r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['artifact_mb']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in rows:
        left.scatter(r["trainable"], r["macro_f1"])
        left.annotate(
            r["method"], (r["trainable"], r["macro_f1"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log)")
    left.set_ylabel("held-out macro-F1")
    left.set_title("score vs trainable parameters")
    right.barh([r["method"] for r in rows], [r["peak_mb"] for r in rows])
    right.set_xlabel("peak memory (MB)")
    right.set_title("peak memory per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budget (< 10 min on 2 CPU cores)")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sentiment", choices=["sentiment", "legal"])
    p.add_argument("--methods", nargs="*", default=list(METHODS), help="a subset of: " + ", ".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="results file name (default: methods[-quick][-MODEL])")
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    p.add_argument("--budget", default="full", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.method:
        print(json.dumps(run_one(args)))
        return
    from common import machine, run_child, write_results

    budget = "quick" if args.quick else "full"
    rows = []
    for method in args.methods:
        print(f"{method} ...", flush=True)
        rows.append(
            run_child(
                __file__,
                [
                    "--method",
                    method,
                    "--budget",
                    budget,
                    "--model",
                    args.model,
                    "--task",
                    args.task,
                    "--seed",
                    str(args.seed),
                ],
                warm=args.warm_start,
            )
        )
        print(
            f"  accuracy {rows[-1]['accuracy']:.4f}, {rows[-1]['examples_per_second']:.2f} examples/s, "
            f"peak {rows[-1]['peak_mb']:.0f} MB",
            flush=True,
        )
    name = args.name or "methods" + ("-legal" if args.task == "legal" else "") + ("-quick" if args.quick else "") + (
        "" if args.model == "smollm2-135m" else f"-{Path(args.model).name}"
    )
    spent = (BUDGETS if args.task == "sentiment" else LEGAL_BUDGETS)[budget]
    payload = {
        "machine": machine(),
        "model": args.model,
        "task": args.task,
        "budget": spent,
        "seed": args.seed,
        "results": rows,
    }
    what = (
        "Sentiment (Rotten Tomatoes, split by movie), max length 64"
        if args.task == "sentiment"
        else "Legal category (licence notices, split by licence within each category, class-weighted), max length 128"
    )
    text = table(rows) + (
        f"\n\n{what}, model `{args.model}`, {spent['train']} training rows, {spent['eval']} held-out "
        f"rows, batch 16, seed {args.seed}, {spent['epochs']} epoch(s). Learning rates: adapters 5e-4 "
        f"(bottleneck and head only 1e-3, full fine-tuning 5e-5), head 2e-3."
        + (
            ""
            if rows[0]["device"].startswith("cuda")
            else " Peak MB is the process's peak RSS, which on CPU also counts heap "
            "that glibc keeps after freeing (see `common.EXACT_RSS`): read differences under ~20% "
            "as noise."
        )
    )
    path = write_results(name, payload, text, args.out)
    plot(rows, path.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
