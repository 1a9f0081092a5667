"""Multiple choice scored by the base's own likelihood (``MultipleChoice(scoring="likelihood")``), and
prompts that keep their cue when a text is cut (``data.fit_prompt``)."""

import pytest
import torch

import adapters
from adapters.data.encoding import Collator, encode_rows, fit_prompt

from .helpers import choice_rows, rows_of

PROMPT = "{text} but the film is"  # words of the tiny tokenizer's vocabulary


def _mean_log_prob(lm, tokenizer, context: str, choice: str) -> float:
    """What transformers' own causal LM gives: the mean log-probability of the choice's tokens."""
    start = tokenizer(context)["input_ids"]
    end = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([start + end])
    with torch.no_grad():
        log_probs = lm(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[len(start) - 1 + t, tok]) for t, tok in enumerate(end)) / len(end)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_scores_are_the_lms_mean_log_probabilities(tied_llama, padding_side):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    head = adapters.MultipleChoice(num_choices=3, scoring="likelihood", prompt=PROMPT)
    model = adapters.adapt(tied_llama, adapter=None, head=head, quantization=None, padding_side=padding_side)
    assert list(model.head.parameters()) == []  # no new weights: the base's embedding scores
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(tied_llama), AutoTokenizer.from_pretrained(tied_llama)
    inputs = [
        {"context": "good fun film", "choices": ["great", "a very dull mess", "bad"]},
        {"context": "the plot was boring and the acting awful", "choices": ["dull", "superb story", "good"]},
    ]
    scores = model.logits(inputs)  # the two rows differ in length: one of them is padded
    for row, got in zip(inputs, scores, strict=False):
        want = [_mean_log_prob(lm, tokenizer, PROMPT.replace("{text}", row["context"]), c) for c in row["choices"]]
        assert torch.allclose(got, torch.tensor(want), atol=1e-4)
    index, probs = model.predict(inputs[0], probabilities=True)
    assert index == int(scores[0].argmax()) and abs(sum(probs) - 1) < 1e-5


def test_training_moves_the_adapter_and_reloads_exactly(tied_llama, tmp_path):
    head = adapters.MultipleChoice(num_choices=3, scoring="likelihood", prompt=PROMPT)
    model = adapters.adapt(tied_llama, adapter=adapters.LoRA(r=4), head=head, quantization=None)
    rows = choice_rows(24)
    probe = [{"context": r["text"], "choices": r["choices"]} for r in rows[:4]]
    before = model.logits(probe)
    columns, _ = encode_rows(rows[:8], model.tokenizer, head, "text", "label", 64, "rows")
    batch = Collator(model.tokenizer, head)(rows_of(columns))
    model(**batch)["loss"].backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)
    assert model.backbone.get_input_embeddings().weight.grad is None  # the borrowed embedding stays frozen
    adapters.train(
        model, rows, rows[:6], adapters.TrainConfig(epochs=1, batch_size=8, lr=1e-2, output_dir=str(tmp_path / "logs"))
    )
    after = model.logits(probe)
    assert not torch.allclose(before, after)
    model.save_pretrained(tmp_path / "mc")
    again = adapters.load(tmp_path / "mc")
    assert again.head_spec.scoring == "likelihood" and again.head_spec.prompt == PROMPT
    assert torch.allclose(again.logits(probe), after, atol=1e-5)


def test_a_long_context_is_cut_not_the_prompt_or_the_choices(tied_llama):
    head = adapters.MultipleChoice(num_choices=2, scoring="likelihood", prompt=PROMPT)
    model = adapters.adapt(tied_llama, adapter=None, head=head, quantization=None)
    row = {"text": " ".join(["good film"] * 40), "choices": ["great", "very dull"], "label": 0}
    columns, cut = encode_rows([row], model.tokenizer, head, "text", "label", 32, "rows")
    assert cut == 1
    words = [model.tokenizer.decode(ids).split() for ids in columns["input_ids"][0]]
    assert all(len(ids) <= 32 for ids in columns["input_ids"][0])
    assert words[0][-5:] == ["but", "the", "film", "is", "great"]
    assert words[1][-6:] == ["but", "the", "film", "is", "very", "dull"]


def test_likelihood_scoring_is_checked(tiny_llama, tiny_bert):
    with pytest.raises(adapters.ConfigError, match="scoring="):
        adapters.MultipleChoice(num_choices=2, scoring="logits")
    with pytest.raises(adapters.ConfigError, match="holding {text} once"):
        adapters.MultipleChoice(num_choices=2, prompt="no placeholder")
    with pytest.raises(adapters.ConfigError, match="separate LM head"):
        adapters.adapt(tiny_llama, head=adapters.MultipleChoice(num_choices=2, scoring="likelihood"), quantization=None)
    with pytest.raises(adapters.ConfigError, match="needs a decoder"):
        adapters.adapt(tiny_bert, head=adapters.MultipleChoice(num_choices=2, scoring="likelihood"), quantization=None)


def test_the_memory_estimate_runs_the_likelihood_head(tied_llama):
    head = adapters.MultipleChoice(num_choices=4, scoring="likelihood")
    estimate = adapters.estimate_memory(
        tied_llama, adapter=adapters.LoRA(r=4), head=head, quantization=None, batch_size=2, seq_len=32
    )
    plain = adapters.estimate_memory(
        tied_llama,
        adapter=adapters.LoRA(r=4),
        head=adapters.MultipleChoice(num_choices=4),
        quantization=None,
        batch_size=2,
        seq_len=32,
    )
    # vocabulary logits at the choice tokens; no head weights of its own (it scores with the embedding)
    assert estimate.activations > plain.activations
    real = adapters.adapt(tied_llama, adapter=adapters.LoRA(r=4), head=head, quantization=None)
    assert estimate.trainable_params == real.parameter_counts()["trainable"] < plain.trainable_params


def test_a_prompt_keeps_its_cue_when_the_text_is_cut(tiny_llama):
    tokenizer = adapters.adapt(tiny_llama, head=adapters.Classification(labels=["a", "b"]), quantization=None).tokenizer
    texts = ["good film", " ".join(["a very dull plot"] * 10)]
    prompted, cut = fit_prompt(tokenizer, "the film {text} was", texts, 12)
    assert cut == 1
    assert prompted[0] == "the film good film was"  # a text that fits is left as it is
    ids = tokenizer(prompted[1])["input_ids"]
    assert len(ids) <= 12 and tokenizer.decode(ids).split()[-1] == "was" and prompted[1].startswith("the film a very")
    with pytest.raises(adapters.DataError, match="no room for the text"):
        fit_prompt(tokenizer, "the film was a very good and fun story {text} was", texts[1:], 8)


def test_a_cut_prompted_text_ends_with_the_cue_in_training_rows(tiny_llama):
    head = adapters.Classification(labels=["neg", "pos"], prompt="the film {text} was")
    model = adapters.adapt(tiny_llama, head=head, quantization=None)
    columns, cut = encode_rows(
        [{"text": " ".join(["dull"] * 50), "label": "neg"}], model.tokenizer, head, "text", "label", 16, "rows"
    )
    assert cut == 1 and len(columns["input_ids"][0]) == 16
    assert model.tokenizer.decode(columns["input_ids"][0]).split()[-1] == "was"
