"""Legal assistant recipe: a chat model that says which licence a notice is, its category and what that asks
of a user, then answers the client's follow-up questions, fine-tuned on ScanCode's licence knowledge base
(``licensedcode-data``, offline).

    python recipes/legal_assistant.py                 # SmolLM2-135M-Instruct + LoRA, about 48 minutes on 2 cores
    python recipes/legal_assistant.py --quick --model PATH   # a tiny run (tests)

Each example is a conversation:

* a system message: the task, and the ``--retrieval`` licences of the knowledge base nearest to the notice
  (``legal_retrieval``: MiniLM embeddings of every licence's name, SPDX id and first words, and the licence
  names and web addresses the notice quotes);
* the client's notice and question, and the answer in one or two sentences: ``"MIT (MIT License). Category:
  Permissive: you may use, change and share the code, keeping the copyright notice and licence text."``;
* the client's follow-ups, in a random order: "Can I use it in a closed-source product?", "What must I ship
  with it?", "Is it compatible with GPL-3.0?", each answered from the licence's category and SPDX id
  (``legal_followups``).

Every assistant turn is learned (``CausalLM(mask_history=False)``). In training the true licence is always
among the listed ones (put in place of the last when retrieval missed it), so the model learns to choose from
the list rather than to recall ids. Split by licence key: no licence has notices on both sides, so the held-out
licences were never seen in training. Evaluated on the held-out licences turn by turn, the model answering
each follow-up after its own earlier answers, as a client would see it: SPDX-id exact match, category
accuracy, follow-up answers right, against the untrained base with the same messages (zero-shot) and against
the retrieval alone (the nearest licence's id, category and answers), in one table, with the wrong answers
shown. Phases: data -> retrieval -> zero-shot -> adapt -> train -> evaluate -> save -> reload and answer.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import legal  # noqa: E402
import legal_followups as follow  # noqa: E402
from legal_openings import Openings, first_answers  # noqa: E402
from legal_retrieval import LicenceIndex  # noqa: E402

import adapters  # noqa: E402
from adapters.data.sources import group_split, sample  # noqa: E402
from adapters.heads.metrics import generation_metrics  # noqa: E402
from adapters.methods.lora_init import PEFT_INIT, check_load  # noqa: E402

SYSTEM = "You identify software licences from their notices and say what they ask of the user, in one or two sentences."
CANDIDATES = "Licences of the knowledge base nearest to the notice:\n{lines}"
GUIDANCE = "What their categories ask, for the client's follow-up questions:\n{lines}"
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


def opening_of(spdx: str, name: str, category: str) -> str:
    """The first answer's opening: the licence and its category, as the knowledge base has them."""
    return f"{spdx} ({name}). Category: {category}:"


def answer_of(spdx: str, name: str, category: str) -> str:
    return f"{opening_of(spdx, name, category)} {OBLIGATIONS[category]}."


def chat_rows(seed: int = 0, per_licence: int | None = 6, max_words: int = 120) -> list[dict]:
    """One client per notice (8-``max_words`` words, at most ``per_licence`` per licence), grouped by licence:
    the notice, the reference answers of every turn, and the order of the follow-ups."""
    root = legal.data_root()
    licences, spdx = legal.read_licences(root), read_spdx(root)
    notices = legal.cap_per_licence(legal.read_notices(root, licences, 8, max_words), per_licence, seed)
    rng = random.Random(seed)
    rows = []
    for n in notices:
        lic = licences[n["key"]]
        if lic["category"] not in OBLIGATIONS:
            continue
        questions = rng.sample(follow.QUESTIONS, len(follow.QUESTIONS))
        replies = follow.answers(lic["category"], spdx[n["key"]])
        rows.append(
            {
                "group": n["key"],
                "notice": n["text"],
                "spdx": spdx[n["key"]],
                "category": lic["category"],
                "turns": [(QUESTION.format(notice=n["text"]), answer_of(spdx[n["key"]], lic["name"], lic["category"]))]
                + [(q, replies[q]) for q in questions],
            }
        )
    return rows


