"""The field's clients at their defaults, replayed: the exact request bodies lm-eval 0.4.13's ``local-completions``
and guidellm 0.8.1's streaming chat send (copied from their ``_create_payload`` and ``format``), the ``openai``
client's logprobs and settings, and vLLM's own endpoints. Served logprobs are the model's own: equal to the
in-process model's log-softmax for the same adapter."""

from __future__ import annotations

import json

import pytest
import torch

import adapters

from .openai_fixtures import ANSWERS, CHAT, PROMPT

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


def _ids(served, text: str) -> list[int]:
    return adapters.load(served[1]["gen_a"]).tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference_logprobs(path, ids: list[int]) -> torch.Tensor:
    """The in-process model's log-softmax at every position of ``ids`` (``adapters.load``, one forward)."""
    model = adapters.load(path)
    with torch.no_grad():
        return torch.log_softmax(model.backbone(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's ``LocalCompletionsAPI.parse_logprobs`` for one choice."""
    logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
    tokens = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return logprobs, all(tok == max(top.values()) for tok, top in zip(tokens, tops, strict=False))


def test_lm_eval_loglikelihood_gets_the_models_own_prompt_logprobs(client, served):
    _, http = client
    contexts = ["the plot of the film was", "a dull and tedious", "good", "the film"]
    continuations = [" superb and moving", " mess", " fun", " was dull"]
    requests = [(_ids(served, c), _ids(served, x)) for c, x in zip(contexts, continuations, strict=True)]
    body = {  # lm-eval's payload for a batch of 4 loglikelihood requests (tokenized_requests, the default)
        "model": "gen_a",
        "prompt": [ctx + cont for ctx, cont in requests],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    choices = sorted(answer.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for (ctx, cont), choice in zip(requests, choices, strict=True):
        ids = ctx + cont
        reference = _reference_logprobs(served[1]["gen_a"], ids)
        expected = [float(reference[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert token_logprobs[0] is None and len(token_logprobs) == len(ids) + 1  # the prompt, then 1 generated
        assert token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
        total, greedy = _lm_eval_parse(choice, len(ctx))
        assert total == pytest.approx(sum(expected[len(ctx) - 1 :]), abs=1e-4)
        argmax = [int(reference[i].argmax()) for i in range(len(ctx) - 1, len(ids) - 1)]
        assert greedy == (argmax == cont)
    tokenizer = adapters.load(served[1]["gen_a"]).tokenizer
    assert choices[0]["text"].startswith(tokenizer.decode(requests[0][0] + requests[0][1]))  # echo: the prompt first


def test_echo_with_max_tokens_0_gives_only_the_prompt(client, served):
    ids = _ids(served, PROMPT)
    body = {"model": "gen_b", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2}
    choice = client[1].post("/v1/completions", json=body).json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and choice["finish_reason"] == "length"
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"][1:])


def test_lm_eval_generate_until_with_token_id_and_list_prompts(client, served):
    _, http = client
    body = {"prompt": [_ids(served, PROMPT)], "model": "gen_a", "max_tokens": 3, "temperature": 0}
    body |= {"stop": ["\n\n"], "seed": 1234}  # lm-eval's generate_until payload
    answer = http.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"].strip() == ANSWERS["gen_a"]
    batch = http.post("/v1/completions", json={**body, "prompt": [PROMPT, PROMPT]}).json()  # --batch_size 2
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert {c["text"].strip() for c in batch["choices"]} == {ANSWERS["gen_a"]}


def _events(text: str) -> list[dict]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_guidellm_streaming_chat_at_its_defaults(client):
    """guidellm's synthetic chat request: content parts, ``stream_options`` with continuous usage, ``stop`` null,
    ``ignore_eos`` and ``max_completion_tokens`` (so exactly that many tokens come back)."""
    body = {
        "model": "gen_b",
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_completion_tokens": 8,
        "stop": None,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}],
    }
    answer = client[1].post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    events = _events(answer.text)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
    assert all("usage" in e for e in events)  # continuous_usage_stats
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]).startswith(ANSWERS["gen_b"])


def test_chat_logprobs_are_the_models_and_settings_are_accepted(client, served):
    openai_client, _ = client
    done = openai_client.chat.completions.create(
        model="gen_a", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=3, presence_penalty=0
    )
    content = done.choices[0].logprobs.content
    assert [t.token for t in content] == done.choices[0].message.content.split()  # the word-level tokenizer's tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob  # greedy: the top one
        assert bytes(entry.bytes).decode() == entry.token
    plain = openai_client.chat.completions.create(model="gen_a", messages=CHAT, max_tokens=3, logprobs=False)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == done.choices[0].message.content


def test_streams_of_several_choices_come_by_index_with_usage_last(client):
    events = _events(
        client[1]
        .post(
            "/v1/completions",
            json={"model": "gen_a", "prompt": [PROMPT, "good"], "n": 2, "max_tokens": 3, "stream": True}
            | {"stream_options": {"include_usage": True}},
        )
        .text
    )
    texts: dict[int, str] = {}
    for event in events[:-1]:
        choice = event["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert sorted(texts) == [0, 1, 2, 3] and texts[0] == texts[1] and texts[0].strip() == ANSWERS["gen_a"]
    assert events[-1]["usage"]["completion_tokens"] == 12


def test_vllm_tokenize_detokenize_and_classify(client, served):
    _, http = client
    ids = _ids(served, PROMPT)
    counted = http.post("/tokenize", json={"model": "gen_a", "prompt": PROMPT, "add_special_tokens": False}).json()
    assert counted["tokens"] == ids and counted["count"] == len(ids) and counted["max_model_len"] > 0
    chat = http.post("/tokenize", json={"model": "gen_a", "messages": CHAT}).json()
    completion = http.post("/v1/chat/completions", json={"model": "gen_a", "messages": CHAT, "max_tokens": 1}).json()
    assert chat["count"] == completion["usage"]["prompt_tokens"]  # counted as the chat endpoint renders it
    tokenizer = adapters.load(served[1]["gen_a"]).tokenizer
    assert http.post("/detokenize", json={"model": "gen_a", "tokens": ids}).json()["prompt"] == tokenizer.decode(ids)
    assert http.post("/detokenize", json={"model": "gen_a", "tokens": [10**9]}).status_code == 400
    classified = http.post("/classify", json={"model": "sentiment", "input": ["good fun film", "dull"]}).json()
    expected = adapters.load(served[1]["sentiment"]).predict(["good fun film", "dull"], probabilities=True)
    assert [d["label"] for d in classified["data"]] == [label for label, _ in expected]
    assert classified["data"][0]["probs"] == pytest.approx(list(expected[0][1].values()), abs=1e-5)
    assert http.post("/classify", json={"model": "gen_a", "input": "x"}).status_code == 400


def test_bad_values_are_400s_naming_the_field(client):
    _, http = client
    for field, value in [
        ("top_k", -5),
        ("min_p", 2),
        ("repetition_penalty", 0),
        ("presence_penalty", 3),
        ("logprobs", 21),
        ("stop_token_ids", [10**9]),
        ("logit_bias", {"x": 1}),
        ("prompt", [[1, -1]]),
        ("max_tokens", 0),
    ]:
        answer = http.post("/v1/completions", json={"model": "gen_a", "prompt": PROMPT, field: value})
        assert answer.status_code == 400, (field, answer.text)
        assert field.split("_")[0] in answer.json()["error"]["message"], (field, answer.json())


@pytest.fixture(scope="module")
def smol_vocabulary_app(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's real tokenizer (JSON needs real characters), served."""
    pytest.importorskip("xgrammar")
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer, LlamaForCausalLM

    from adapters.backbone.packaged import resolve_packaged
    from adapters.serving.backbones import load_served
    from adapters.serving.server import create_app

    from .helpers import llama_config

    root = tmp_path_factory.mktemp("smol-vocabulary")
    tokenizer = AutoTokenizer.from_pretrained(resolve_packaged("smollm2-135m"))
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(len(tokenizer))).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = adapters.adapt(str(root / "base"), adapter=None, head=adapters.CausalLM(max_new_tokens=8))
    model.save_pretrained(root / "json")
    with TestClient(create_app(load_served({"json": root / "json"}))) as http:
        yield http


SCHEMA = {
    "type": "object",
    "properties": {"category": {"type": "string", "enum": ["permissive", "copyleft"]}, "osi": {"type": "boolean"}},
    "required": ["category", "osi"],
    "additionalProperties": False,
}


def test_response_format_makes_even_a_random_model_answer_the_schema(smol_vocabulary_app):
    http = smol_vocabulary_app
    chat = {"model": "json", "messages": [{"role": "user", "content": "Which licence?"}], "max_tokens": 60}
    free = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)  # random weights: not JSON unless constrained
    for seed in (1, 2):
        schema_format = {"type": "json_schema", "json_schema": {"name": "licence", "schema": SCHEMA}}
        body = {**chat, "response_format": schema_format, "temperature": 1.0, "seed": seed}
        answer = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        parsed = json.loads(answer["message"]["content"])
        assert set(parsed) == {"category", "osi"} and parsed["category"] in ("permissive", "copyleft")
        assert isinstance(parsed["osi"], bool) and answer["finish_reason"] == "stop"
    anything = http.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_object"}}).json()
    text, finish = anything["choices"][0]["message"]["content"], anything["choices"][0]["finish_reason"]
    assert text.startswith('{"')  # any object: a random model may still be writing its first key at max_tokens
    assert finish == "length" or isinstance(json.loads(text), dict)
    bad = {**chat, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}
    refused = http.post("/v1/chat/completions", json=bad)
    assert refused.status_code == 400 and "response_format" in refused.json()["error"]["message"]
