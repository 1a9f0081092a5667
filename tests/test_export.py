"""`qadapters export`: a transformers pipeline gives the adapted model's labels and probabilities, or a
refusal says why before anything loads."""

import json

import pytest

import adapters
from adapters.artifacts.export import export_for_pipeline

from .helpers import toy_sentiment

TEXTS = ["good fun film", "a dull and tedious mess", "the acting was not very good", "wonderful"]


@pytest.mark.parametrize(
    "quantization,adapter,prompt",
    [("nf4", "lora", None), (None, "lora", None), ("nf4", None, None), (None, "lora", "review : {text} . it was")],
)
def test_the_pipeline_gives_the_adapted_models_probabilities(tiny_llama, tmp_path, quantization, adapter, prompt):
    from transformers import pipeline

    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4) if adapter else None,
        quantization=quantization,
        head=adapters.Classification(labels=["neg", "pos"], bias=False, prompt=prompt),
    )
    adapters.train(
        model, toy_sentiment(48), None, adapters.TrainConfig(max_steps=4, lr=1e-2, batch_size=8, progress=False)
    )
    model.save_pretrained(tmp_path / "art")
    export_for_pipeline(tmp_path / "art", tmp_path / "export", log=lambda *_: None)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    classify = pipeline("text-classification", model=str(tmp_path / "export"), top_k=None)
    expected = model.predict(TEXTS, probabilities=True)
    for answers, (label, probs) in zip(classify(TEXTS), expected, strict=False):
        got = {a["label"]: a["score"] for a in answers}
        assert max(got, key=got.get) == label and got == pytest.approx(probs, abs=1e-4)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda t, b: adapters.adapt(t, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["a", "b"])),
            "the head has a bias",
        ),
        (
            lambda t, b: adapters.adapt(
                t, adapter=adapters.Bottleneck(), head=adapters.Classification(labels=["a", "b"], bias=False)
            ),
            "no weight matrix",
        ),
        (
            lambda t, b: adapters.adapt(t, head=adapters.Classification(labels=["a", "b"], pooling="mean", bias=False)),
            "reads the last token only",
        ),
        (lambda t, b: adapters.adapt(b, head=adapters.Classification(labels=["a", "b"], bias=False)), "pooler"),
        (
            lambda t, b: adapters.adapt(t, head=adapters.MultipleChoice(num_choices=2)),
            "MultipleChoice head has no text-classification pipeline",
        ),
    ],
)
def test_what_does_not_map_is_refused_with_the_reason(tiny_llama, tiny_bert, tmp_path, make, match):
    make(tiny_llama, tiny_bert).save_pretrained(tmp_path / "art")
    with pytest.raises(adapters.ConfigError, match=match):
        export_for_pipeline(tmp_path / "art", tmp_path / "export")
    assert not (tmp_path / "export").exists()
