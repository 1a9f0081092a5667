"""Every head beyond classification, on a tiny encoder and decoder, nf4 and unquantized:
training lowers the loss on a small learnable task, the round trip is exact, bad rows fail clearly."""

import pytest
import torch

import adapters

from .helpers import choice_rows, multilabel_rows, regression_rows, tag_rows

TASKS = {
    "multi_label": (lambda: adapters.MultiLabel(labels=["pos", "neg"]), multilabel_rows, "micro_f1"),
    "regression": (lambda: adapters.Regression(), regression_rows, "pearson"),
    "multiple_choice": (lambda: adapters.MultipleChoice(num_choices=3), choice_rows, "accuracy"),
    "token_classification": (
        lambda: adapters.TokenClassification(labels=["O", "B-POS", "B-NEG"]),
        tag_rows,
        "token_accuracy",
    ),
}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("quantization", ["nf4", None])
def test_training_lowers_the_loss_and_round_trips(tiny_model, task, quantization, tmp_path):
    make_head, make_rows, metric = TASKS[task]
    model = adapters.adapt(tiny_model, adapter=adapters.LoRA(r=8), head=make_head(), quantization=quantization)
    train_rows, eval_rows = make_rows(96), make_rows(24, seed=1)
    before = adapters.evaluate(model, train_rows)
    metrics = adapters.train(
        model,
        train_rows,
        eval_rows,
        adapters.TrainConfig(epochs=4, lr=5e-3, head_lr=2e-2, batch_size=16, progress=False),
    )
    after = adapters.evaluate(model, train_rows)
    assert after["eval_loss"] < before["eval_loss"] and f"eval_{metric}" in after
    assert metrics["eval_count"] == 24 and ("eval_" + metric) in metrics

    model.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art")
    assert again.head_spec == model.head_spec
    inputs = [r["text"] for r in eval_rows[:4]]
    if task == "multiple_choice":
        inputs = [{"context": r["text"], "choices": r["choices"]} for r in eval_rows[:4]]
    ours, theirs = model.logits(inputs), again.logits(inputs)
    if isinstance(ours, list):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=False))
    else:
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert again.predict(inputs) == model.predict(inputs)


def test_predictions_have_the_heads_shape(tiny_llama):
    ml = adapters.adapt(tiny_llama, adapter=None, head=adapters.MultiLabel(labels=["pos", "neg"], threshold=0.01))
    assert ml.predict("good film") == ["pos", "neg"]  # every label passes a tiny threshold
    labels, probs = ml.predict("good film", probabilities=True)
    assert set(probs) == {"pos", "neg"}
    assert isinstance(adapters.adapt(tiny_llama, adapter=None, head=adapters.Regression()).predict("good"), float)
    two = adapters.adapt(tiny_llama, adapter=None, head=adapters.Regression(num_outputs=2)).predict(["good", "bad"])
    assert len(two) == 2 and len(two[0]) == 2
    mc = adapters.adapt(tiny_llama, adapter=None, head=adapters.MultipleChoice(num_choices=3))
    index, scores = mc.predict({"context": "good fun", "choices": ["bad", "great", "dull"]}, probabilities=True)
    assert index in (0, 1, 2) and abs(sum(scores) - 1) < 1e-5
    tok = adapters.adapt(tiny_llama, adapter=None, head=adapters.TokenClassification(labels=["O", "B-POS"]))
    tags = tok.predict([["good", "film"], "a very dull movie"])
    assert [len(t) for t in tags] == [2, 4] and all(t in ("O", "B-POS") for row in tags for t in row)


def test_token_labels_go_to_first_subtokens_only(tiny_bert):
    from adapters.data.encoding import encode_rows

    model = adapters.adapt(tiny_bert, adapter=None, head=adapters.TokenClassification(labels=["O", "B-POS"]))
    columns, cut = encode_rows(
        [{"text": ["good", "film"], "label": ["B-POS", "O"]}],
        model.tokenizer,
        model.head_spec,
        "text",
        "label",
        64,
        "data",
    )
    assert columns["labels"][0] == [-100, 1, 0, -100]  # [CLS] good film [SEP]
    assert cut == 0
    _, cut = encode_rows(
        [{"text": ["good"] * 10, "label": ["O"] * 10}], model.tokenizer, model.head_spec, "text", "label", 6, "data"
    )
    assert cut == 1  # reported, not silently dropped


