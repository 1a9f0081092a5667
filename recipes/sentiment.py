"""Sentiment recipe: fresh vs rotten Rotten Tomatoes snippets, on a small LLM with LoRA.

    python recipes/sentiment.py                       # the default job (`make run`)
    python recipes/sentiment.py --budget full         # 8,000 training rows (29 min on 2 CPU cores)
    python recipes/sentiment.py --quantization nf4    # QLoRA: the base in 4 bits
    python recipes/sentiment.py --model minilm-l6 --quantization int8
    python recipes/sentiment.py --data reviews.csv --text-column review --label-column stars

Phases: data (packaged snippets, split by movie so no movie is on both sides) -> adapt (for a
decoder: each snippet inside a task prompt, the head started from the LM's scores of " negative" and
" positive") -> train -> evaluate against the majority baseline -> save -> reload and predict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import balance, decoder_and_tied, majority_accuracy, typed_text  # noqa: E402

import adapters  # noqa: E402
from adapters.data.sources import group_split, load_rows, rotten_tomatoes, sample  # noqa: E402
from adapters.methods.lora_init import PEFT_INIT  # noqa: E402

# The task prompt and label words of the packaged task (measured in recipes/results/levers.md):
# the last token of "...\nSentiment:" is where a decoder predicts " positive" / " negative"
REVIEW_PROMPT = "Review: {text}\nSentiment:"
# rows of the packaged data per budget: the default job (`make run`, about 10 minutes on 2 CPU
# cores) and the full one (29 minutes); --train-size overrides
BUDGETS = {"default": 2000, "full": 8000}
EXAMPLES = [
    "a moving, funny film",
    "a tedious mess that never finds its footing",
    "the performances are wonderful",
    "I walked out halfway through",
]


def user_rows(args) -> tuple[list[dict], list[dict] | None]:
    """The user's file or hub dataset, mapped onto text/label/group; a hub test split if it has one."""
    train = load_rows(args.data)
    test = None
    if not Path(args.data).exists():
        for split in ("test", "validation"):
            try:
                test = load_rows(args.data, split=split)
                break
            except adapters.DataError:
                continue

    def norm(rows):
        missing = [c for c in (args.text_column, args.label_column, args.group_column) if c and c not in rows[0]]
        if missing:
            raise SystemExit(f"--data {args.data}: no column {missing[0]!r}; columns are {sorted(rows[0])}")
        return [
            {
                "text": r[args.text_column],
                "label": str(r[args.label_column]),
                "group": r[args.group_column] if args.group_column else i,
            }
            for i, r in enumerate(rows)
        ]

    return norm(train), norm(test) if test else None


