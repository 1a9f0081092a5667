"""Legal recipe: licence notices and licence texts from ScanCode's licence knowledge base.

    python recipes/legal.py --task category          # notice (8-200 words) -> licence category
    python recipes/legal.py --task category-full     # a full licence text -> its category (first 256 tokens)
    python recipes/legal.py --task identify          # notice -> which of 4 licence names it is (multiple choice)
    python recipes/legal.py --data ledgar.csv --text-column text --label-column label   # your own data
    python recipes/legal.py --task category --export data/legal_category.jsonl         # rows for the YAML configs

The data ship in ``licensedcode-data`` (CC-BY-4.0): 2,310 licence texts and 34,859 rules, labelled
by ScanCode's curators. Every task is split by licence key, so no licence has text on both sides
(the notices of one licence are near-duplicates). Phases: data -> adapt -> train -> evaluate
against the majority baseline -> confusion matrix -> save -> reload and predict.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import balance, decoder_and_tied, majority_accuracy, typed_text  # noqa: E402

import adapters  # noqa: E402
from adapters.data.sources import group_split, load_rows, sample  # noqa: E402
from adapters.methods.lora_init import PEFT_INIT  # noqa: E402

NOTICE_CATEGORIES = ["Commercial", "Copyleft", "Copyleft Limited", "Permissive"]
# identify: the notice, then a cue the licence's name completes; each candidate name is scored by the base's
# own likelihood after it (MultipleChoice(scoring="likelihood"))
IDENTIFY_PROMPT = "{text}\nLicense:"
# LexGLUE-shaped datasets (hub or local files of the same shape): their column mapping
KNOWN_DATASETS = {
    "ledgar": {"text": "text", "label": "label"},  # one label per contract provision
    "unfair_tos": {"text": "text", "label": "labels"},  # a list of unfair-term types (multi-label)
}


# libyaml's safe loader where PyYAML was built with it: the same values (every licence and notice compared) in
# a quarter of the time, and reading the ~39,000 rule files is most of a recipe's data step
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _front_matter(path: Path) -> tuple[dict, str]:
    """ScanCode files: YAML between two '---' lines, then the text."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n?(.*)$", raw, flags=re.S)
    if not match:
        return {}, raw
    return yaml.load(match.group(1), Loader=SAFE_LOADER) or {}, match.group(2).strip()


def data_root() -> Path:
    return Path(importlib.metadata.distribution("licensedcode-data").locate_file("licensedcode/data"))


def read_licences(root: Path) -> dict[str, dict]:
    """key -> {name, category, text} for every licence text."""
    licences = {}
    for path in sorted((root / "licenses").glob("*.LICENSE")):
        meta, text = _front_matter(path)
        if meta.get("key") and meta.get("category"):
            licences[meta["key"]] = {
                "name": meta.get("short_name") or meta.get("name") or meta["key"],
                "category": meta["category"],
                "text": text,
                "names": _names(meta),
                "urls": _urls(meta),
            }
    return licences


def _names(meta: dict) -> list[str]:
    """Every name a notice may call the licence by: its name, short name, key and SPDX ids."""
    found = [meta.get("name"), meta.get("short_name"), meta["key"], meta.get("spdx_license_key")]
    return sorted({str(n) for n in found + list(meta.get("other_spdx_license_keys") or []) if n})


def _urls(meta: dict) -> list[str]:
    """The licence's own web addresses (its text, home page, OSI and FAQ pages)."""
    urls = [meta.get(f) for f in ("homepage_url", "osi_url", "faq_url")]
    urls += list(meta.get("text_urls") or []) + list(meta.get("other_urls") or [])
    return sorted({str(u) for u in urls if u})


def read_notices(root: Path, licences: dict, min_words: int = 8, max_words: int = 200) -> list[dict]:
    """Licence notices naming exactly one known licence: text, licence key, category."""
    rows = []
    for path in sorted((root / "rules").glob("*.RULE")):
        meta, text = _front_matter(path)
        key = str(meta.get("license_expression", ""))
        if not meta.get("is_license_notice") or " " in key or key not in licences:
            continue  # expressions such as "mit OR apache-2.0" name several licences
        if min_words <= len(text.split()) <= max_words:
            rows.append({"text": text, "key": key, "label": licences[key]["category"]})
    return rows


