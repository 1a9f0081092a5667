"""The OpenAI-compatible endpoints, driven by the official `openai` client (in-process through FastAPI's
test client): two generative adapters and a classifier on one tiny base; chat and text completions equal
to the API's greedy `predict`; streaming as server-sent events ending in [DONE]; usage; OpenAI's 400s."""

from __future__ import annotations

import json
import time

import pytest

import adapters

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


from .openai_fixtures import ANSWERS, CHAT, PROMPT  # noqa: E402


def test_models_lists_every_artifact_with_its_kind(client):
    listed = {m.id: m.model_extra["kind"] for m in client[0].models.list()}
    assert listed == {"gen_a": "causal_lm", "gen_b": "causal_lm", "sentiment": "classification"}


def test_models_retrieve_gives_the_base_and_the_context_and_a_404_the_openai_client_reads(client, served):
    openai_client, _ = client
    from adapters.artifacts.format import read_spec

    model = openai_client.models.retrieve("gen_a")
    spec = read_spec(served[1]["gen_a"])
    assert model.id == "gen_a" and model.model_extra["parent"] == spec.base.name  # the base it sits on
    assert model.model_extra["max_model_len"] == spec.max_length
    with pytest.raises(openai.NotFoundError) as refused:
        openai_client.models.retrieve("nope")
    assert "no model 'nope'" in refused.value.message  # the client shows error.message, not "Error code: 404"


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
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: tools"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, extra_body={"tools": []})
    with pytest.raises(openai.BadRequestError, match="best_of other than n is not supported"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, best_of=2)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, suffix="end")
    with pytest.raises(openai.BadRequestError, match="classifies, it does not complete text"):
        openai_client.completions.create(model="sentiment", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="n must be an integer from 1 to 16"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, n=17)
    with pytest.raises(openai.BadRequestError, match="content parts of type \\['image_url'\\]"):
        picture = {"type": "image_url", "image_url": {"url": "data:,"}}
        openai_client.chat.completions.create(model="gen_a", messages=[{"role": "user", "content": [picture]}])
    with pytest.raises(openai.BadRequestError, match="stream_options can only be given with stream"):
        openai_client.completions.create(model="gen_a", prompt=PROMPT, stream_options={"include_usage": True})
    assert http.post("/v1/chat/completions", content=b"{not json").status_code == 400


def test_n_choices_come_in_one_answer_with_their_usage_summed(client):
    openai_client, _ = client
    greedy = openai_client.completions.create(model="gen_a", prompt=PROMPT, max_tokens=3, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.text for c in greedy.choices} == {ANSWERS["gen_a"]}  # greedy: the same text three times
    assert greedy.usage.prompt_tokens == 6 and greedy.usage.completion_tokens == 9
    sampled = [
        openai_client.chat.completions.create(
            model="gen_b", messages=CHAT, max_tokens=6, n=4, temperature=2.0, seed=11
        ).choices
        for _ in range(2)
    ]
    assert len(sampled[0]) == 4
    assert [c.message.content for c in sampled[0]] == [c.message.content for c in sampled[1]]  # seeded


def test_classification_still_answers_beside_generation(client):
    _, http = client
    answer = http.post("/v1/models/sentiment/predict", json={"texts": ["good fun film"]}).json()
    assert answer["predictions"][0]["prediction"] in ("neg", "pos")


@pytest.mark.parametrize("second", ["gen_b", "sentiment"])
def test_a_request_waits_for_decoding_steps_not_for_a_whole_generation(served, second):
    """A 40-token generation of ``gen_a`` is held at its 5th decoding step until a second request asks:
    another adapter on the same backbone (``gen_b``, 3 tokens) gets the backbone at the next step, the two
    then alternate step by step; the classifier (a backbone of its own: no LM head) never waits at all.
    Both answer long before the generation ends, and the generation's text is the one it gives alone."""
    import threading

    import torch
    from transformers import StoppingCriteria

    generator, other = served[0]["gen_a"], served[0][second]
    group = generator.group
    settings = {"max_new_tokens": 40, "min_new_tokens": 40}
    alone = generator.predict([PROMPT], **settings)
    steps, answered_at = [0], []
    second_asked = threading.Event()

    class CountSteps(StoppingCriteria):  # runs before TakeTurns; holds step 5 until the second request asks
        def __call__(self, input_ids, scores, **kwargs):
            steps[0] += 1
            if steps[0] == 5:
                second_asked.wait(timeout=60)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def generate_counting(prompts, batch_size=32, **kwargs):
        if threading.current_thread() is generation:  # gen_a's steps only
            kwargs["stopping_criteria"].insert(0, CountSteps())
        return type(group.model).generate(group.model, prompts, batch_size, **kwargs)

    def ask():
        other.predict(
            [PROMPT] if second == "gen_b" else ["good fun film"], **({"max_new_tokens": 3} if second == "gen_b" else {})
        )
        answered_at.append(steps[0])

    group.model.generate = generate_counting
    try:
        generated: list[str] = []
        generation = threading.Thread(target=lambda: generated.extend(generator.predict([PROMPT], **settings)))
        generation.start()
        while steps[0] < 5 and generation.is_alive():
            time.sleep(0.001)
        asking = threading.Thread(target=ask)
        asking.start()
        shared = other.group is group
        while shared and not group.lock.waiting() and asking.is_alive():  # it has asked for the backbone
            time.sleep(0.001)
        if not shared:
            asking.join(timeout=60)  # answered while the generation holds its own backbone at step 5
        second_asked.set()
        asking.join(timeout=60)
        generation.join(timeout=60)
    finally:
        del group.model.generate
    assert generated == alone  # adapter, head and padding side put back after each turn
    if second == "gen_b":
        assert answered_at[0] <= 5 + 3  # its 3 steps alternate with the generation's, then it answers
        assert group.turns_taken > 0
    else:
        assert answered_at == [5]


def test_a_seeded_sample_is_the_same_whatever_runs_between_its_steps(served):
    import threading

    seeded, other = served[0]["gen_b"], served[0]["gen_a"]
    settings = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5}
    alone = seeded.predict([PROMPT], seed=7, **settings)
    sampled: list[str] = []
    threads = [
        threading.Thread(target=lambda: sampled.extend(seeded.predict([PROMPT], seed=7, **settings))),
        threading.Thread(target=lambda: other.predict([PROMPT], **settings)),  # unseeded, drawing meanwhile
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sampled == alone