@pytest.mark.parametrize(
    "head,row,match",
    [
        (adapters.MultiLabel(labels=["a", "b"]), {"text": "x", "label": "a"}, "list of label names"),
        (adapters.MultiLabel(labels=["a", "b"]), {"text": "x", "label": ["c"]}, "not one of"),
        (adapters.Regression(), {"text": "x", "label": "high"}, "number"),
        (adapters.Regression(num_outputs=2), {"text": "x", "label": 1.0}, "got 1 value"),
        (adapters.Regression(), {"text": "x", "label": float("nan")}, "not finite"),
        (adapters.MultipleChoice(num_choices=3), {"text": "x", "choices": ["a", "b"], "label": 0}, "3 candidate"),
        (adapters.MultipleChoice(num_choices=3), {"text": "x", "choices": ["a", "b", "c"], "label": 3}, "index"),
        (adapters.MultipleChoice(num_choices=3), {"text": "x", "label": 0}, "no column 'choices'"),
        (adapters.TokenClassification(labels=["O", "B"]), {"text": ["a", "b"], "label": ["O"]}, "2 words but 1 tags"),
        (adapters.TokenClassification(labels=["O", "B"]), {"text": "a b", "label": ["O", "O"]}, "list of words"),
        (adapters.TokenClassification(labels=["O", "B"]), {"text": ["a"], "label": ["X"]}, "not one of"),
    ],
)
def test_bad_rows_are_clear_errors(tiny_llama, head, row, match):
    model = adapters.adapt(tiny_llama, adapter=None, head=head)
    with pytest.raises(adapters.DataError, match=match):
        adapters.train(model, [row], None, adapters.TrainConfig(max_steps=1, progress=False))


@pytest.mark.parametrize(
    "kwargs",
    [
        (adapters.MultiLabel, {"labels": ["a", "b"], "threshold": 1.5}),
        (adapters.Regression, {"num_outputs": 0}),
        (adapters.MultipleChoice, {"num_choices": 1}),
        (adapters.TokenClassification, {"labels": ["O"]}),
        (adapters.CausalLM, {"max_new_tokens": 0}),
    ],
)
def test_bad_head_settings(kwargs):
    cls, values = kwargs
    with pytest.raises(adapters.ConfigError):
        cls(**values)


PROMPT, ANSWER = "the plot of the film was", "superb and moving"


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_causal_lm_learns_to_answer_a_prompt(tiny_llama, tmp_path, quantization):
    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=8, dropout=0.0),
        head=adapters.CausalLM(max_new_tokens=3),
        quantization=quantization,
    )
    assert "lm_head" not in str(
        model.adapter_state["peft"].peft_config["default"].target_modules
    )  # the LM head stays frozen
    assert model.predict(PROMPT) != ANSWER
    rows = [{"text": PROMPT, "label": ANSWER}] * 16
    before = adapters.evaluate(model, rows[:4])
    metrics = adapters.train(
        model, rows, rows[:4], adapters.TrainConfig(epochs=20, lr=1e-2, batch_size=8, progress=False)
    )
    assert metrics["eval_loss"] < before["eval_loss"] and metrics["eval_perplexity"] < before["eval_perplexity"]
    assert model.predict(PROMPT) == ANSWER
    model.save_pretrained(tmp_path / "art")
    assert adapters.load(tmp_path / "art").predict([PROMPT]) == [ANSWER]


