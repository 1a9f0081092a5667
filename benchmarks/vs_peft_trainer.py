"""Are we better than the script a user writes from the PEFT and transformers docs?

    python benchmarks/vs_peft_trainer.py --quick      # 2 rounds, a small budget
    python benchmarks/vs_peft_trainer.py              # 3 rounds, 64 steps each, and the ablation

The baseline: ``BitsAndBytesConfig`` (NF4, double quantization, float32 compute on CPU) +
``AutoModelForSequenceClassification`` + ``prepare_model_for_kbit_training`` (no gradient
checkpointing, as a careful user would choose for a 135M model) + ``get_peft_model`` (LoRA r=8,
alpha 16, dropout 0.05, all linear layers, ``task_type="SEQ_CLS"`` so the head trains) +
``Trainer``, at its defaults, tuned with ``train_sampling_strategy="group_by_length"`` (the flag a
user tries first), and that with ``bf16=True``. Ours: ``adapters.adapt`` + ``adapters.train`` with the same
model, data, LoRA config, batch size, learning rate (one rate for adapter and head on both sides),
schedule, warmup, epoch and seed, each side at its own defaults.

Ours and the tuned script run ``--repeats`` rounds in alternating order, each run in a fresh subprocess,
timed as users run them: the script with glibc's malloc as it comes, ours with its own default (it sets
glibc to keep freed memory on CPU, ``adapters/backbone/allocator.py``; the ablation runs the script with the
same settings from the environment, and ours without them); we report medians and paired ratios of training,
evaluation and predict wall time, peak RSS, held-out accuracy and the share of real (unpadded) tokens
in what the model computed. One more run of each with glibc's mmap threshold at 64 KiB
(``common.EXACT_RSS``) gives the peak *live* memory, not heap holes that depend on the order of batch
shapes (earlier results timed under it too; it made both sides about 1.9x slower on the 2-core Xeon).
The ablation (``--ablation``) runs each named side once: the script at its defaults and with bf16, and
ours with one lever switched off or on (``OURS``). Writes results/vs_peft_trainer[-quick].{json,md}.
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

from adapters.backbone.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402 (after the path)

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
    # the levers of the bf16 / speed issue, each switched off (or on) alone
    "ours-torch-dropout": {"torch_dropout": True},  # torch's per-element Bernoulli masks
    "ours-long-rows": {"long_rows": True},  # packed rows of up to 1,024 tokens, as before
    "ours-bf16": {"bf16": True},  # bf16 compute forced on, whatever this CPU's measured policy says
    "ours-unfused-kernels": {"unfused_kernels": True},  # transformers' own RMSNorm and rotary code
    "ours-system-malloc": {"system_malloc": True},  # glibc's malloc as it comes (freed memory given back)
    "ours-padded-inference": {"padded_inference": True},  # evaluation and predict in padded batches, as before
}
# the script's sampling strategy, and whether it sets TrainingArguments(bf16=True) (CPU autocast)
BASELINES = {
    "baseline": ("random", False),
    "baseline-grouped": ("group_by_length", False),
    "baseline-grouped-bf16": ("group_by_length", True),
    "baseline-grouped-kept-malloc": ("group_by_length", False),  # run with KEPT_MALLOC: what a user could set
}
# glibc's malloc keeping freed memory, set from the environment: the same settings ours makes with mallopt,
# for the script's side to have them too
KEPT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
SIDE_ENV = {"baseline-grouped-kept-malloc": KEPT_MALLOC}
MAIN_SIDES = ["ours", "baseline-grouped"]
ABLATION = [
    "baseline",
    "baseline-grouped-kept-malloc",
    "ours-unfused-kernels",
    "ours-system-malloc",
    "ours-padded-inference",
    "ours-torch-dropout",
    "ours-long-rows",
    "ours-bf16",
    "baseline-grouped-bf16",
]


def _switch_levers(overrides: dict) -> None:
    """The ablation's switches that are not settings: patched in this (fresh) process only."""
    import os

    if overrides.pop("bf16", False):
        os.environ["QADAPTERS_CPU_BF16"] = "1"
    if overrides.pop("torch_dropout", False):
        import torch

        import adapters.methods.lora_fused as fused

        fused.drop_out = lambda x, p: torch.nn.functional.dropout(x, p, True)
    if overrides.pop("unfused_kernels", False):
        import adapters.backbone.kernels as kernels

        kernels.use_fused_kernels = lambda model: []
    if overrides.pop("padded_inference", False):
        import sys

        import adapters.training.loaders as loaders

        sys.modules["adapters.model"].packable = lambda head, decoder: False  # type: ignore[attr-defined]
        packed_loader = loaders.inference_loader

        def padded_loader(model, encoded, rows=None, processes=1):
            loader = packed_loader(model, encoded, rows, processes)
            loader.collate_fn.pack = False
            return loader

        loaders.inference_loader = padded_loader
    if overrides.pop("system_malloc", False):
        os.environ["QADAPTERS_MALLOC"] = "system"
    if overrides.pop("long_rows", False):
        import adapters.data.batching as batching

        batching.LONGEST_PER_ROW = batching.PACKED_ROW_TOKENS