def cap_per_licence(notices: list[dict], cap: int | None, seed: int = 0) -> list[dict]:
    """At most ``cap`` notices of each licence key (drawn at random, order kept). A few licences
    have hundreds of near-duplicate notices (gpl-2.0 911, gpl-2.0-plus 871, proprietary-license 451): uncapped
    they dominate whichever side of the split they land on, and the held-out score measures them."""
    if cap is None:
        return notices
    by_key: dict[str, list[int]] = {}
    for i, r in enumerate(notices):
        by_key.setdefault(r["key"], []).append(i)
    rng = random.Random(seed)
    keep = {
        i for key in sorted(by_key) for i in (rng.sample(by_key[key], cap) if len(by_key[key]) > cap else by_key[key])
    }
    return [r for i, r in enumerate(notices) if i in keep]


def inverse_frequency_weights(rows: list[dict], labels: list[str]) -> list[float]:
    """Class weights that make the rare categories (Commercial) count as much as the frequent ones."""
    counts = Counter(r["label"] for r in rows)
    return [len(rows) / (len(labels) * max(counts[label], 1)) for label in labels]


def category_task(licences: dict, notices: list[dict]) -> list[dict]:
    return [dict(r, group=r["key"]) for r in notices if r["label"] in NOTICE_CATEGORIES]


def category_full_task(licences: dict, min_examples: int = 50) -> list[dict]:
    """Full licence texts -> category, over the categories with at least ``min_examples`` texts."""
    counts = Counter(v["category"] for v in licences.values())
    keep = {c for c, n in counts.items() if n >= min_examples}
    return [
        {"text": v["text"], "label": v["category"], "group": k}
        for k, v in licences.items()
        if v["category"] in keep and v["text"]
    ]


def identify_task(licences: dict, notices: list[dict], choices: int = 4, seed: int = 0) -> list[dict]:
    """Notice -> the name of its licence among ``choices`` names; the wrong ones come from licences
    of the same category, so the category alone does not give the answer."""
    rng = random.Random(seed)
    by_category: dict[str, list[str]] = {}
    for key, v in licences.items():
        by_category.setdefault(v["category"], []).append(key)
    rows = []
    for r in notices:
        pool = [
            k
            for k in by_category[licences[r["key"]]["category"]]
            if k != r["key"] and licences[k]["name"] != licences[r["key"]]["name"]
        ]
        if len(pool) < choices - 1:
            continue
        keys = rng.sample(pool, choices - 1)
        answer = rng.randrange(choices)
        keys.insert(answer, r["key"])
        rows.append(
            {
                "text": r["text"],
                "choices": [licences[k]["name"] for k in keys],
                "label": answer,
                "group": r["key"],
                "choice_keys": keys,
            }
        )
    return rows


def user_rows(args) -> list[dict]:
    mapping = KNOWN_DATASETS.get(Path(args.data).stem.split("-")[0], {})
    text_col, label_col = (
        args.text_column or mapping.get("text", "text"),
        args.label_column or mapping.get("label", "label"),
    )
    rows = load_rows(args.data)
    if text_col not in rows[0] or label_col not in rows[0]:
        raise SystemExit(f"--data {args.data}: needs columns {text_col!r} and {label_col!r}; it has {sorted(rows[0])}")
    return [
        {
            "text": r[text_col],
            "label": [str(x) for x in r[label_col]] if isinstance(r[label_col], list) else str(r[label_col]),
            "group": r.get(args.group_column, i) if args.group_column else i,
        }
        for i, r in enumerate(rows)
    ]


