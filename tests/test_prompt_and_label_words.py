"""Two options for decoders: a prompt around each text, and a head that starts as the base's own
next-token scores of the label words (its zero-shot classifier)."""

import pytest
import torch

import adapters

LABELS = ["neg", "pos"]


def test_the_prompt_wraps_every_text(tiny_llama):
    head = adapters.Classification(labels=LABELS, prompt="the film {text} was")
    prompted = adapters.adapt(tiny_llama, head=head, quantization=None)
    plain = adapters.adapt(tiny_llama, head=adapters.Classification(labels=LABELS), quantization=None)
    plain.head.load_state_dict(prompted.head.state_dict())
    texts = ["good fun", "a dull mess"]
    assert torch.allclose(prompted.logits(texts), plain.logits([f"the film {t} was" for t in texts]), atol=1e-6)
    assert prompted.encode(["good"])["input_ids"].shape[1] == plain.encode(["the film good was"])["input_ids"].shape[1]


@pytest.mark.parametrize("prompt", ["no placeholder", "{text} and {text}"])
def test_a_prompt_needs_one_placeholder(prompt):
    with pytest.raises(adapters.ConfigError, match="holding {text} once"):
        adapters.Classification(labels=LABELS, prompt=prompt)


def test_label_words_start_the_head_as_the_lms_zero_shot_scores(tied_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    head = adapters.Classification(labels=LABELS, label_words=["bad", "good"], prompt="{text} is", dropout=0.0)
    model = adapters.adapt(tied_llama, head=head, quantization=None)
    lm = AutoModelForCausalLM.from_pretrained(tied_llama)
    tokenizer = AutoTokenizer.from_pretrained(tied_llama)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("bad", "good")]
    texts = ["a very moving story", "boring plot"]
    for text, logits in zip(texts, model.logits(texts), strict=False):
        encoded = tokenizer(f"{text} is", return_tensors="pt")
        with torch.no_grad():
            next_token = lm(**encoded).logits[0, -1]
        assert torch.allclose(logits, next_token[ids], atol=1e-4)


def test_label_words_are_checked(tiny_llama, tied_llama):
    with pytest.raises(adapters.ConfigError, match="one non-empty word per label"):
        adapters.Classification(labels=LABELS, label_words=["good"])
    with pytest.raises(adapters.ConfigError, match="separate LM head"):  # the plain tiny Llama is untied
        adapters.adapt(tiny_llama, head=adapters.Classification(labels=LABELS, label_words=["bad", "good"]))
    with pytest.raises(adapters.ConfigError, match="distinct tokens"):
        adapters.adapt(tied_llama, head=adapters.Classification(labels=LABELS, label_words=["good", "good"]))