def run_ours(model_name: str, budget: dict, seed: int, overrides: dict) -> dict:
    import adapters

    train_rows, test_rows = _data(budget, seed)
    overrides = dict(overrides)
    _switch_levers(overrides)
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


def run_baseline(model_name: str, budget: dict, seed: int, sampling: str = "random", bf16: bool = False) -> dict:
    """The hand-written PEFT + Trainer script, as its docs show it (``sampling="group_by_length"``: tuned;
    ``bf16``: its ``bf16=True`` flag, which on a CPU trains and predicts under bf16 autocast)."""
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
        bf16=bf16,
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
    return run_baseline(model_name, budget, seed, *BASELINES[side])


QUANTITIES = [
    ("train_seconds", "training wall time (s)"),
    ("eval_seconds", "evaluation wall time (s)"),
    ("predict_seconds", "predict wall time (s)"),
    ("peak_mb", "peak RSS (MB)"),
    ("accuracy", "held-out accuracy"),
    ("real_token_fraction", "real / processed tokens"),
]


def compare(runs: dict, side: str, baseline: str, keys: list | None = None) -> tuple[list[str], dict]:
    """Table rows and numbers for ``side`` against ``baseline``: medians and the median of paired ratios."""
    lines, summary = [], {}
    for key, label in keys or QUANTITIES:
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


ABLATION_LABELS = [
    ("baseline", "PEFT + Trainer, defaults"),
    ("baseline-grouped", "PEFT + Trainer, group_by_length"),
    ("baseline-grouped-bf16", "PEFT + Trainer, group_by_length, bf16=True (CPU autocast)"),
    ("baseline-grouped-kept-malloc", "PEFT + Trainer, group_by_length, malloc keeping freed memory (env)"),
    ("ours-plain", "ours, random batches, per-layer dropout copies (no lever)"),
    ("ours-grouped", "ours, length-grouped batches, per-layer dropout copies"),
    ("ours-unshared", "ours, packed batches, per-layer dropout copies"),
    ("ours-unfused", "ours, packed batches, one dropout copy per input, peft's LoRA forward"),
    ("ours-long-rows", "ours, defaults but packed rows of up to 1,024 tokens"),
    ("ours-torch-dropout", "ours, defaults but torch's dropout masks (one Bernoulli draw per element)"),
    ("ours-bf16", "ours, defaults + bf16 compute (forced on: QADAPTERS_CPU_BF16=1)"),
    ("ours-unfused-kernels", "ours, defaults but transformers' own RMSNorm and rotary code"),
    ("ours-system-malloc", "ours, defaults but glibc's malloc as it comes (QADAPTERS_MALLOC=system)"),
    ("ours-padded-inference", "ours, defaults but evaluation and predict in padded length-sorted batches"),
    (
        "ours",
        "ours, defaults (fused LoRA forward, 4-per-draw dropout masks, rows of 3x the longest text, packed "
        "inference, fused RMSNorm and rotary, malloc keeping freed memory)",
    ),
]


def _run(side: str, budget: str, args, env: dict | None, runs: dict, done: dict, label: str) -> bool:
    """One run of ``side`` (taken from ``done`` when it holds one): appended to ``runs[side]``. True when reused."""
    from common import run_child

    if done.get(side):
        runs[side].append(done[side].pop(0))
        return True
    runs[side].append(
        run_child(
            __file__,
            ["--side", side, "--budget", budget, "--model", args.model, "--seed", str(args.seed)],
            env=env,
            warm=args.warm_start,
        )
    )
    r = runs[side][-1]
    print(
        f"{label} {side}: train {r['train_seconds']:.0f} s, eval {r['eval_seconds']:.1f} s, "
        f"{r['peak_mb']:.0f} MB, accuracy {r['accuracy']:.3f}, real tokens {r['real_token_fraction']:.2f}",
        flush=True,
    )
    return False