def test_causal_lm_loss_counts_response_tokens_only(tiny_llama):
    from adapters.data.encoding import encode_rows

    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM())
    columns, _ = encode_rows(
        [{"text": "the film", "label": "good fun"}], model.tokenizer, model.head_spec, "text", "label", 32, "data"
    )
    ids, labels = columns["input_ids"][0], columns["labels"][0]
    assert labels[:2] == [-100, -100] and labels[2:] == ids[2:] and ids[-1] == model.tokenizer.eos_token_id


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_causal_lm_loss_projects_only_the_positions_it_reads(tiny_llama, quantization):
    """The loss and the adapter's gradients from the logits of the response positions alone equal those from
    every position's logits (transformers' own shifted cross-entropy over the whole sequence)."""
    import torch
    import torch.nn.functional as F

    from adapters.data.encoding import Collator, encode_rows

    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4, dropout=0.0), head=adapters.CausalLM(),
                           quantization=quantization, seed=0)  # fmt: skip
    rows = [{"text": "the plot of the film was", "label": "superb"}, {"text": "the acting was", "label": "a dull mess"}]
    columns, _ = encode_rows(rows, model.tokenizer, model.head_spec, "text", "label", 32, "data")
    batch = Collator(model.tokenizer, model.head_spec)([{k: columns[k][i] for k in columns} for i in range(2)])
    kept = model(**batch)
    assert kept["logits"].shape[1] < batch["input_ids"].shape[1] - 1  # fewer positions than the sequence's
    kept["loss"].backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                          **model._positions(batch["attention_mask"])).logits  # fmt: skip
    labels = batch["labels"]
    reference = F.cross_entropy(full[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    reference.backward()
    assert torch.allclose(kept["loss"], reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(ours[name], param.grad, rtol=1e-4, atol=1e-7), name


def test_causal_lm_needs_a_decoder(tiny_bert):
    with pytest.raises(adapters.ConfigError, match="decoder"):
        adapters.adapt(tiny_bert, adapter=None, head=adapters.CausalLM())


def test_causal_lm_chat_messages_use_the_chat_template(tiny_llama):
    from adapters.data.encoding import encode_rows

    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM())
    model.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}the {% endif %}"
    )
    rows = [{"messages": [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "fun"}]}]
    columns, _ = encode_rows(rows, model.tokenizer, model.head_spec, "text", "label", 32, "data")
    words = model.tokenizer.convert_ids_to_tokens(columns["input_ids"][0])
    assert words == ["good", "film", "the", "fun", "[SEP]"]  # prompt rendered by the template, then the answer
    assert columns["labels"][0][:3] == [-100] * 3
    with pytest.raises(adapters.DataError, match="assistant"):
        encode_rows(
            [{"messages": [{"role": "user", "content": "good"}]}],
            model.tokenizer,
            model.head_spec,
            "text",
            "label",
            32,
            "data",
        )


def test_causal_lm_evaluation_scores_the_generated_answers(tiny_llama):
    from adapters.heads.metrics import generation_metrics

    assert generation_metrics(["The Apache-2.0 licence.", "mit"], ["apache-2.0 licence", "gpl"]) == {
        "exact_match": 0.5,
        "token_f1": 0.5,
        "rougeL": 0.5,
    }
    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4, dropout=0.0), head=adapters.CausalLM(max_new_tokens=3)
    )
    rows = [{"text": PROMPT, "label": ANSWER}] * 16
    adapters.train(model, rows, None, adapters.TrainConfig(epochs=20, lr=1e-2, batch_size=8, progress=False))
    metrics = adapters.evaluate(model, rows[:4])
    assert model.predict(PROMPT) == ANSWER
    assert metrics["eval_exact_match"] == metrics["eval_token_f1"] == metrics["eval_rougeL"] == 1.0
    assert "eval_exact_match" not in adapters.evaluate(model, rows[:4], generate=False)


def test_generation_settings_are_checked_with_typed_errors(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM(max_new_tokens=2))
    with pytest.raises(adapters.ConfigError, match=r"unknown generation setting\(s\) \['temprature'\]"):
        model.predict("good film", temprature=0.5)
    with pytest.raises(adapters.ConfigError, match=r"temperature=-1.0: it must be a positive number"):
        model.predict("good film", do_sample=True, temperature=-1.0)
    with pytest.raises(adapters.ConfigError, match=r"top_p=1.5: it must be in \(0, 1\]"):
        model.predict("good film", do_sample=True, top_p=1.5)
    with pytest.raises(adapters.ConfigError, match="has no label probabilities"):
        model.predict("good film", probabilities=True)
    with pytest.raises(adapters.DataError, match="row 1: column 'text' is empty"):
        model.predict("   ")
    assert isinstance(model.predict("good film", max_new_tokens=1), str)


