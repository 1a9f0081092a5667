"""The OpenAI-compatible endpoints, driven by the official `openai` client (in-process through FastAPI's
test client): two generative adapters and a classifier on one tiny base; chat and text completions equal
to the API's greedy `predict`; streaming as server-sent events ending in [DONE]; usage; OpenAI's 400s."""

from __future__ import annotations

import json
import shutil

import pytest

import adapters

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from fastapi.testclient import TestClient  # noqa: E402

from adapters.serving.backbones import load_served  # noqa: E402
from adapters.serving.server import create_app  # noqa: E402

from .helpers import toy_sentiment  # noqa: E402

PROMPT = "the plot of the film was"
ANSWERS = {"gen_a": "superb and moving", "gen_b": "dull tedious mess"}
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}was {% endif %}"
CHAT = [{"role": "user", "content": "the plot of the film"}]


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("openai")
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE  # the base's chat template renders `messages`
    tokenizer.save_pretrained(base)
    for name, answer in ANSWERS.items():
        model = adapters.adapt(
            str(base), adapter=adapters.LoRA(r=8, dropout=0.0), head=adapters.CausalLM(max_new_tokens=3)
        )
        rows = [{"text": PROMPT, "label": answer}] * 16
        adapters.train(model, rows, None, adapters.TrainConfig(epochs=20, lr=1e-2, batch_size=8, progress=False))
        model.save_pretrained(root / name)
    classifier = adapters.adapt(
        str(base), adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["neg", "pos"])
    )
    adapters.train(classifier, toy_sentiment(16), None, adapters.TrainConfig(max_steps=1, progress=False))
    classifier.save_pretrained(root / "sentiment")
    paths = {name: root / name for name in (*ANSWERS, "sentiment")}
    return load_served(paths), paths


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served[0])) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http), http


def test_models_lists_every_artifact_with_its_kind(client):
    listed = {m.id: m.model_extra["kind"] for m in client[0].models.list()}
    assert listed == {"gen_a": "causal_lm", "gen_b": "causal_lm", "sentiment": "classification"}


def test_completions_route_by_adapter_and_equal_predict(client, served):
    openai_client, _ = client
    for name, answer in ANSWERS.items():
        expected = adapters.load(served[1][name]).predict(PROMPT)
        done = openai_client.completions.create(model=name, prompt=PROMPT, max_tokens=3)
        assert done.choices[0].text == expected == answer  # each adapter answers as it learned
        assert (
            done.usage.completion_tokens == 3
            and done.usage.prompt_tokens == 6
            and done.choices[0].finish_reason == "length"
        )


def test_chat_completion_uses_the_chat_template_and_equals_predict(client, served):
    openai_client, _ = client
    expected = adapters.load(served[1]["gen_a"]).predict(CHAT)
    done = openai_client.chat.completions.create(model="gen_a", messages=CHAT, max_tokens=3, temperature=0)
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == expected
    assert done.object == "chat.completion" and done.usage.total_tokens == done.usage.prompt_tokens + 3


def test_streaming_sends_the_same_text_as_events_ending_in_done(client):
    openai_client, http = client
    whole = openai_client.chat.completions.create(model="gen_b", messages=CHAT, max_tokens=3).choices[0].message.content
    pieces = [
        c.choices[0].delta.content or ""
        for c in openai_client.chat.completions.create(model="gen_b", messages=CHAT, max_tokens=3, stream=True)
    ]
    assert "".join(pieces) == whole
    raw = http.post("/v1/completions", json={"model": "gen_a", "prompt": PROMPT, "max_tokens": 3, "stream": True})
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts).strip() == ANSWERS["gen_a"] and json.loads(events[-2][6:])["choices"][0]["finish_reason"]


def test_stop_sequences_cut_the_answer(client):
    done = client[0].completions.create(model="gen_a", prompt=PROMPT, max_tokens=3, stop=[" moving"])
    assert done.choices[0].text == "superb and" and done.choices[0].finish_reason == "stop"


def test_openai_refusals_are_400s_naming_the_problem(client):
    openai_client, http = client
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: best_of"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, extra_body={"best_of": 2})
    with pytest.raises(openai.BadRequestError, match="classifies, it does not complete text"):
        openai_client.completions.create(model="sentiment", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, n=2)
    assert http.post("/v1/chat/completions", content=b"{not json").status_code == 400


def test_classification_still_answers_beside_generation(client):
    _, http = client
    answer = http.post("/v1/models/sentiment/predict", json={"texts": ["good fun film"]}).json()
    assert answer["predictions"][0]["prediction"] in ("neg", "pos")