def _ablation_table(runs: dict) -> list[str]:
    lines = [
        "| configuration | training wall time (s) | evaluation (s) | peak RSS (MB) | accuracy | real / processed "
        "tokens |",
        "|---|---|---|---|---|---|",
    ]
    for side, label in ABLATION_LABELS:
        if runs.get(side):
            med = {k: statistics.median(r[k] for r in runs[side]) for k, _ in QUANTITIES if k in runs[side][0]}
            lines.append(
                f"| {label} ({len(runs[side])} run{'s' if len(runs[side]) > 1 else ''}) | "
                f"{med['train_seconds']:.0f} | {med['eval_seconds']:.1f} | {med['peak_mb']:.0f} | "
                f"{med['accuracy']:.3f} | {med['real_token_fraction']:.2f} |"
            )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, help="repetitions of the main sides (default: 2 quick, 3 full)")
    p.add_argument("--ablation", nargs="*", default=ABLATION, help="sides run once more each for the ablation")
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
    from common import EXACT_RSS, machine, write_results

    budget = "quick" if args.quick else "full"
    repeats = args.repeats or BUDGETS[budget]["repeats"]
    runs: dict[str, list] = {side: [] for side in [*OURS, *BASELINES]}
    live: dict[str, list] = {side: [] for side in MAIN_SIDES}
    earlier = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    done, done_live = earlier.get("runs", {}), earlier.get("live_memory_runs", {})
    reused = 0
    # timed as users run: glibc's own malloc; the order alternates so that no side always runs first
    for i in range(repeats):
        for side in MAIN_SIDES if i % 2 == 0 else MAIN_SIDES[::-1]:
            reused += _run(side, budget, args, None, runs, done, f"round {i + 1}")
    # live memory: one more run per main side with every large allocation its own mmap (common.EXACT_RSS)
    for side in MAIN_SIDES:
        reused += _run(side, budget, args, EXACT_RSS, live, done_live, "live memory")
    for side in args.ablation:
        reused += _run(side, budget, args, SIDE_ENV.get(side), runs, done, "ablation")
    header = ["| quantity | {a} (median) | {b} (median) | ratio (median) | ratio range |", "|---|---|---|---|---|"]
    sections, summary = [], {}
    for baseline in [b for b in BASELINES if runs[b]]:
        lines, summary[f"ours/{baseline}"] = compare(runs, "ours", baseline)
        if baseline == "baseline-grouped":
            exact, summary["live_memory"] = compare(live, "ours", baseline, keys=[("peak_mb", "peak live memory (MB)")])
            lines += exact
        sections.append(
            f"**ours vs {baseline}**\n\n" + "\n".join([header[0].format(a="ours", b=baseline), header[1], *lines])
        )
    b = BUDGETS[budget]
    text = (
        "\n\n".join(sections)
        + "\n\n**Ablation** (medians; each side's runs in this invocation)\n\n"
        + "\n".join(_ablation_table(runs))
        + (
            f"\n\nAll sides: `{args.model}` in NF4 (double quantization; compute dtype as each side chooses on "
            f"this CPU: fp32 unless a row says bf16), LoRA "
            f"r={SETTINGS['r']} alpha={SETTINGS['alpha']} dropout={SETTINGS['dropout']} on all linear layers, "
            f"a new 2-label head trained in full, lr {SETTINGS['lr']} for adapter and head, linear schedule with "
            f"{SETTINGS['warmup_ratio']} warmup, batch {SETTINGS['batch_size']}, max length {SETTINGS['max_length']}, "
            f"1 epoch of {b['train']} rows, {b['eval']} held-out rows, seed {args.seed}. {repeats} rounds of "
            f"{' and '.join(MAIN_SIDES)} in alternating order, each run in a fresh process as users run it (the "
            f"script with glibc's malloc as it comes, ours with its default of keeping freed memory; peak RSS "
            f"then includes heap holes and kept pages); one more run of each with "
            f"MALLOC_MMAP_THRESHOLD_=65536 for the peak *live* memory (every large tensor its own mmap: the "
            f"memory comparison of earlier results, which also timed under it, at about 1.9x the time on this "
            f"machine for both sides); one run per ablation row. Each side at its own defaults. Training "
            f"time: the whole `train` call (ours includes tokenizing; the baseline's `trainer.train()` does not); "
            f"evaluation: tokenizing and scoring the held-out rows (ours `adapters.evaluate`, baseline "
            f"`trainer.predict`); predict: ours `model.predict` on the texts (the baseline's is its "
            f"`trainer.predict`). Baseline: AutoModelForSequenceClassification + "
            f"prepare_model_for_kbit_training (no gradient checkpointing) + get_peft_model(task_type=SEQ_CLS) + "
            f"Trainer (eval batch 32); -grouped adds "
            f'`train_sampling_strategy="group_by_length"`, -bf16 `bf16=True`, -kept-malloc runs with '
            f"{' '.join(f'{k}={v}' for k, v in KEPT_MALLOC.items())}."
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
        "live_memory_runs": live,
        "summary": summary,
        "reused_runs": reused,
    }
    write_results("vs_peft_trainer" + ("-quick" if args.quick else ""), payload, text, args.out)
    print(text)


if __name__ == "__main__":
    main()
