"""Legal assistant recipe: a chat model that says which licence a notice is, its category, and what that
category asks of a user, fine-tuned on ScanCode's licence knowledge base (``licensedcode-data``, offline).

    python recipes/legal_assistant.py                 # SmolLM2-135M-Instruct + LoRA, under 30 minutes on 2 cores
    python recipes/legal_assistant.py --quick --model PATH   # a tiny run (tests)

Each example is a chat: an explicit system message (so the base's chat template adds no default one of
its own), the user's question with a licence notice, and the assistant's answer in one or two sentences:
``"MIT (MIT License). Category: Permissive: you may use, change and share the code, keeping the copyright
notice and licence text."``. Split by licence key as the other legal tasks are: no licence has notices on
both sides, so the held-out licences were never seen in training. Evaluated on the held-out licences with
what a user reads: SPDX-id exact match, category accuracy, token F1 and ROUGE-L of the whole answer,
against the untrained base with the same messages (zero-shot), in one table. Phases: data -> zero-shot ->
adapt -> train -> evaluate -> examples -> save -> reload and answer.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import legal  # noqa: E402

import adapters  # noqa: E402
from adapters.data.sources import group_split, sample  # noqa: E402
from adapters.heads.metrics import generation_metrics  # noqa: E402

SYSTEM = "You identify software licences from their notices and say what they ask of the user, in one or two sentences."
QUESTION = "Which licence is this notice, and what does it ask of me?\n\n{notice}"
# what each category asks of a user, in one sentence (ScanCode's categories)
OBLIGATIONS = {
    "Permissive": "you may use, change and share the code, keeping the copyright notice and licence text",
    "Copyleft": "if you share the code or works based on it, you must share their source under the same licence",
    "Copyleft Limited": (
        "changes to the licensed files must be shared under the same licence; your own code may stay under yours"
    ),
    "Commercial": "you need a paid or negotiated agreement with the owner to use it",
    "Public Domain": "the owner waived their rights: you may use it freely, without conditions",
    "Proprietary Free": "you may use it free of charge under the owner's terms, usually without changing or sharing it",
    "Free Restricted": "you may use it freely only within the restrictions it sets, often no commercial use",
    "Source-available": "you may read and sometimes change the source, but its use is restricted by the owner",
    "Patent License": "it grants rights under the owner's patents, on its conditions",
    "Unstated License": "it names no clear terms: ask the owner before relying on it",
    "CLA": "it governs contributions you make to the project",
}


def read_spdx(root: Path) -> dict[str, str]:
    """Licence key -> its SPDX id (or ScanCode's LicenseRef when SPDX has none)."""
    ids = {}
    for path in sorted((root / "licenses").glob("*.LICENSE")):
        meta, _ = legal._front_matter(path)
        if meta.get("key"):
            ids[meta["key"]] = str(meta.get("spdx_license_key") or f"LicenseRef-scancode-{meta['key']}")
    return ids


def answer_of(spdx: str, name: str, category: str) -> str:
    return f"{spdx} ({name}). Category: {category}: {OBLIGATIONS[category]}."


def chat_rows(seed: int = 0, per_licence: int = 6, max_words: int = 120) -> list[dict]:
    """One chat per notice (8-``max_words`` words, at most ``per_licence`` per licence), grouped by licence."""
    root = legal.data_root()
    licences, spdx = legal.read_licences(root), read_spdx(root)
    notices = legal.cap_per_licence(legal.read_notices(root, licences, 8, max_words), per_licence, seed)
    rows = []
    for n in notices:
        lic = licences[n["key"]]
        if lic["category"] not in OBLIGATIONS:
            continue
        answer = answer_of(spdx[n["key"]], lic["name"], lic["category"])
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTION.format(notice=n["text"])},
            {"role": "assistant", "content": answer},
        ]
        rows.append({"messages": messages, "group": n["key"], "spdx": spdx[n["key"]], "category": lic["category"]})
    return rows


def parse(answer: str) -> tuple[str, str]:
    """The SPDX id (the answer's first word) and the category (after ``Category:``) of an answer."""
    words = answer.strip().split()
    found = re.search(r"Category:\s*([A-Za-z -]+?)\s*[:.]", answer)
    return (words[0] if words else ""), (found.group(1).strip() if found else "")


def scores(generated: list[str], rows: list[dict]) -> dict[str, float]:
    """What a user reads: SPDX-id exact match, category accuracy, and the answer's token F1 / ROUGE-L."""
    parsed = [parse(g) for g in generated]
    n = max(len(rows), 1)
    return {
        "spdx_exact_match": sum(p[0].lower() == r["spdx"].lower() for p, r in zip(parsed, rows, strict=True)) / n,
        "category_accuracy": sum(p[1] == r["category"] for p, r in zip(parsed, rows, strict=True)) / n,
        **generation_metrics(generated, [r["messages"][-1]["content"] for r in rows]),
    }


