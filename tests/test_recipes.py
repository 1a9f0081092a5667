"""The sentiment recipe end to end: on a user's CSV with a tiny model (fast), and on the
packaged LLM and data (slow)."""

import csv
import json
import sys
from pathlib import Path

import pytest

import adapters

from .helpers import toy_sentiment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import legal_assistant  # noqa: E402
import legal_followups  # noqa: E402
import sentiment  # noqa: E402


def test_sentiment_recipe_on_a_users_csv(tiny_llama, tmp_path):
    rows = toy_sentiment(80)
    with open(tmp_path / "reviews.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["review", "stars", "film"])
        writer.writeheader()
        for i, r in enumerate(rows):
            writer.writerow({"review": r["text"], "stars": r["label"], "film": f"film{i // 4}"})
    out = tmp_path / "art"
    argv = [
        "--model",
        tiny_llama,
        "--data",
        str(tmp_path / "reviews.csv"),
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--group-column",
        "film",
        "--epochs",
        "3",
        "--lr",
        "5e-3",
        "--batch-size",
        "8",
        "--output",
        str(out),
    ]
    first = sentiment.main(argv)
    result = sentiment.main(argv)  # running the recipe again replaces its artifact and logs
    assert result["accuracy"] == first["accuracy"]
    assert result["test_rows"] + result["train_rows"] == 80 and result["accuracy"] >= 0.7
    assert json.loads((out / "results.json").read_text())["accuracy"] == result["accuracy"]
    assert adapters.load(out).head_spec.labels == ["neg", "pos"]


def test_sentiment_task_prompt_defaults(tiny_llama, tied_llama, tiny_bert):
    """On the packaged data a decoder gets the review prompt, and label words when its embeddings are
    tied (as label words need); an encoder, a user's file or an explicit choice gets what was asked."""
    labels = ["negative", "positive"]
    words = [" negative", " positive"]
    assert sentiment.task_prompt(sentiment.parse_args(["--model", tied_llama]), labels) == (
        sentiment.REVIEW_PROMPT,
        words,
    )
    # untied (the tiny test Llama): the prompt, no label words
    assert sentiment.task_prompt(sentiment.parse_args(["--model", tiny_llama]), labels) == (
        sentiment.REVIEW_PROMPT,
        None,
    )
    assert sentiment.task_prompt(sentiment.parse_args(["--model", tiny_bert]), labels) == (None, None)
    assert sentiment.task_prompt(sentiment.parse_args(["--model", tiny_llama, "--data", "x.csv"]), labels) == (
        None,
        None,
    )
    off = sentiment.parse_args(["--model", tiny_llama, "--prompt", "", "--no-label-words"])
    assert sentiment.task_prompt(off, labels) == (None, None)
    typed = sentiment.parse_args(
        ["--model", tiny_llama, "--data", "x.csv", "--prompt", "Text: {text}\\nMood:", "--label-words"]
    )
    assert sentiment.task_prompt(typed, labels) == ("Text: {text}\nMood:", words)


def test_sentiment_budgets():
    assert sentiment.parse_args([]).budget == "default" and sentiment.BUDGETS["full"] > sentiment.BUDGETS["default"]
    for bad in (
        ["--budget", "huge"],
        ["--top-layers", "0"],
        ["--adapter", "bottleneck", "--top-layers", "4"],
        ["--zero-shot", "--no-label-words"],
    ):
        with pytest.raises(SystemExit):
            sentiment.parse_args(bad)


def test_group_split_keeps_groups_apart():
    from adapters.data.sources import group_split

    rows = [{"group": i // 3, "label": "a"} for i in range(60)]
    train, test = group_split(rows, "group", 0.2, seed=1)
    assert len(train) + len(test) == 60 and 9 <= len(test) <= 15
    assert not {r["group"] for r in train} & {r["group"] for r in test}


@pytest.mark.slow
def test_sentiment_recipe_on_the_packaged_llm(tmp_path):
    result = sentiment.main(
        ["--train-size", "96", "--eval-size", "64", "--zero-shot", "--output", str(tmp_path / "art")]
    )
    assert result["model"] == "smollm2-135m" and result["quantization"] == "none"
    assert result["prompt"] == sentiment.REVIEW_PROMPT and result["label_words"] == [" negative", " positive"]
    # the label-word head makes the untrained model a classifier already (77% on the 1,000 rows of
    # make run); 6 steps on 96 rows keep it one; and accuracy is a share of the 64 held-out rows
    assert result["zero_shot_accuracy"] > result["majority_baseline"]
    assert result["macro_f1"] > 0.6 and abs(result["accuracy"] * 64 - round(result["accuracy"] * 64)) < 1e-6
    again = adapters.load(tmp_path / "art")
    assert again.base.is_decoder and again.base.quantization is None
    assert again.head_spec.prompt == sentiment.REVIEW_PROMPT


@pytest.mark.slow
def test_sentiment_recipe_on_the_packaged_encoder_in_int8(tmp_path):
    result = sentiment.main(
        [
            "--model",
            "minilm-l6",
            "--quantization",
            "int8",
            "--train-size",
            "512",
            "--eval-size",
            "256",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--output",
            str(tmp_path / "art"),
        ]
    )
    assert result["accuracy"] > result["majority_baseline"]


@pytest.mark.slow
def test_legal_assistant_recipe_quick(tiny_chat_llama, tmp_path):
    """The assistant recipe end to end on a tiny chat model: held-out licences only, retrieval listing the
    nearest licences, every turn answered after the model's own earlier answers, the table's metrics for the
    retrieval alone, the zero-shot base and the fine-tuned model, examples, a reload that answers the same."""
    base = tiny_chat_llama
    result = legal_assistant.main(["--quick", "--model", str(base), "--output", str(tmp_path / "out")])
    assert result["train_licences"] and result["test_licences"] and result["test_rows"] == 6
    assert 0 < result["retrieval_found"] <= 1 and result["retrieval_alone"]["follow_up_accuracy"] > 0
    for side in ("retrieval_alone", "zero_shot", "fine_tuned"):
        assert {"spdx_exact_match", "category_accuracy", "follow_up_accuracy", "conversation_all_right"} <= set(
            result[side]
        )
    assert sum(result["counts"].values()) == 6 and (tmp_path / "out" / "results.json").exists()
    shown = [c for kind in result["examples"].values() for c in kind]
    assert all(len(c["turns"]) == 4 and len(c["listed"]) == 5 for c in shown)


def _row(spdx="MIT", category="Permissive"):
    replies = legal_followups.answers(category, spdx)
    first = legal_assistant.answer_of(spdx, "MIT License", category)
    return {"spdx": spdx, "category": category, "turns": [("q", first)] + [(q, replies[q]) for q in replies]}


def test_assistant_answers_are_parsed_and_scored():
    row = _row()
    assert legal_assistant.parse(row["turns"][0][1]) == ("MIT", "Permissive")
    perfect = legal_assistant.scores([[a for _, a in row["turns"]]], [row])
    assert perfect["spdx_exact_match"] == perfect["category_accuracy"] == perfect["exact_match"] == 1.0
    assert perfect["follow_up_accuracy"] == perfect["conversation_all_right"] == 1.0
    copyleft = legal_followups.answers("Copyleft", "GPL-2.0-only")
    wrong = ["Apache-2.0 (Apache). Category: Copyleft: share alike."] + [copyleft[q] for q, _ in row["turns"][1:]]
    scored = legal_assistant.scores([wrong], [row])
    assert scored["spdx_exact_match"] == scored["category_accuracy"] == scored["follow_up_accuracy"] == 0.0
    assert 0 < scored["token_f1"] < 1


def test_follow_up_answers_follow_the_category_and_a_reworded_answer_still_counts():
    closed = legal_followups.CLOSED
    assert legal_followups.answers("Copyleft", "GPL-3.0-only")[legal_followups.GPL3].startswith("Yes")
    assert legal_followups.answers("Copyleft", "GPL-2.0-only")[legal_followups.GPL3].startswith("Only")
    yes = legal_followups.answers("Permissive", "MIT")[closed]
    no = legal_followups.answers("Copyleft", "GPL-2.0-only")[closed]
    assert legal_followups.is_right("Yes, keep its copyright notice and the licence text.", closed, yes)
    assert not legal_followups.is_right("Yes, keep its copyright notice and the licence text.", closed, no)
    assert not legal_followups.is_right("", closed, yes)
    assert set(legal_followups.ANSWERS) >= set(legal_assistant.OBLIGATIONS)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lora-init", "loftq"], "quantization='nf4' or 'fp4'"),
        (["--lora-init", "pissa", "--quantization", "nf4"], "rewrites the frozen weights"),
    ],
)
def test_the_assistant_refuses_a_start_its_base_cannot_take_before_any_data(argv, message, capsys):
    with pytest.raises(SystemExit):
        legal_assistant.parse_args(argv)
    assert message in capsys.readouterr().err
    assert legal_assistant.parse_args(["--lora-init", "eva", "--quantization", "nf4"]).lora_init == "eva"


def test_a_constrained_first_answer_opens_with_a_listed_licence_and_is_free_after():
    """The untrained base's first answer opens with exactly one of its row's openings (rows with different
    lists in one left-padded batch), and goes on past it."""
    import legal_openings

    model = adapters.adapt("smollm2-135m", adapter=None, head=adapters.CausalLM(max_new_tokens=24), quantization=None)
    lists = [["MIT", "Apache-2.0"], ["GPL-2.0-only", "GPL-2.0-or-later", "LGPL-2.1-only"]]
    openings = [[legal_assistant.opening_of(s, s.split("-")[0], "Permissive") for s in ids] for ids in lists]
    tries = [legal_openings.Openings(model.tokenizer, texts) for texts in openings]
    prompts = ["Which licence is this notice?", "a much longer notice: " + "permission is hereby granted " * 4]
    answers = legal_openings.first_answers(model, prompts, tries, batch_size=2, tokens=24)
    for answer, texts in zip(answers, openings, strict=True):
        assert any(answer.strip().startswith(t) for t in texts), answer
        assert len(model.tokenizer(answer)["input_ids"]) > min(len(model.tokenizer(t)["input_ids"]) for t in texts)
    mit = model.tokenizer(openings[0][0], add_special_tokens=False)["input_ids"]
    assert tries[0].allowed(tuple(mit[:1])) == [mit[1]] and tries[0].allowed(tuple(mit)) is None


def test_retrieval_ranks_the_licence_a_notice_names_or_links_first():
    """``NameMatch``: a licence's whole name found in the notice (``version`` and punctuation aside) or one of its
    web addresses quoted whole scores; a sibling's name with another version number, or an address that is only
    a prefix of the quoted one, does not."""
    import legal_retrieval

    licences = [
        {"names": ["Academic Free License 1.1", "AFL-1.1"], "urls": ["https://example.org/terms/academic"]},
        {"names": ["Academic Free License 2.1", "AFL-2.1"], "urls": ["http://www.example.org/terms/"]},
        {"names": ["MIT License", "MIT"], "urls": []},
    ]
    match = legal_retrieval.NameMatch(licences)
    words, quoted = match.matches("Licensed under the Academic Free License, version 1.1.")
    assert words.tolist() == [5.0, 0.0, 0.0] and quoted.tolist() == [0.0, 0.0, 0.0]
    words, quoted = match.matches("See https://www.example.org/terms/academic/. MIT-style terms.")
    assert words.tolist() == [0.0, 0.0, 1.0] and quoted.tolist() == [1.0, 0.0, 0.0]
    assert match.scores("Licensed under the Academic Free License version 1.1").argmax() == 0
