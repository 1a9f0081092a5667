"""Are we better than the script a user writes from the PEFT and transformers docs?

    python benchmarks/vs_peft_trainer.py --quick      # 2 rounds, a small budget
    python benchmarks/vs_peft_trainer.py              # 3 rounds, 64 steps each, and the ablation

The baseline: ``BitsAndBytesConfig`` (NF4, double quantization, float32 compute on CPU) +
``AutoModelForSequenceClassification`` + ``prepare_model_for_kbit_training`` (no gradient
checkpointing, as a careful user would choose for a 135M model) + ``get_peft_model`` (LoRA r=8,
alpha 16, dropout 0.05, all linear layers, ``task_type="SEQ_CLS"`` so the head trains) +
``Trainer``, at its defaults and tuned with ``train_sampling_strategy="group_by_length"`` (the best a
user could set it). Ours: ``adapters.adapt`` + ``adapters.train`` with the same model, data, LoRA
config, batch size, learning rate (one rate for adapter and head on both sides), schedule, warmup,
epoch and seed, each side at its own defaults. The three run in the same invocation, in alternating
order, each in a fresh subprocess; we report medians and paired ratios of training wall time,
evaluation and predict wall time, peak memory, held-out accuracy and the share of real (unpadded)
tokens in what the model computed. The ablation runs ours with its levers switched off one more at
a time: the fused LoRA forward, then the shared dropout copy, then packing, then length grouping. On CPU every
side runs with glibc's mmap threshold
at 64 KiB (``common.EXACT_RSS``) so that peak RSS counts live memory, not heap holes that depend
on the order of batch shapes; that slows all sides alike. Writes results/vs_peft_trainer[-quick].{json,md}.
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
    from adapters.data.sources import group_split, rotten_tomatoes, sample

    train, test = group_split(rotten_tomatoes(), "group", 0.2, seed)
    return sample(train, budget["train"], seed), sample(test, budget["eval"], seed)


# ours at its defaults, and with levers switched off (the ablation): TrainConfig overrides
# each ablation side switches off one more lever: the fused forward, shared dropout, packing, length grouping
UNFUSED = {"lora": {"fused": False}}
UNSHARED = {"lora": {"shared_dropout": False, "fused": False}}
OURS = {
    "ours": {},
    "ours-unfused": UNFUSED,
    "ours-unshared": UNSHARED,
    "ours-grouped": {**UNSHARED, "packing": False},
    "ours-plain": {**UNSHARED, "packing": False, "group_by_length": False},
    # LoRA on the top blocks only (LoRA(layers=...)): benchmarks/lora_layers.py
    "ours-top-half": {"lora_top": 0.5},
    "ours-top-quarter": {"lora_top": 0.25},
}
BASELINES = {"baseline": "random", "baseline-grouped": "group_by_length"}


def run_ours(model_name: str, budget: dict, seed: int, overrides: dict) -> dict:
    import adapters

    train_rows, test_rows = _data(budget, seed)
    overrides = dict(overrides)
    lora = dict(overrides.pop("lora", {}))
    if "lora_top" in overrides:  # the top fraction of the blocks
        from transformers import AutoConfig

        from adapters.backbone.loading import resolve_source

        blocks = AutoConfig.from_pretrained(resolve_source(model_name)).num_hidden_layers
        keep = max(1, round(blocks * overrides.pop("lora_top")))
        lora["layers"] = list(range(blocks - keep, blocks))
    model = adapters.adapt(
        model_name,
        adapter=adapters.LoRA(r=SETTINGS["r"], alpha=SETTINGS["alpha"], dropout=SETTINGS["dropout"], **lora),
        head=adapters.Classification(labels=["negative", "positive"]),
        quantization="nf4",
        max_length=SETTINGS["max_length"],
        seed=seed,
    )
    started = time.perf_counter()
    metrics = adapters.train(
        model,
        train_rows,
        None,
        adapters.TrainConfig(
            epochs=1,
            lr=SETTINGS["lr"],
            batch_size=SETTINGS["batch_size"],
            warmup_ratio=SETTINGS["warmup_ratio"],
            seed=seed,
            progress=False,
            **overrides,
        ),
    )
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    accuracy = adapters.evaluate(model, test_rows)["eval_accuracy"]
    eval_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model.predict([r["text"] for r in test_rows])
    predict_seconds = time.perf_counter() - started
    return {
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / metrics["steps"],
        "steps": metrics["steps"],
        "eval_seconds": eval_seconds,
        "predict_seconds": predict_seconds,
        "accuracy": accuracy,
        "real_token_fraction": metrics["train_real_token_fraction"],
        "trainable": model.parameter_counts()["trainable"],
        "lora_layers": lora.get("layers"),
    }


def run_baseline(model_name: str, budget: dict, seed: int, sampling: str = "random") -> dict:
    """The hand-written PEFT + Trainer script, as its docs show it (``sampling="group_by_length"``: tuned)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from adapters.backbone.packaged import PACKAGED_MODELS, resolve_packaged

    path = str(resolve_packaged(model_name)) if model_name in PACKAGED_MODELS else model_name
    train_rows, test_rows = _data(budget, seed)
    labels = {"negative": 0, "positive": 1}
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(rows):
        ds = Dataset.from_list([{"text": r["text"], "label": labels[r["label"]]} for r in rows])
        return ds.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=SETTINGS["max_length"]),
            batched=True,
            remove_columns=["text"],
        )

    cuda = torch.cuda.is_available()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        quantization_config=bnb,
        device_map={"": 0 if cuda else "cpu"},
        dtype=torch.bfloat16 if cuda else torch.float32,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=SETTINGS["r"],
            lora_alpha=SETTINGS["alpha"],
            lora_dropout=SETTINGS["dropout"],
            target_modules="all-linear",
            task_type="SEQ_CLS",
        ),
    )
    args = TrainingArguments(
        output_dir="/tmp/vs_peft_trainer",
        per_device_train_batch_size=SETTINGS["batch_size"],
        per_device_eval_batch_size=2 * SETTINGS["batch_size"],
        learning_rate=SETTINGS["lr"],
        num_train_epochs=1,
        lr_scheduler_type="linear",
        # the same whole number of warmup steps as ours: int(ratio x steps)
        warmup_steps=int(SETTINGS["warmup_ratio"] * -(-len(train_rows) // SETTINGS["batch_size"])),
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not cuda,
        disable_tqdm=True,
        train_sampling_strategy=sampling,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=encode(train_rows), data_collator=DataCollatorWithPadding(tokenizer)
    )
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    prediction = trainer.predict(encode(test_rows))
    eval_seconds = time.perf_counter() - started
    accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
    real = processed = 0  # one more pass over the Trainer's own training batches, collation only
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        processed += batch["attention_mask"].numel()
    return {
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / result.global_step,
        "steps": result.global_step,
        "eval_seconds": eval_seconds,
        "predict_seconds": eval_seconds,
        "accuracy": accuracy,
        "real_token_fraction": real / processed,
    }


def run_side(side: str, model_name: str, budget: dict, seed: int) -> dict:
    if side in OURS:
        return run_ours(model_name, budget, seed, OURS[side])
    return run_baseline(model_name, budget, seed, BASELINES[side])


QUANTITIES = [
    ("train_seconds", "training wall time (s)"),
    ("eval_seconds", "evaluation wall time (s)"),
    ("predict_seconds", "predict wall time (s)"),
    ("peak_mb", "peak memory (MB)"),
    ("accuracy", "held-out accuracy"),
    ("real_token_fraction", "real / processed tokens"),
]


def compare(runs: dict, side: str, baseline: str) -> tuple[list[str], dict]:
    """Table rows and numbers for ``side`` against ``baseline``: medians and the median of paired ratios."""
    lines, summary = [], {}
    for key, label in QUANTITIES:
        pairs = [(o[key], b[key]) for o, b in zip(runs[side], runs[baseline], strict=False) if b.get(key) and key in o]
        if not pairs:  # not measured in these runs (runs transcribed from a log lack some quantities)
            continue
        ratios = [o / b for o, b in pairs]
        summary[key] = {
            side: statistics.median(o for o, _ in pairs),
            baseline: statistics.median(b for _, b in pairs),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        s = summary[key]
        lines.append(
            f"| {label} | {s[side]:.4g} | {s[baseline]:.4g} | {s['ratio_median']:.3f} | "
            f"{s['ratio_min']:.3f} - {s['ratio_max']:.3f} |"
        )
    return lines, summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, help="repetitions of the main sides (default: 2 quick, 3 full)")
    p.add_argument("--ablation-repeats", type=int, default=1, help="repetitions of ours with levers off")
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument(
        "--reuse",
        help="a results JSON of this script: its runs are taken in plan order instead of "
        "running them again; only the missing ones run (to finish a stopped run)",
    )
    p.add_argument("--side", choices=[*OURS, *BASELINES], help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--budget", default="full", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        from common import peak_memory_mb

        result = run_side(args.side, args.model, BUDGETS[args.budget], args.seed)
        print(json.dumps({**result, "peak_mb": peak_memory_mb()}))
        return
    from common import EXACT_RSS, RESULTS, machine, run_child, write_results

    budget = "quick" if args.quick else "full"
    repeats = args.repeats or BUDGETS[budget]["repeats"]
    runs = {side: [] for side in [*OURS, *BASELINES]}
    main_sides = ["ours", "baseline", "baseline-grouped"]
    plan = [main_sides if i % 2 == 0 else main_sides[::-1] for i in range(repeats)]  # alternate the order
    plan += [["ours-unfused", "ours-unshared", "ours-grouped", "ours-plain"]] * args.ablation_repeats
    done = json.loads(Path(args.reuse).read_text())["runs"] if args.reuse else {}
    reused = 0
    for i, sides in enumerate(plan):
        for side in sides:
            if done.get(side):
                runs[side].append(done[side].pop(0))
                reused += 1
                continue
            runs[side].append(
                run_child(
                    __file__,
                    ["--side", side, "--budget", budget, "--model", args.model, "--seed", str(args.seed)],
                    env=EXACT_RSS,
                )
            )
            r = runs[side][-1]
            print(
                f"round {i + 1} {side}: train {r['train_seconds']:.0f} s, eval {r['eval_seconds']:.1f} s, "
                f"{r['peak_mb']:.0f} MB, accuracy {r['accuracy']:.3f}, real tokens {r['real_token_fraction']:.2f}",
                flush=True,
            )
    for side, left in done.items():  # reused runs beyond the plan are kept too
        if side in runs:
            runs[side].extend(left)
            reused += len(left)
    header = ["| quantity | {a} (median) | {b} (median) | ratio (median) | ratio range |", "|---|---|---|---|---|"]
    sections, summary = [], {}
    for side, baseline in [("ours", "baseline"), ("ours", "baseline-grouped")]:
        lines, summary[f"{side}/{baseline}"] = compare(runs, side, baseline)
        sections.append(
            f"**{side} vs {baseline}**\n\n" + "\n".join([header[0].format(a=side, b=baseline), header[1], *lines])
        )
    ablation = [
        "| configuration | training wall time (s) | peak memory (MB) | accuracy | real / processed tokens |",
        "|---|---|---|---|---|",
    ]
    for side, label in [
        ("baseline", "PEFT + Trainer, defaults"),
        ("baseline-grouped", "PEFT + Trainer, group_by_length"),
        ("ours-plain", "ours, random batches, per-layer dropout copies (no lever)"),
        ("ours-grouped", "ours, length-grouped batches, per-layer dropout copies"),
        ("ours-unshared", "ours, packed batches, per-layer dropout copies"),
        ("ours-unfused", "ours, packed batches, one dropout copy per input, peft's LoRA forward"),
        ("ours", "ours, defaults (+ fused LoRA forward: stacked A per input group, one addmm)"),
    ]:
        if runs[side]:
            med = {k: statistics.median(r[k] for r in runs[side]) for k, _ in QUANTITIES if k in runs[side][0]}
            ablation.append(
                f"| {label} ({len(runs[side])} run{'s' if len(runs[side]) > 1 else ''}) | "
                f"{med['train_seconds']:.0f} | {med['peak_mb']:.0f} | {med['accuracy']:.3f} | "
                f"{med['real_token_fraction']:.2f} |"
            )
    b = BUDGETS[budget]
    text = (
        "\n\n".join(sections)
        + "\n\n**Ablation** (medians)\n\n"
        + "\n".join(ablation)
        + (
            f"\n\nAll sides: `{args.model}` in NF4 (double quantization, float32 compute on CPU), LoRA "
            f"r={SETTINGS['r']} alpha={SETTINGS['alpha']} dropout={SETTINGS['dropout']} on all linear layers, "
            f"a new 2-label head trained in full, lr {SETTINGS['lr']} for adapter and head, linear schedule with "
            f"{SETTINGS['warmup_ratio']} warmup, batch {SETTINGS['batch_size']}, max length {SETTINGS['max_length']}, "
            f"1 epoch of {b['train']} rows, "
            f"{b['eval']} held-out rows, seed {args.seed}; {repeats} rounds of the three main sides in alternating "
            f"order and {args.ablation_repeats} of the ablation, each run in a fresh process (on CPU with "
            f"MALLOC_MMAP_THRESHOLD_=65536, so peak RSS counts live memory). Each side at its own defaults. Training "
            f"time: the whole `train` call (ours includes tokenizing; the baseline's `trainer.train()` does not); "
            f"evaluation: tokenizing and scoring the held-out rows (ours `adapters.evaluate`, baseline "
            f"`trainer.predict`); predict: ours `model.predict` on the texts (the baseline's is its "
            f"`trainer.predict`). Baseline: AutoModelForSequenceClassification + "
            f"prepare_model_for_kbit_training (no gradient checkpointing) + get_peft_model(task_type=SEQ_CLS) + "
            f"Trainer (eval batch 32); -grouped adds "
            f'`train_sampling_strategy="group_by_length"`.'
        )
    )
    if reused:
        text += (
            f" {reused} of the runs were taken from an earlier results file of this script (`--reuse`), not "
            f"run again in this invocation."
        )
    payload = {
        "machine": machine(),
        "model": args.model,
        "budget": b,
        "settings": SETTINGS,
        "runs": runs,
        "summary": summary,
        "reused_runs": reused,
    }
    write_results(
        "vs_peft_trainer" + ("-quick" if args.quick else ""), payload, text, Path(args.out) if args.out else RESULTS
    )
    print(text)


if __name__ == "__main__":
    main()