def confusion_png(cm, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="category", choices=["category", "category-full", "identify"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default="lora", choices=["lora", "bottleneck", "none"])
    p.add_argument("--r", type=int, default=8)
    p.add_argument(
        "--lora-init",
        choices=list(PEFT_INIT),  # the starts LoRA(init=...) takes
        help="where LoRA starts (LoRA(init=...); default: eva for a category task on an nf4/fp4 base, else peft's: "
        "category in NF4 reached 80.9%% from EVA's start, 75.5%% from the default, over 3 seeds; unquantized 79.8%%); "
        "loftq: corrects the 4-bit error of an nf4/fp4 base; pissa, "
        "olora: the weights' principal part, on an unquantized base; eva: from the first training rows",
    )
    p.add_argument(
        "--quantization",
        default="none",
        choices=["nf4", "fp4", "int8", "none"],
        help="the base's weights: unquantized by default (on a CPU a 135M model gains no time from 4 bits: "
        "category 2,004 s vs 2,305 s in NF4 at the same accuracy); nf4 for QLoRA",
    )
    p.add_argument("--train-size", type=int, help="default: 2000 (category-full: 1000)")
    p.add_argument("--eval-size", type=int, help="default: 600 (category-full: 300)")
    p.add_argument("--epochs", type=float, help="default: 2 for --task category, else 1")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (see --grad-accum)")
    p.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step")
    p.add_argument(
        "--auto-batch-size",
        action="store_true",
        help="largest per-step batch that fits in memory; --grad-accum keeps batch-size x grad-accum",
    )
    p.add_argument("--max-length", type=int, help="default: 128 (category-full: 256)")
    p.add_argument(
        "--per-licence",
        type=int,
        default=60,
        help="at most this many notices of one licence (category, identify); 0 keeps all",
    )
    p.add_argument(
        "--long-text",
        default="truncate",
        choices=["windows", "truncate"],
        help="category-full: the first max-length tokens of a text (truncate), or all of it as windows",
    )
    p.add_argument(
        "--window-pooling",
        default="mean",
        choices=["mean", "max"],
        help="category-full: how the windows' logits of one licence are pooled",
    )
    p.add_argument(
        "--prompt",
        help="a template around each text with {text}, e.g. 'Licence text: {text}\nLicence "
        "category:' (category tasks: none by default; identify with likelihood scoring: "
        "IDENTIFY_PROMPT by default, '' for none)",
    )
    p.add_argument(
        "--label-words",
        help="category tasks: one word per category in the labels' sorted order, comma-"
        "separated, e.g. 'proprietary,copyleft,lesser,permissive': the head starts "
        "as the base's next-token scores of these words (Classification(label_words=); "
        "distinct first tokens, a base with tied embeddings)",
    )
    p.add_argument(
        "--scoring",
        choices=["head", "likelihood"],
        help="identify: score each licence name with a new linear head, or with the base's own likelihood "
        "of the name after the notice (default for a decoder whose output embeddings are its input "
        "embeddings, as SmolLM2's)",
    )
    p.add_argument(
        "--zero-shot",
        action="store_true",
        help="identify with likelihood scoring, or --label-words: evaluate the untrained model first (the "
        "base's zero-shot accuracy)",
    )
    p.add_argument("--layer-lr-decay", type=float, help="layer-wise learning-rate decay, e.g. 0.9 (TrainConfig)")
    p.add_argument(
        "--linear-probe",
        action=argparse.BooleanOptionalAction,
        help="LP-FT: fit the head on the frozen model's features before training (TrainConfig.linear_probe; "
        "default: on for the category tasks)",
    )
    p.add_argument(
        "--pooling",
        choices=["auto", "last", "first", "mean"],
        help="how a text's token states become one vector (auto: the last token for a decoder; default: "
        "mean for the category tasks, auto elsewhere)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-seed",
        type=int,
        help="seed of training alone (batch order, dropout masks), the split kept: run-to-run spread (default: --seed)",
    )
    p.add_argument("--output", help="artifact folder (default runs/legal-TASK)")
    p.add_argument("--data", help="your own CSV/JSONL/Parquet file or a hub dataset (e.g. LexGLUE's ledgar)")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--group-column")
    p.add_argument(
        "--export",
        help="write the task's rows (text, label, group[, choices]) to this JSONL file and stop: "
        "the input of recipes/configs/legal_*.yaml",
    )
    args = p.parse_args(argv)
    scored_names = args.task == "identify" and not args.data and args.scoring != "head"
    if args.zero_shot and not (scored_names or args.label_words):
        p.error(
            "--zero-shot evaluates the untrained model, which is a classifier only where the base itself scores: "
            "--task identify with likelihood scoring, or a category task with --label-words"
        )
    if args.label_words and args.task == "identify":
        p.error("--label-words is for the category tasks (a classification head); identify scores licence names")
    if args.pooling and args.task == "identify" and not args.data:
        p.error("--pooling is for the category tasks; identify scores each (notice, name) pair")
    if args.linear_probe and scored_names:
        p.error("--linear-probe fits a linear head; identify's likelihood scoring has none (add --scoring head)")
    if args.lora_init not in (None, "default") and args.adapter != "lora":
        p.error(f"--lora-init {args.lora_init} says where LoRA starts; --adapter {args.adapter} has no LoRA")
    if args.lora_init is None:  # benchmarks/results/lora-init-legal.md
        four_bit_lora = args.adapter == "lora" and args.quantization in ("nf4", "fp4")
        # EVA reads one token sequence a row: not identify's (notice, name) pairs, nor a text's windows
        one_sequence = args.task != "identify" and args.long_text == "truncate"
        args.lora_init = "eva" if four_bit_lora and one_sequence else "default"
    if args.scoring and (args.task != "identify" or args.data):
        p.error("--scoring is for --task identify (its licence names); the category tasks have a classification head")
    return task_defaults(args)


# Each packaged task's budget, as measured (recipes/results/levers.md); explicit flags win.
# category: 2,000 notices, mean-pooled, the head fitted first, 2 epochs: 84.0% / macro-F1 0.808 (Commercial F1 0.680)
# in 37 minutes on 2 CPU cores (last-token pooling and a random head: 81.8% / 0.753 / 0.475).
# category-full: the first 256 tokens of 1,000 licences, the same pooling and probe: 66.7% / macro-F1 0.517 in 45
# minutes (last-token pooling: 42.0% / 0.279).
DEFAULTS = {
    "train_size": 2000,
    "eval_size": 600,
    "max_length": 128,
    "pooling": "auto",
    "linear_probe": False,
    "epochs": 1,
}
TASK_DEFAULTS = {
    "category": {**DEFAULTS, "pooling": "mean", "linear_probe": True, "epochs": 2},
    "category-full": {
        **DEFAULTS,
        "train_size": 1000,
        "eval_size": 300,
        "max_length": 256,
        "pooling": "mean",
        "linear_probe": True,
    },
}


def task_defaults(args):
    """Fill in what the command line left unset: the packaged task's measured budget, else the shared defaults
    (a user's own data, ``identify``)."""
    defaults = DEFAULTS if args.data else TASK_DEFAULTS.get(args.task, DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict:
    """Rows -> split -> adapted model -> training -> report: the phases below, in order."""
    args = parse_args(argv)
    started = time.perf_counter()
    output = Path(args.output or f"runs/legal-{args.task}")
    rows = task_rows(args)
    if args.export:
        return export_rows(rows, args)
    train_rows, test_rows, majority = split_rows(rows, args)
    model, head = build_model(args, train_rows, test_rows)
    zero_shot = zero_shot_accuracy(model, head, test_rows) if args.zero_shot else None
    config = adapters.TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        layer_lr_decay=args.layer_lr_decay,
        linear_probe=args.linear_probe,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        auto_batch_size=args.auto_batch_size,
        seed=args.seed if args.train_seed is None else args.train_seed,
        output_dir=str(output) + "-logs",
        overwrite=True,
    )
    confusion = ConfusionRecorder(head.labels) if isinstance(head, adapters.Classification) else None
    metrics = adapters.train(model, train_rows, test_rows, config, compute_metrics=confusion)
    model.save_pretrained(output, overwrite=True)  # a rerun replaces its own artifact (only its files)
    result = {
        "task": args.task,
        "accuracy": metrics.get("eval_accuracy", metrics.get("eval_exact_match")),
        "majority_baseline": majority,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "train_seconds": metrics["train_seconds"],
    }
    if zero_shot is not None:
        result["zero_shot_accuracy"] = zero_shot
    result.update({k: v for k, v in metrics.items() if k.startswith("probe_")})
    result.update(report(model, head, metrics, confusion, test_rows, output))
    result["total_seconds"] = time.perf_counter() - started
    result["options"] = vars(args)  # the run's every option, defaults filled in: what produced these numbers
    (output / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"\naccuracy {result['accuracy']:.4f}"
        + (f" | macro-F1 {result['macro_f1']:.4f}" if "macro_f1" in result else "")
        + f" | majority baseline {majority:.4f} | train {result['train_seconds']:.0f} s"
        + f" | total {result['total_seconds']:.0f} s"
    )
    return result


def task_rows(args) -> list[dict]:
    """The rows of the task: the user's file, or built from the packaged licence data."""
    if args.data:
        return user_rows(args)
    licences = read_licences(data_root())
    notices = cap_per_licence(read_notices(data_root(), licences), args.per_licence or None, args.seed)
    return {
        "category": lambda: category_task(licences, notices),
        "category-full": lambda: category_full_task(licences),
        "identify": lambda: identify_task(licences, notices, seed=args.seed),
    }[args.task]()


def export_rows(rows: list[dict], args) -> dict:
    Path(args.export).parent.mkdir(parents=True, exist_ok=True)
    with open(args.export, "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "choice_keys"}) + "\n")
    print(f"wrote {len(rows)} rows of task {args.task} to {args.export}")
    return {"exported": len(rows)}


def split_rows(rows: list[dict], args) -> tuple[list[dict], list[dict], float]:
    """Train and test rows with no licence on both sides, and the majority-class accuracy on test."""
    # split within each category: a few large licences must not leave a category out of one side
    stratify = "label" if not args.data and args.task != "identify" else None
    train_rows, test_rows = group_split(rows, "group", 0.2, args.seed, stratify=stratify)
    train_rows, test_rows = sample(train_rows, args.train_size, args.seed), sample(test_rows, args.eval_size, args.seed)
    shared = {r["group"] for r in train_rows} & {r["group"] for r in test_rows}
    assert not shared, f"licences on both sides of the split: {sorted(shared)[:5]}"
    print(
        f"task {args.task}: {len(rows)} rows; {len(train_rows)} train / {len(test_rows)} test "
        f"({len({r['group'] for r in train_rows})} / {len({r['group'] for r in test_rows})} licences, none shared)"
    )
    multi = isinstance(train_rows[0]["label"], list)
    if not multi:
        print(f"train balance: {balance(train_rows)}")
    majority = 0.0 if multi else majority_accuracy(train_rows, test_rows)
    print(f"majority-class baseline on test: {majority:.4f}")
    return train_rows, test_rows, majority


def identify_head(args) -> adapters.MultipleChoice:
    """Four licence names per notice, scored by the base's likelihood where it can (a decoder with tied
    embeddings) unless ``--scoring`` says otherwise; the prompt goes with likelihood scoring by default."""
    scoring = args.scoring
    if scoring is None:
        decoder, tied = decoder_and_tied(args.model)
        scoring = "likelihood" if decoder and tied else "head"
    prompt = args.prompt if args.prompt is not None else (IDENTIFY_PROMPT if scoring == "likelihood" else None)
    return adapters.MultipleChoice(num_choices=4, scoring=scoring, prompt=typed_text(prompt))


def label_words(args, labels: list[str]) -> list[str] | None:
    """``--label-words`` as the head takes them: one per label, each with the space a word has before it."""
    if not args.label_words:
        return None
    words = [w.strip() for w in args.label_words.split(",")]
    if len(words) != len(labels) or not all(words):
        raise SystemExit(
            f"--label-words needs {len(labels)} comma-separated words, one per category in this order: "
            f"{labels}; got {args.label_words!r}"
        )
    return [" " + w for w in words]


def zero_shot_accuracy(model, head, test_rows: list[dict]) -> float:
    """The untrained model's accuracy: how well the base picks on its own, through the likelihood of each
    licence name or the next-token scores of the label words."""
    if getattr(head, "scoring", None) != "likelihood" and getattr(head, "label_words", None) is None:
        raise SystemExit(
            "--zero-shot needs a head the base scores itself (likelihood scoring or label words); this "
            "base gets a random head, which has no zero-shot accuracy to report"
        )
    accuracy = adapters.evaluate(model, test_rows)["eval_accuracy"]
    print(f"zero-shot accuracy (the base's own scores, before training): {accuracy:.4f}")
    return accuracy


def build_model(args, train_rows: list[dict], test_rows: list[dict]):
    """The head the rows call for (choices, several labels, or one), on the chosen base and adapter."""
    if args.task == "identify" and not args.data:
        head = identify_head(args)
    elif isinstance(train_rows[0]["label"], list):  # e.g. unfair_tos: several labels per text
        head = adapters.MultiLabel(labels=sorted({x for r in train_rows + test_rows for x in r["label"]}))
    else:
        labels = sorted({r["label"] for r in train_rows} | {r["label"] for r in test_rows})
        full = args.task == "category-full"
        head = adapters.Classification(
            labels=labels,
            class_weights=inverse_frequency_weights(train_rows, labels),
            long_text=args.long_text if full else "truncate",
            window_pooling=args.window_pooling,
            pooling=args.pooling,
            prompt=typed_text(args.prompt),
            label_words=label_words(args, labels),
        )
    lora = adapters.LoRA(r=args.r, init=args.lora_init) if args.adapter == "lora" else None
    adapter = {"lora": lora, "bottleneck": adapters.Bottleneck(), "none": None}[args.adapter]
    model = adapters.adapt(
        args.model,
        adapter=adapter,
        head=head,
        max_length=args.max_length,
        seed=args.seed,
        quantization=None if args.quantization == "none" else args.quantization,
    )
    print(model.summary())
    return model, head


class ConfusionRecorder:
    """``compute_metrics`` for ``adapters.train``: each evaluation's confusion matrix, kept for the report,
    so that the held-out rows are not predicted a second time after training's final evaluation."""

    def __init__(self, labels: list[str]):
        self.labels, self.matrix = labels, None

    def __call__(self, prediction) -> dict[str, float]:
        from adapters.heads.metrics import confusion_matrix

        self.matrix = confusion_matrix(prediction.predictions.argmax(-1), prediction.label_ids, len(self.labels))
        return {}


def report(
    model, head, metrics: dict, confusion: ConfusionRecorder | None, test_rows: list[dict], output: Path
) -> dict:
    """Per-class F1 and a confusion matrix (classification), F1s (multi-label), and a few examples."""
    if isinstance(head, adapters.Classification):
        from adapters.heads.metrics import per_class_f1

        cm = confusion.matrix
        f1 = per_class_f1(cm)
        per_class = dict(zip(head.labels, f1.round(4).tolist(), strict=True))
        result = {"macro_f1": metrics["eval_macro_f1"], "per_class_f1": per_class}
        confusion_png(cm, head.labels, output / "confusion_matrix.png")
        print("per-class F1: " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_class_f1"].items()))
        print(f"confusion matrix saved to {output / 'confusion_matrix.png'}")
        examples = test_rows[:3]
        for r, p in zip(examples, model.predict([r["text"] for r in examples]), strict=False):
            print(f"  predicted {p!r:<20} true {r['label']!r:<20} {r['text'][:70]!r}")
        return result
    if isinstance(head, adapters.MultiLabel):
        return {"micro_f1": metrics["eval_micro_f1"], "macro_f1": metrics["eval_macro_f1"]}
    for r in test_rows[:3]:
        pick = model.predict({"context": r["text"], "choices": r["choices"]})
        print(f"  picked {r['choices'][pick]!r}, right {r['choices'][r['label']]!r}: {r['text'][:60]!r}")
    return {}


if __name__ == "__main__":
    main()