def system_message(index: LicenceIndex | None, keys: list[str], guide: bool) -> dict:
    """The task; with retrieval, the listed licences, and with ``guide`` what their categories ask."""
    if index is None:
        return {"role": "system", "content": SYSTEM}
    content = SYSTEM + "\n\n" + CANDIDATES.format(lines=index.context(keys))
    if guide:
        listed = [(index.entries[k][0], index.entries[k][2]) for k in keys]
        content += "\n\n" + GUIDANCE.format(lines=follow.guidance(listed))
    return {"role": "system", "content": content}


def conversation(row: dict, turns: int | None = None) -> list[dict]:
    """The row's system message and its first ``turns`` exchanges (all of them by default)."""
    messages = [row["system"]]
    for question, answer in row["turns"][:turns]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def retrieve(index: LicenceIndex | None, rows: list[dict], k: int, gold: bool, seed: int, guide: bool) -> None:
    """Each row's system message, with the ``k`` nearest licences; ``gold``: the true one is always listed
    (in place of the last when retrieval missed it: training teaches choosing, not recalling)."""
    nearest = index.nearest([r["notice"] for r in rows], k) if index is not None else [[] for _ in rows]
    rng = random.Random(seed)
    for row, keys in zip(rows, nearest, strict=True):
        if gold and index is not None and row["group"] not in keys:
            keys = keys[:-1]
            keys.insert(rng.randrange(len(keys) + 1), row["group"])
        row["listed"] = keys
        row["system"] = system_message(index, keys, guide)


def parse(answer: str) -> tuple[str, str]:
    """The SPDX id (the answer's first word) and the category (after ``Category:``) of an answer."""
    words = answer.strip().split()
    found = re.search(r"Category:\s*([A-Za-z -]+?)\s*[:.]", answer)
    return (words[0] if words else ""), (found.group(1).strip() if found else "")


def scores(conversations: list[list[str]], rows: list[dict]) -> dict[str, float]:
    """What a client reads, turn by turn: the first answer's SPDX id (exact) and category, its token F1 and
    ROUGE-L; each follow-up answer right or not (``legal_followups.is_right``); whole conversations right."""
    n = max(len(rows), 1)
    first = [parse(c[0]) for c in conversations]
    spdx_right = [p[0].lower() == r["spdx"].lower() for p, r in zip(first, rows, strict=True)]
    category_right = [p[1] == r["category"] for p, r in zip(first, rows, strict=True)]
    right = {q: [] for q in follow.QUESTIONS}
    every = []
    for answers, row, a, b in zip(conversations, rows, spdx_right, category_right, strict=True):
        turns = [follow.is_right(got, q, want) for got, (q, want) in zip(answers[1:], row["turns"][1:], strict=True)]
        for ok, (q, _) in zip(turns, row["turns"][1:], strict=True):
            right[q].append(ok)
        every.append(a and b and all(turns))
    asked = [ok for oks in right.values() for ok in oks]
    return {
        "spdx_exact_match": sum(spdx_right) / n,
        "category_accuracy": sum(category_right) / n,
        **generation_metrics([c[0] for c in conversations], [r["turns"][0][1] for r in rows]),
        "follow_up_accuracy": sum(asked) / max(len(asked), 1),
        **{f"follow_up_{_slug(q)}": sum(oks) / max(len(oks), 1) for q, oks in right.items()},
        "conversation_all_right": sum(every) / n,
    }


def _slug(question: str) -> str:
    return {follow.CLOSED: "closed_source", follow.SHIP: "ship", follow.GPL3: "gpl3"}[question]


