"""The server for real deployments, in-process with a stand-in model (no weights): a body read as JSON
whatever its content type, an API key, Prometheus metrics, a bounded queue answering 503 with
Retry-After, a request timeout answering 504, and no listening beyond this machine without a key."""

from __future__ import annotations

import threading
import time

import pytest

import adapters

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from adapters.serving.batcher import Limits  # noqa: E402
from adapters.serving.server import check_exposure, create_app  # noqa: E402


class StandIn:
    """What the server asks of a served model: a name, predict, describe. ``delay`` seconds per batch."""

    head_spec = type("Head", (), {"lm_logits": False, "kind": "classification"})()

    def __init__(self, name: str = "m", delay: float = 0.0):
        self.name, self.delay = name, delay
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, inputs: list, probabilities: bool, **settings) -> list:
        self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append(len(inputs))
        return [("pos", {"neg": 0.25, "pos": 0.75}) if probabilities else "pos" for _ in inputs]

    def describe(self) -> dict:
        return {"name": self.name}


def _client(model: StandIn, **kwargs) -> TestClient:
    return TestClient(create_app({model.name: model}, **kwargs))


def test_a_body_is_json_whatever_its_content_type_says():
    with _client(StandIn()) as client:
        body = '{"texts": ["a moving film"]}'
        for headers in (
            {},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "application/json"},
        ):
            answer = client.post("/v1/models/m/predict", content=body, headers=headers)
            assert answer.status_code == 200, (headers, answer.text)
            assert answer.json()["predictions"][0]["prediction"] == "pos"


def test_the_api_key_guards_v1_and_not_health_or_metrics():
    with _client(StandIn(), api_key="s3cret") as client:
        body = {"texts": ["x"]}
        assert client.post("/v1/models/m/predict", json=body).status_code == 401
        wrong = client.post("/v1/models/m/predict", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        # in OpenAI's shape too, so that its clients show the message (and FastAPI's, for curl users)
        error = wrong.json()["error"]
        assert error["type"] == "authentication_error" and "API key" in error["message"] == wrong.json()["detail"]
        assert client.get("/v1/models").status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/models/m/predict", json=body, headers=right).status_code == 200
        assert client.get("/v1/models", headers=right).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_listening_beyond_this_machine_needs_a_key_or_insecure():
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "key", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(adapters.ConfigError, match="--api-key.*--insecure"):
        check_exposure("0.0.0.0", None, False)


def test_metrics_count_requests_latency_batches_and_queue():
    with _client(StandIn()) as client:
        for _ in range(3):
            client.post("/v1/models/m/predict", json={"texts": ["a", "b"]})
        client.post("/v1/models/nope/predict", json={"texts": ["a"]})
        text = client.get("/metrics").text
    assert 'qadapters_requests_total{model="m",status="200"} 3.0' in text
    assert 'qadapters_request_seconds_count{model="m"} 3.0' in text
    assert 'qadapters_batch_inputs_sum{model="m"} 6.0' in text
    assert 'qadapters_queue_inputs{model="m"} 0.0' in text


def test_a_full_queue_answers_503_with_retry_after_and_admitted_requests_are_answered():
    model = StandIn()
    model.gate.clear()  # the first batch blocks until released: the queue fills behind it
    results: list = []
    with _client(model, limits=Limits(max_batch=1, max_wait_ms=0, max_queue=2)) as client:

        def call():
            results.append(client.post("/v1/models/m/predict", json={"texts": ["x"]}))

        first = threading.Thread(target=call)
        first.start()
        time.sleep(0.3)  # taken into a batch, blocked in predict
        waiting = [threading.Thread(target=call) for _ in range(2)]
        for t in waiting:
            t.start()
        time.sleep(0.3)  # both queued: the queue is full
        refused = client.post("/v1/models/m/predict", json={"texts": ["x"]})
        model.gate.set()
        for t in [first, *waiting]:
            t.join(10)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "at most 2" in refused.json()["detail"]
    assert sorted(r.status_code for r in results) == [200, 200, 200]


def test_a_request_past_the_timeout_answers_504_and_is_not_run():
    model = StandIn()
    model.gate.clear()
    with _client(model, limits=Limits(max_batch=1, max_wait_ms=0, timeout_s=0.3)) as client:
        blocked = threading.Thread(target=lambda: client.post("/v1/models/m/predict", json={"texts": ["first"]}))
        blocked.start()
        time.sleep(0.1)
        late = client.post("/v1/models/m/predict", json={"texts": ["second"]})
        model.gate.set()
        blocked.join(10)
        time.sleep(0.2)
    assert late.status_code == 504 and "0.3 s" in late.json()["detail"]
    assert model.batches == [1]  # the timed-out request was dropped, not computed
