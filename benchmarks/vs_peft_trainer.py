"""Are we better than the script a user writes from the PEFT and transformers docs?

    python benchmarks/vs_peft_trainer.py --quick      # 2 repetitions, a small budget
    python benchmarks/vs_peft_trainer.py              # 3 repetitions, 64 steps each

The baseline: ``BitsAndBytesConfig`` (NF4, double quantization, float32 compute on CPU) +
``AutoModelForSequenceClassification`` + ``prepare_model_for_kbit_training`` (no gradient
checkpointing, as a careful user would choose for a 135M model) + ``get_peft_model`` (LoRA r=8,
alpha 16, dropout 0.05, all linear layers, ``task_type="SEQ_CLS"`` so the head trains) +
``Trainer``. Ours: ``adapters.adapt`` + ``adapters.train`` with the same model, data, LoRA
config, batch size, learning rate (one rate for adapter and head on both sides), schedule,
warmup, steps and seed. Both run in the same invocation, alternating, each in a fresh
subprocess; we report ours/baseline ratios of time per training step, peak memory and held-out
accuracy (median and range over the repetitions). On CPU both sides run with glibc's mmap threshold
at 64 KiB (``common.EXACT_RSS``) so that peak RSS counts live memory, not heap holes that depend
on the order of batch shapes; that slows both sides alike. Writes results/vs_peft_trainer[-quick].{json,md}.
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

SETTINGS = {"lr": 5e-4, "batch_size": 16, "max_length": 64, "warmup_ratio": 0.06, "r": 8, "alpha": 16, "dropout": 0.05}
BUDGETS = {"quick": {"train": 96, "eval": 200, "repeats": 2}, "full": {"train": 1024, "eval": 500, "repeats": 3}}


def _data(budget: dict, seed: int):
    from adapters.sources import group_split, rotten_tomatoes, sample

    train, test = group_split(rotten_tomatoes(), "group", 0.2, seed)
    return sample(train, budget["train"], seed), sample(test, budget["eval"], seed)


def run_ours(model_name: str, budget: dict, seed: int) -> dict:
    import adapters

    train_rows, test_rows = _data(budget, seed)
    model = adapters.adapt(model_name, adapter=adapters.LoRA(r=SETTINGS["r"], alpha=SETTINGS["alpha"],
                                                             dropout=SETTINGS["dropout"]),
                           head=adapters.Classification(labels=["negative", "positive"]), quantization="nf4",
                           max_length=SETTINGS["max_length"], seed=seed)
    metrics = adapters.train(model, train_rows, test_rows, adapters.TrainConfig(
        epochs=1, lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"], warmup_ratio=SETTINGS["warmup_ratio"],
        seed=seed, progress=False))
    return {"seconds_per_step": metrics["train_seconds"] / metrics["steps"], "steps": metrics["steps"],
            "accuracy": metrics["eval_accuracy"]}


def run_baseline(model_name: str, budget: dict, seed: int) -> dict:
    """The hand-written PEFT + Trainer script, as its docs show it."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    from adapters.packaged import PACKAGED_MODELS, resolve_packaged

    path = str(resolve_packaged(model_name)) if model_name in PACKAGED_MODELS else model_name
    train_rows, test_rows = _data(budget, seed)
    labels = {"negative": 0, "positive": 1}
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(rows):
        ds = Dataset.from_list([{"text": r["text"], "label": labels[r["label"]]} for r in rows])
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=SETTINGS["max_length"]),
                      batched=True, remove_columns=["text"])

    cuda = torch.cuda.is_available()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, quantization_config=bnb, device_map={"": 0 if cuda else "cpu"},
        dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"],
                                             lora_dropout=SETTINGS["dropout"], target_modules="all-linear",
                                             task_type="SEQ_CLS"))
    args = TrainingArguments(output_dir="/tmp/vs_peft_trainer", per_device_train_batch_size=SETTINGS["batch_size"],
                             per_device_eval_batch_size=2 * SETTINGS["batch_size"], learning_rate=SETTINGS["lr"],
                             num_train_epochs=1, lr_scheduler_type="linear",
                             # the same whole number of warmup steps as ours: int(ratio x steps)
                             warmup_steps=int(SETTINGS["warmup_ratio"] * -(-len(train_rows) // SETTINGS["batch_size"])),
                             weight_decay=0.0, max_grad_norm=1.0, seed=seed, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=not cuda, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows),
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    prediction = trainer.predict(encode(test_rows))
    accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
    return {"seconds_per_step": seconds / result.global_step, "steps": result.global_step, "accuracy": accuracy}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, help="repetitions of each side (default: 2 quick, 3 full)")
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--budget", default="full", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        from common import peak_memory_mb

        run = run_ours if args.side == "ours" else run_baseline
        result = run(args.model, BUDGETS[args.budget], args.seed)
        print(json.dumps({**result, "peak_mb": peak_memory_mb()}))
        return
    from common import EXACT_RSS, RESULTS, machine, run_child, write_results

    budget = "quick" if args.quick else "full"
    repeats = args.repeats or BUDGETS[budget]["repeats"]
    runs = {"ours": [], "baseline": []}
    for i in range(repeats):
        for side in ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours"):  # alternate the order
            runs[side].append(run_child(__file__, ["--side", side, "--budget", budget, "--model", args.model,
                                                   "--seed", str(args.seed)], env=EXACT_RSS))
            print(f"repeat {i + 1} {side}: {runs[side][-1]}", flush=True)
    lines = ["| quantity | ours (median) | baseline (median) | ratio ours/baseline (median) | ratio range |",
             "|---|---|---|---|---|"]
    summary = {}
    for key, label in [("seconds_per_step", "seconds per training step"), ("peak_mb", "peak memory (MB)"),
                       ("accuracy", "held-out accuracy")]:
        ratios = [o[key] / b[key] for o, b in zip(runs["ours"], runs["baseline"]) if b[key]]
        summary[key] = {"ours": statistics.median(r[key] for r in runs["ours"]),
                        "baseline": statistics.median(r[key] for r in runs["baseline"]),
                        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        s = summary[key]
        lines.append(f"| {label} | {s['ours']:.4g} | {s['baseline']:.4g} | {s['ratio_median']:.3f} | "
                     f"{s['ratio_min']:.3f} - {s['ratio_max']:.3f} |")
    b = BUDGETS[budget]
    text = "\n".join(lines) + (
        f"\n\nBoth sides: `{args.model}` in NF4 (double quantization, float32 compute on CPU), LoRA r={SETTINGS['r']} "
        f"alpha={SETTINGS['alpha']} dropout={SETTINGS['dropout']} on all linear layers, a new 2-label head trained in "
        f"full, lr {SETTINGS['lr']} for adapter and head, linear schedule with {SETTINGS['warmup_ratio']} warmup, "
        f"batch {SETTINGS['batch_size']}, max length {SETTINGS['max_length']}, dynamic padding, 1 epoch of "
        f"{b['train']} rows, {b['eval']} held-out rows, seed {args.seed}, {repeats} repetitions alternating order, "
        f"each in a fresh process (on CPU with MALLOC_MMAP_THRESHOLD_=65536, so peak RSS counts live memory). Baseline: AutoModelForSequenceClassification + prepare_model_for_kbit_training "
        f"(no gradient checkpointing) + get_peft_model(task_type=SEQ_CLS) + Trainer.")
    payload = {"machine": machine(), "model": args.model, "budget": b, "settings": SETTINGS, "runs": runs,
               "summary": summary}
    write_results("vs_peft_trainer" + ("-quick" if args.quick else ""), payload, text,
                  Path(args.out) if args.out else RESULTS)
    print(text)


if __name__ == "__main__":
    main()