def converse(model, rows: list[dict], batch_size: int, tokens: tuple[int, int], openings=None) -> list[list[str]]:
    """Each row's conversation as a client has it: every follow-up asked after the model's own earlier answers.
    ``openings`` (one ``Openings`` per row): the first answer opens with one of them (``legal_openings``)."""
    histories = [[r["system"], {"role": "user", "content": r["turns"][0][0]}] for r in rows]
    said: list[list[str]] = [[] for _ in rows]
    for turn in tqdm(range(len(rows[0]["turns"]) if rows else 0), desc="turns", unit="turn"):
        if turn == 0:
            answers = first_turn(model, histories, openings, batch_size, tokens[0])
        else:
            answers = model.predict(histories, batch_size=batch_size, max_new_tokens=tokens[1])
        for history, mine, row, answer in zip(histories, said, rows, answers, strict=True):
            mine.append(answer)
            history.append({"role": "assistant", "content": answer})
            if turn + 1 < len(row["turns"]):
                history.append({"role": "user", "content": row["turns"][turn + 1][0]})
    return said


def first_turn(model, histories: list[list[dict]], openings, batch_size: int, tokens: int) -> list[str]:
    """The first answers: free, or opening with one of each row's ``openings`` (``legal_openings``)."""
    if openings is None:
        return model.predict(histories, batch_size=batch_size, max_new_tokens=tokens)
    return first_answers(model, histories, openings, batch_size, tokens)


def answer_openings(model, index: LicenceIndex | None, rows: list[dict], mode: str) -> list[Openings] | None:
    """Each row's allowed openings: its listed licences' (``listed``), every licence's (``known``), or none."""
    if mode == "free" or index is None:
        return None

    def of(keys):
        entries = [index.entries[k] for k in keys]
        return Openings(model.tokenizer, [opening_of(*e) for e in entries if e[2] in OBLIGATIONS])

    if mode == "known":
        return [of(index.keys)] * len(rows)
    return [of(r["listed"]) for r in rows]


def retrieval_alone(index: LicenceIndex, rows: list[dict]) -> list[list[str]]:
    """What the nearest licence alone would answer: its id, category, and the answers its category gives."""
    out = []
    for row in rows:
        spdx, name, category = index.entries[row["listed"][0]]
        replies = follow.answers(category, spdx)
        out.append([answer_of(spdx, name, category)] + [replies[q] for q, _ in row["turns"][1:]])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="smollm2-135m", help="a decoder with a chat template (packaged, folder or hub id)"
    )
    p.add_argument("--quick", action="store_true", help="a few rows and steps (tests)")
    p.add_argument("--train-size", type=int, default=480)
    p.add_argument("--eval-size", type=int, default=120)
    p.add_argument("--per-licence", type=int, default=6, help="notices of one licence at most (0: all)")
    p.add_argument("--retrieval", type=int, default=5, help="nearest licences listed in the system message (0: none)")
    p.add_argument(
        "--names",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with retrieval: also rank licences whose names or web addresses the notice quotes (legal_retrieval)",
    )
    p.add_argument(
        "--guidance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with retrieval: also list what the listed licences' categories ask (the follow-ups' answers)",
    )
    p.add_argument(
        "--opening",
        choices=["free", "listed", "known"],
        default="free",
        help="the first answer's opening (licence and category) decoded free, or constrained to the listed "
        "licences' or to every licence of the knowledge base (legal_openings)",
    )
    p.add_argument(
        "--zero-shot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer with the untrained base first (the table's zero-shot column; about 15 minutes on 2 cores)",
    )
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument(
        "--quantization",
        default="none",
        choices=["nf4", "fp4", "int8", "none"],
        help="the base's weights while training and answering: unquantized by default; nf4 for QLoRA",
    )
    p.add_argument(
        "--lora-init",
        default="default",
        choices=list(PEFT_INIT),  # the starts LoRA(init=...) takes
        help="where LoRA starts (LoRA(init=...)): loftq corrects an nf4/fp4 base's error, eva starts from the "
        "first training conversations, pissa/olora from the weights' principal part of an unquantized base",
    )
    p.add_argument("--max-length", type=int, default=960)
    p.add_argument("--max-new-tokens", type=int, default=64, help="of the first answer; follow-ups get 40")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-seed",
        type=int,
        help="seed of training alone (LoRA's start, batch order, dropout), the split kept (default: --seed)",
    )
    p.add_argument("--output", default="runs/legal-assistant")
    p.add_argument("--results", help="write the results JSON here too")
    args = p.parse_args(argv)
    try:  # a start the base cannot take is refused now, not after the data, retrieval and zero-shot answers
        check_load(args.lora_init, None if args.quantization == "none" else args.quantization, fsdp=False)
    except adapters.ConfigError as err:
        p.error(str(err))
    return args