def answer_all(model, rows: list[dict], batch_size: int) -> list[str]:
    return model.predict([r["messages"][:-1] for r in rows], batch_size=batch_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="smollm2-135m", help="a decoder with a chat template (packaged, folder or hub id)"
    )
    p.add_argument("--quick", action="store_true", help="a few rows and steps (tests)")
    p.add_argument("--train-size", type=int, default=480)
    p.add_argument("--eval-size", type=int, default=120)
    p.add_argument("--per-licence", type=int, default=6, help="notices of one licence at most")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/legal-assistant")
    p.add_argument("--results", help="write the results JSON here too")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    rows = chat_rows(args.seed, args.per_licence)
    train_rows, test_rows = group_split(rows, "group", 0.2, args.seed, stratify="category")
    train_size, eval_size = (24, 6) if args.quick else (args.train_size, args.eval_size)
    max_length = 128 if args.quick else args.max_length
    train_rows, test_rows = sample(train_rows, train_size, args.seed), sample(test_rows, eval_size, args.seed)
    assert not {r["group"] for r in train_rows} & {r["group"] for r in test_rows}, "a licence on both sides"
    print(
        f"{len(train_rows)} training chats of {len({r['group'] for r in train_rows})} licences; "
        f"{len(test_rows)} held-out chats of {len({r['group'] for r in test_rows})} other licences"
    )
    data = [{"messages": r["messages"]} for r in train_rows]
    held_out = [{"messages": r["messages"]} for r in test_rows]

    head = adapters.CausalLM(max_new_tokens=8 if args.quick else args.max_new_tokens)
    base = adapters.adapt(args.model, adapter=None, head=head, quantization=None, max_length=max_length)
    zero_shot_answers = answer_all(base, test_rows, args.batch_size)
    zero_shot = {
        **scores(zero_shot_answers, test_rows),
        **adapters.evaluate(base, held_out, generate=False, metric_key_prefix="", batch_size=args.batch_size),
    }
    del base
    print("zero-shot:", json.dumps(zero_shot))

    model = adapters.adapt(
        args.model,
        adapter=adapters.LoRA(r=args.r, alpha=2 * args.r, dropout=0.05),
        head=head,
        quantization=None,
        max_length=max_length,
        seed=args.seed,
    )
    config = adapters.TrainConfig(
        epochs=1 if args.quick else args.epochs,
        max_steps=3 if args.quick else None,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_ratio=0.05,
        seed=args.seed,
        output_dir=args.output + "-logs",
        overwrite=True,
    )
    train_started = time.time()
    trained = adapters.train(model, data, None, config)
    train_seconds = time.time() - train_started
    answers = answer_all(model, test_rows, args.batch_size)
    tuned = {
        **scores(answers, test_rows),
        **adapters.evaluate(model, held_out, generate=False, metric_key_prefix="", batch_size=args.batch_size),
    }
    print("fine-tuned:", json.dumps(tuned))

    model.save_pretrained(args.output, overwrite=True)
    again = adapters.load(args.output)
    assert again.predict([test_rows[0]["messages"][:-1]]) == answers[:1], "the reloaded model answers otherwise"

    judged = [(scores([a], [r])["token_f1"], r, a) for r, a in zip(test_rows, answers, strict=True)]
    ranked = sorted(judged, key=lambda x: -x[0])
    result = {
        "model": args.model,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "train_licences": len({r["group"] for r in train_rows}),
        "test_licences": len({r["group"] for r in test_rows}),
        "zero_shot": zero_shot,
        "fine_tuned": tuned,
        "train_loss": trained.get("train_loss"),
        "steps": trained.get("steps"),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "options": vars(args),
        "good_examples": [_example(*x) for x in ranked[:5]],
        "bad_examples": [_example(*x) for x in ranked[-5:]],
    }
    text = json.dumps(result, indent=2)
    Path(args.output, "results.json").write_text(text)
    if args.results:
        Path(args.results).write_text(text + "\n")
    print(table(result))
    return result


def _example(f1: float, row: dict, answer: str) -> dict:
    notice = row["messages"][1]["content"].split("\n\n", 1)[1]
    return {
        "licence": row["group"],
        "notice": notice[:300],
        "reference": row["messages"][-1]["content"],
        "answer": answer,
        "token_f1": round(f1, 3),
    }


def table(result: dict) -> str:
    rows = [
        ("SPDX id exact match", "spdx_exact_match"),
        ("category accuracy", "category_accuracy"),
        ("answer token F1", "token_f1"),
        ("answer ROUGE-L", "rougeL"),
        ("exact answer", "exact_match"),
        ("loss on the references", "loss"),
    ]
    lines = ["| metric | zero-shot (base) | fine-tuned |", "|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {result['zero_shot'][key]:.3f} | {result['fine_tuned'][key]:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