def task_prompt(args, labels: list[str]) -> tuple[str | None, list[str] | None]:
    """The prompt and label words asked for; by default, for a decoder on the packaged data, the
    review prompt and (when its output embeddings are its input embeddings, as label words need)
    the labels' own words (" negative", " positive")."""
    decoder = tied = False
    if not args.data and (args.prompt is None or args.label_words is None):
        decoder, tied = decoder_and_tied(args.model)
    prompt = args.prompt if args.prompt is not None else (REVIEW_PROMPT if decoder else None)
    prompt = typed_text(prompt)  # '\n' typed on a command line
    use_words = args.label_words if args.label_words is not None else decoder and tied
    return prompt, [f" {label}" for label in labels] if use_words else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="packaged name, local folder or hub id")
    p.add_argument(
        "--adapter",
        default="lora",
        choices=["lora", "bottleneck", "none"],
        help="'lora', 'bottleneck' (see --placement) or 'none' (head only)",
    )
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default="all-linear", help="LoRA: 'all-linear' or comma-separated module names")
    p.add_argument(
        "--top-layers",
        type=int,
        help="LoRA only on the top N blocks: backward stops below them (LoRA(layers=list(range(-N, 0))))",
    )
    p.add_argument(
        "--lora-init",
        default="default",
        choices=list(PEFT_INIT),  # the starts LoRA(init=...) takes
        help="where LoRA starts (LoRA(init=...)); loftq: corrects the 4-bit error of an nf4/fp4 base; pissa, "
        "olora: the weights' principal part, on an unquantized base; eva: from "
        "the first training rows",
    )
    p.add_argument("--placement", default="pfeiffer", choices=["pfeiffer", "houlsby"], help="bottleneck placement")
    p.add_argument("--reduction", type=int, default=16, help="bottleneck width = hidden / reduction")
    p.add_argument(
        "--quantization",
        default="none",
        choices=["nf4", "fp4", "int8", "none"],
        help="the frozen base's weights (default: unquantized, fp32 on CPU; nf4 for QLoRA): for a "
        "135M model on a CPU 4-bit saves no time and costs accuracy (levers.md)",
    )
    p.add_argument(
        "--budget", default="default", choices=sorted(BUDGETS), help=f"training rows of the packaged data: {BUDGETS}"
    )
    p.add_argument("--train-size", type=int, help="training rows (default: from --budget)")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--layer-lr-decay", type=float, help="layer-wise learning-rate decay, e.g. 0.9 (TrainConfig)")
    p.add_argument(
        "--linear-probe",
        action="store_true",
        help="LP-FT: fit the head on the frozen model's features before training (TrainConfig.linear_probe)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-seed",
        type=int,
        help="seed of training alone (batch order, dropout masks), the split kept: run-to-run spread (default: --seed)",
    )
    p.add_argument("--output", default="runs/sentiment")
    p.add_argument("--data", help="your own CSV/JSONL/Parquet file or a hub dataset name instead of the packaged data")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--group-column", help="column whose values must not straddle the train/test split")
    p.add_argument(
        "--prompt",
        help="a template around each text, with {text} where it goes (decoders; default "
        f"on the packaged data: {REVIEW_PROMPT!r}; '' for none)",
    )
    p.add_argument(
        "--label-words",
        action=argparse.BooleanOptionalAction,
        help="start the head as the base's next-token scores of ' <label>' for each label "
        "(Classification(label_words=...); default: on for a decoder on the packaged data)",
    )
    p.add_argument(
        "--zero-shot",
        action="store_true",
        help="with label words: evaluate the untrained model first (the zero-shot accuracy)",
    )
    args = p.parse_args(argv)
    if args.top_layers is not None and (args.adapter != "lora" or args.top_layers < 1):
        p.error("--top-layers N takes N >= 1 and applies to --adapter lora")
    if args.zero_shot and args.label_words is False:
        p.error("--zero-shot scores the label-word head before training; it cannot go with --no-label-words")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.data:
        rows, test_rows = user_rows(args)
    else:
        rows, test_rows = rotten_tomatoes(), None
    if test_rows is None:
        rows, test_rows = group_split(rows, "group", 0.2, args.seed)
    train_size = args.train_size or BUDGETS[args.budget]
    train_rows, test_rows = sample(rows, train_size, args.seed), sample(test_rows, args.eval_size, args.seed)
    labels = sorted({r["label"] for r in train_rows})
    print(
        f"data: {len(train_rows)} train / {len(test_rows)} test rows "
        f"({len({r['group'] for r in train_rows})} / {len({r['group'] for r in test_rows})} groups, none shared)"
    )
    print(f"train balance: {balance(train_rows)}")
    majority = majority_accuracy(train_rows, test_rows)
    print(f"majority-class baseline on test: {majority:.4f}")

    adapter = None
    if args.adapter == "lora":
        targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
        layers = list(range(-args.top_layers, 0)) if args.top_layers else None
        adapter = adapters.LoRA(
            r=args.r, alpha=args.alpha, dropout=0.05, targets=targets, layers=layers, init=args.lora_init
        )
    elif args.adapter == "bottleneck":
        adapter = adapters.Bottleneck(placement=args.placement, reduction=args.reduction)
    prompt, words = task_prompt(args, labels)
    if args.zero_shot and not words:
        raise SystemExit("--zero-shot needs label words (--label-words): without them the head is random")
    # with the task prompt (a decoder) no bias: a decoder's AutoModelForSequenceClassification has none, so the
    # artifact exports for transformers.pipeline (qadapters export); measured: no accuracy lost (README)
    head = adapters.Classification(labels=labels, prompt=prompt, label_words=words, bias=prompt is None)
    model = adapters.adapt(
        args.model,
        adapter=adapter,
        head=head,
        quantization=None if args.quantization == "none" else args.quantization,
        max_length=args.max_length,
        seed=args.seed,
    )
    print(model.summary())
    zero_shot = None
    if words and args.zero_shot:  # the head is the base's own classifier: how good before any training?
        zero_shot = adapters.evaluate(model, test_rows)["eval_accuracy"]
        print(f"zero-shot accuracy (label words, before training): {zero_shot:.4f}")
    config = adapters.TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        layer_lr_decay=args.layer_lr_decay,
        linear_probe=args.linear_probe,
        batch_size=args.batch_size,
        seed=args.seed if args.train_seed is None else args.train_seed,
        output_dir=args.output + "-logs",
        overwrite=True,
    )  # a re-run of the recipe starts its logs afresh
    metrics = adapters.train(model, train_rows, test_rows, config)
    model.save_pretrained(args.output, overwrite=True)  # a rerun replaces its own artifact (only its files)

    again = adapters.load(args.output)
    print(f"\nsaved to {args.output}; reloaded predictions:")
    for text, (label, probs) in zip(EXAMPLES, again.predict(EXAMPLES, probabilities=True), strict=False):
        print(f"  {label:>8} ({probs[label]:.2f})  {text}")
    result = {
        "accuracy": metrics["eval_accuracy"],
        "macro_f1": metrics["eval_macro_f1"],
        "majority_baseline": majority,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "train_seconds": metrics["train_seconds"],
        "total_seconds": time.perf_counter() - started,
        "model": args.model,
        "quantization": args.quantization,
        "adapter": args.adapter,
        "prompt": prompt,
        "label_words": words,
        "zero_shot_accuracy": zero_shot,
        "top_layers": args.top_layers,
        **{k: v for k, v in metrics.items() if k.startswith("probe_")},
        "options": vars(args),
    }  # the run's every option: what produced these numbers
    Path(args.output, "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"\naccuracy {result['accuracy']:.4f} | macro-F1 {result['macro_f1']:.4f} | majority baseline "
        f"{majority:.4f} | train {result['train_seconds']:.0f} s | total {result['total_seconds']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