def split(args) -> tuple[list[dict], list[dict]]:
    rows = chat_rows(args.seed, args.per_licence or None)
    train_rows, test_rows = group_split(rows, "group", 0.2, args.seed, stratify="category")
    train_size, eval_size = (24, 6) if args.quick else (args.train_size, args.eval_size)
    train_rows, test_rows = sample(train_rows, train_size, args.seed), sample(test_rows, eval_size, args.seed)
    assert not {r["group"] for r in train_rows} & {r["group"] for r in test_rows}, "a licence on both sides"
    print(
        f"{len(train_rows)} training conversations of {len({r['group'] for r in train_rows})} licences; "
        f"{len(test_rows)} held-out conversations of {len({r['group'] for r in test_rows})} other licences"
    )
    return train_rows, test_rows


def licence_index(args, rows: list[dict]) -> LicenceIndex | None:
    """The whole knowledge base (``--quick``: the rows' licences and 40 others), embeddings cached by output."""
    if not args.retrieval:
        return None
    root = legal.data_root()
    licences, spdx = legal.read_licences(root), read_spdx(root)
    keys = [k for k in licences if k in spdx]
    if args.quick:
        keys = sorted({r["group"] for r in rows} | set(keys[:40]))
    cache = None if args.quick else Path(args.output).parent / "cache" / "licence-index-minilm.pt"
    return LicenceIndex(licences, spdx, keys, cache, names=args.names)


