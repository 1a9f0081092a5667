"""Artifacts loaded and unloaded while serving, through vLLM's endpoints and bodies: a loaded LoRA answers
as its artifact does alone; an unknown path, another base, a name in use, the limit and unloading an
artifact named at start are clear 4xx; the API key guards them; /metrics shows the generation figures."""

from __future__ import annotations

import shutil

import pytest

import adapters

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from adapters.serving.backbones import load_served  # noqa: E402
from adapters.serving.batcher import Limits  # noqa: E402
from adapters.serving.server import create_app  # noqa: E402

PROMPT = "the plot of the film was"


def _generator(base, seed, path):
    model = adapters.adapt(base, adapter=adapters.LoRA(r=4), head=adapters.CausalLM(max_new_tokens=4), seed=seed)
    rows = [{"text": PROMPT, "label": ["superb", "dull"][seed % 2]}] * 8
    adapters.train(model, rows, None, adapters.TrainConfig(epochs=3, lr=1e-2, batch_size=8, progress=False))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    _generator(tiny_llama, 0, root / "first")
    later = _generator(tiny_llama, 1, root / "later")
    from transformers import AutoModelForCausalLM

    other_base = str(root / "other-base")  # another base: the tiny Llama with other embeddings
    shutil.copytree(tiny_llama, other_base)
    network = AutoModelForCausalLM.from_pretrained(other_base)
    network.model.embed_tokens.weight.data.mul_(2)
    network.save_pretrained(other_base)
    _generator(other_base, 2, root / "foreign")
    served = load_served({"first": root / "first"})
    app = create_app(served, Limits(max_loras=1), api_key="key")
    with TestClient(app) as http:
        yield http, root, later


HEADERS = {"Authorization": "Bearer key"}


def _complete(http, name):
    body = {"model": name, "prompt": PROMPT, "max_tokens": 4}
    return http.post("/v1/completions", json=body, headers=HEADERS)


def test_a_lora_loaded_at_run_time_answers_as_its_artifact_alone(setup):
    http, root, later = setup
    assert _complete(http, "later").status_code == 404
    answer = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "later", "lora_path": str(root / "later")}, headers=HEADERS
    )
    assert answer.status_code == 200 and "added successfully" in answer.text
    text = _complete(http, "later").json()["choices"][0]["text"]
    assert text == later.predict([PROMPT])[0]
    assert "later" in [m["id"] for m in http.get("/v1/models", headers=HEADERS).json()["data"]]
    metrics = http.get("/metrics").text
    assert "qadapters_generated_tokens_total" in metrics and "qadapters_generation_first_token_seconds" in metrics
    assert 'qadapters_queue_inputs{model="later"}' in metrics  # its queue is reported like the others'
    enum = _model_enum(http)
    assert "later" in enum and "first" in enum  # the OpenAPI schema names it
    answer = http.post("/v1/unload_lora_adapter", json={"lora_name": "later"}, headers=HEADERS)
    assert answer.status_code == 200 and "removed successfully" in answer.text
    assert _complete(http, "later").status_code == 404
    assert "later" not in _model_enum(http) and 'qadapters_queue_inputs{model="later"}' not in http.get("/metrics").text
    assert _complete(http, "first").status_code == 200  # the artifact named at start still answers


def _model_enum(http) -> list[str]:
    """The served names the OpenAPI schema offers for ``/v1/completions``' ``model``."""
    schema = http.get("/openapi.json").json()["paths"]["/v1/completions"]["post"]["requestBody"]
    return schema["content"]["application/json"]["schema"]["properties"]["model"]["enum"]


@pytest.mark.parametrize(
    "body,status,says",
    [
        ({"lora_name": "x", "lora_path": "/nowhere/at/all"}, 404, "no artifact at"),
        ({"lora_name": "first", "lora_path": "{root}/later"}, 409, "already served"),
        ({"lora_name": "f", "lora_path": "{root}/foreign"}, 400, "a base this server does not hold"),
        ({"lora_name": "x", "lora_path": "{root}/later", "rank": 3}, 400, "Unrecognized request argument"),
        ({"lora_name": "", "lora_path": "{root}/later"}, 400, "lora_name"),
        ({"lora_name": "x", "lora_path": "{root}"}, 404, "no artifact at"),
    ],
)
def test_a_load_that_cannot_be_done_is_a_clear_4xx(setup, body, status, says):
    http, root, _ = setup
    body = {k: v.format(root=root) if isinstance(v, str) else v for k, v in body.items()}
    answer = http.post("/v1/load_lora_adapter", json=body, headers=HEADERS)
    assert answer.status_code == status and says in answer.json()["error"]["message"], answer.text


def test_the_limit_the_key_and_unloading_what_was_started_with(setup):
    http, root, _ = setup
    assert (
        http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root / "later")}).status_code == 401
    )
    load = {"lora_name": "a", "lora_path": str(root / "later")}
    assert http.post("/v1/load_lora_adapter", json=load, headers=HEADERS).status_code == 200
    again = http.post("/v1/load_lora_adapter", json={**load, "lora_name": "b"}, headers=HEADERS)
    assert again.status_code == 409 and "--max-loras" in again.json()["error"]["message"]
    answer = http.post("/v1/unload_lora_adapter", json={"lora_name": "first"}, headers=HEADERS)
    assert answer.status_code == 409 and "named when the server started" in answer.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "zzz"}, headers=HEADERS).status_code == 404
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=HEADERS).status_code == 200