def test_chats_get_the_explicit_system_prompt_and_a_default_one_is_said(tiny_llama, caplog):
    import logging

    from adapters.data import encoding
    from adapters.data.encoding import encode_rows

    template = (
        "{% if messages[0]['role'] != 'system' %}you are helpful {% endif %}"
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}the {% endif %}"
    )
    rows = [{"messages": [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "fun"}]}] * 3
    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM())
    model.tokenizer.chat_template = template
    encoding._said_system.clear()
    with caplog.at_level(logging.WARNING, logger="adapters.data.encoding"):
        columns, _ = encode_rows(rows, model.tokenizer, model.head_spec, "text", "label", 6, "chats")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "adds its own default system prompt (3 tokens)" in said and "CausalLM(system_prompt=" in said
    assert "was cut in 3 row(s) longer than max_length=6 (chats row 1, chats row 2, chats row 3)" in said
    explicit = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM(system_prompt="film"))
    explicit.tokenizer.chat_template = template
    columns, _ = encode_rows(rows[:1], explicit.tokenizer, explicit.head_spec, "text", "label", 32, "chats")
    words = explicit.tokenizer.convert_ids_to_tokens(columns["input_ids"][0])
    assert words[:3] == ["film", "good", "film"]  # the given system message first, no default one


CHAT_TEMPLATE = (  # role, text, end of turn; the generation prompt is the start of an assistant message
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "good film"},
    {"role": "assistant", "content": "fun"},
    {"role": "user", "content": "bad film"},
    {"role": "assistant", "content": "not fun"},
]


def _encoded(model, chats, max_length=64):
    from adapters.data.encoding import encode_rows

    rows = [{"messages": m} for m in chats]
    columns, _ = encode_rows(rows, model.tokenizer, model.head_spec, "text", "label", max_length, "chats")
    return columns


def test_every_assistant_turn_is_learned_with_mask_history_false(tiny_llama):
    """mask_history=False: each assistant message and its end of turn are labels, user turns never; the
    default learns the last answer only; a one-answer chat encodes the same either way."""
    every = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM(mask_history=False))
    last = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM())
    for model in (every, last):
        model.tokenizer.chat_template = CHAT_TEMPLATE
    tok = every.tokenizer
    learned = {
        name: tok.convert_ids_to_tokens([t for t in _encoded(m, [TWO_TURNS])["labels"][0] if t != -100])
        for name, m in (("every", every), ("last", last))
    }
    assert learned == {"every": ["fun", "[SEP]", "not", "fun", "[SEP]"], "last": ["not", "fun", "[SEP]"]}
    assert _encoded(every, [TWO_TURNS])["input_ids"] == _encoded(last, [TWO_TURNS])["input_ids"]
    assert _encoded(every, [TWO_TURNS[:2]]) == _encoded(last, [TWO_TURNS[:2]])
    cut = _encoded(every, [TWO_TURNS], max_length=6)  # the start goes, the latest turn stays
    assert tok.convert_ids_to_tokens(cut["input_ids"][0])[-3:] == ["not", "fun", "[SEP]"]


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.CausalLM(mask_history=False))
    # drops past assistant messages, as templates that strip earlier reasoning do
    model.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }} "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}the {% endif %}"
    )
    with pytest.raises(adapters.DataError, match=r"chats row 1: .*rewrites earlier turns.*mask_history=True"):
        _encoded(model, [TWO_TURNS])
    with pytest.raises(adapters.ConfigError, match="mask_history='no' must be True or False"):
        adapters.CausalLM(mask_history="no")


def test_a_multi_turn_chat_teaches_both_answers_and_the_artifact_keeps_the_setting(tiny_llama, tmp_path):
    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4, dropout=0.0),
        head=adapters.CausalLM(max_new_tokens=2, mask_history=False),
    )
    model.tokenizer.chat_template = CHAT_TEMPLATE
    adapters.train(
        model, [{"messages": TWO_TURNS}] * 16, None, adapters.TrainConfig(epochs=25, lr=1e-2, progress=False)
    )
    assert model.predict([TWO_TURNS[:1]]) == ["fun"]  # the first answer was learned too
    assert model.predict([TWO_TURNS[:3]]) == ["not fun"]
    model.save_pretrained(tmp_path / "chat")
    assert adapters.load(tmp_path / "chat").head_spec.mask_history is False