def measure(model, rows: list[dict], args, tokens: tuple[int, int], index=None) -> tuple[dict, list[list[str]]]:
    said = converse(model, rows, args.batch_size, tokens, answer_openings(model, index, rows, args.opening))
    held_out = [{"messages": conversation(r)} for r in rows]
    loss = adapters.evaluate(model, held_out, generate=False, metric_key_prefix="", batch_size=args.batch_size)
    return {**scores(said, rows), **loss}, said


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    train_rows, test_rows = split(args)
    index = licence_index(args, train_rows + test_rows)
    retrieve(index, train_rows, args.retrieval, gold=True, seed=args.seed, guide=args.guidance)
    retrieve(index, test_rows, args.retrieval, gold=False, seed=args.seed, guide=args.guidance)
    found = sum(r["group"] in r["listed"] for r in test_rows) / len(test_rows)
    tokens = (8, 8) if args.quick else (args.max_new_tokens, 40)
    max_length = 128 if args.quick else args.max_length
    head = adapters.CausalLM(max_new_tokens=tokens[0], mask_history=False)
    quantization = None if args.quantization == "none" else args.quantization  # the zero-shot base's too

    zero_shot = None
    if args.zero_shot:
        base = adapters.adapt(args.model, adapter=None, head=head, quantization=quantization, max_length=max_length)
        zero_shot, _ = measure(base, test_rows, args, tokens, index)
        del base
        print("zero-shot:", json.dumps(zero_shot))

    seed = args.seed if args.train_seed is None else args.train_seed
    model = adapters.adapt(
        args.model,
        adapter=adapters.LoRA(r=args.r, alpha=2 * args.r, dropout=0.05, init=args.lora_init),
        head=head,
        quantization=quantization,
        max_length=max_length,
        seed=seed,
    )
    config = adapters.TrainConfig(
        epochs=1 if args.quick else args.epochs,
        max_steps=3 if args.quick else None,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_ratio=0.05,
        seed=seed,
        output_dir=args.output + "-logs",
        overwrite=True,
    )
    train_started = time.time()
    trained = adapters.train(model, [{"messages": conversation(r)} for r in train_rows], None, config)
    train_seconds = time.time() - train_started
    tuned, said = measure(model, test_rows, args, tokens, index)
    print("fine-tuned:", json.dumps(tuned))

    model.save_pretrained(args.output, overwrite=True)
    again = adapters.load(args.output)
    first = [test_rows[0]["system"], {"role": "user", "content": test_rows[0]["turns"][0][0]}]
    opens = answer_openings(again, index, test_rows[:1], args.opening)
    assert first_turn(again, [first], opens, 1, tokens[0]) == said[0][:1], "the reloaded model answers otherwise"

    result = {
        "model": args.model,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "train_licences": len({r["group"] for r in train_rows}),
        "test_licences": len({r["group"] for r in test_rows}),
        "retrieval_found": found,
        "retrieval_alone": scores(retrieval_alone(index, test_rows), test_rows) if index is not None else None,
        "zero_shot": zero_shot,
        "fine_tuned": tuned,
        "train_loss": trained.get("train_loss"),
        "steps": trained.get("steps"),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "options": vars(args),
        **examples(test_rows, said),
    }
    text = json.dumps(result, indent=2)
    Path(args.output, "results.json").write_text(text)
    if args.results:
        Path(args.results).write_text(text + "\n")
    print(table(result))
    return result


def examples(rows: list[dict], said: list[list[str]], n: int = 5) -> dict:
    """Conversations to read: ``n`` wholly right, and ``n`` of each way of going wrong (licence, category,
    a follow-up), each with the listed licences and what the reference says."""
    kinds: dict[str, list[dict]] = {"right": [], "wrong_licence": [], "wrong_category": [], "wrong_follow_up": []}
    for row, answers in zip(rows, said, strict=True):
        spdx, category = parse(answers[0])
        follow_ups = [follow.is_right(a, q, w) for a, (q, w) in zip(answers[1:], row["turns"][1:], strict=True)]
        if spdx.lower() != row["spdx"].lower():
            kind = "wrong_licence"
        elif category != row["category"]:
            kind = "wrong_category"
        else:
            kind = "right" if all(follow_ups) else "wrong_follow_up"
        kinds[kind].append(
            {
                "licence": row["group"],
                "notice": row["notice"][:300],
                "listed": row["listed"],
                "turns": [
                    {"question": q[:80], "reference": w, "answer": a}
                    for (q, w), a in zip(row["turns"], answers, strict=True)
                ],
            }
        )
    return {"counts": {k: len(v) for k, v in kinds.items()}, "examples": {k: v[:n] for k, v in kinds.items()}}


def table(result: dict) -> str:
    rows = [
        ("SPDX id exact match (first answer)", "spdx_exact_match"),
        ("category accuracy (first answer)", "category_accuracy"),
        ("first answer token F1", "token_f1"),
        ("follow-up answers right", "follow_up_accuracy"),
        ("- closed-source use", "follow_up_closed_source"),
        ("- what to ship", "follow_up_ship"),
        ("- GPL-3.0 compatibility", "follow_up_gpl3"),
        ("whole conversation right", "conversation_all_right"),
        ("loss on the reference answers", "loss"),
    ]
    sides = [result.get("retrieval_alone") or {}, result.get("zero_shot") or {}, result["fine_tuned"]]
    lines = ["| metric | retrieval alone | zero-shot (base) | fine-tuned |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{side[key]:.3f}" if key in side else "-" for side in sides) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
