"""`qadapters serve` over real HTTP on localhost: four artifacts on one tiny base, answers equal to each
artifact's own `predict`, 4xx JSON for bad requests, micro-batched concurrency, SIGTERM drains."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import adapters

from .helpers import toy_sentiment

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TEXTS = ["good fun film", "a dull and tedious mess", "the acting was not very good", "moving"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _start(artifacts: dict, *options: str, wait: float = 120) -> tuple[int, subprocess.Popen]:
    """``qadapters serve NAME=PATH ... OPTIONS`` on a free port, once its /health answers."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapters",
            "serve",
            *[f"{n}={p}" for n, p in artifacts.items()],
            "--port",
            str(port),
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            if _call(port, "/health")[0] == 200:
                return port, process
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
        if process.poll() is not None:
            pytest.fail(process.stdout.read())
    process.kill()
    pytest.fail(f"the server did not answer /health within {wait} s")


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    kinds = {
        "lora": (adapters.LoRA(r=4), ["neg", "pos"]),
        "lora3": (adapters.LoRA(r=2, alpha=8), ["neg", "pos", "meh"]),
        "bottleneck": (adapters.Bottleneck(bottleneck_dim=8), ["neg", "pos"]),
        "head": (None, ["neg", "pos"]),
    }
    rows = toy_sentiment(32)
    for i, (name, (adapter, labels)) in enumerate(kinds.items()):
        model = adapters.adapt(tiny_llama, adapter=adapter, head=adapters.Classification(labels=labels), seed=i)
        adapters.train(
            model, rows, None, adapters.TrainConfig(max_steps=3, lr=1e-2, batch_size=8, seed=i, progress=False)
        )
        model.save_pretrained(root / name)
    return {name: root / name for name in kinds}


@pytest.fixture(scope="module")
def server(artifacts):
    port, process = _start(artifacts, "--max-wait-ms", "20")
    yield port, process
    if process.poll() is None:
        process.terminate()
        process.wait(30)


def test_each_artifact_answers_as_its_own_predict(server, artifacts):
    port, _ = server
    status, listed = _call(port, "/v1/models")
    assert status == 200 and [m["name"] for m in listed["models"]] == list(artifacts)
    assert {m["base_group"] for m in listed["models"]} == {0}  # four artifacts, one base in memory
    for name, path in artifacts.items():
        status, answer = _call(port, f"/v1/models/{name}/predict", {"texts": TEXTS})
        expected = adapters.load(path).predict(TEXTS, probabilities=True)
        assert status == 200 and answer["model"] == name
        for got, (label, probs) in zip(answer["predictions"], expected, strict=False):
            assert got["prediction"] == label
            assert got["probabilities"] == pytest.approx(probs, abs=1e-5)


def test_bad_requests_get_json_errors_and_the_server_lives_on(server):
    port, process = server
    cases = [
        ("/v1/models/nope/predict", {"texts": ["x"]}, 404, "no model 'nope'"),
        ("/v1/models/lora/predict", {"texts": []}, 422, "at least 1"),
        ("/v1/models/lora/predict", {"text": ["x"]}, 422, "texts"),
        ("/v1/models/lora/predict", {"texts": "not a list"}, 422, "list"),
        ("/v1/models/lora/predict", {"texts": ["x"] * 300}, 413, "at most 256"),
        ("/v1/models/lora/predict", {"texts": ["x" * 30_000]}, 413, "at most 20000"),
        ("/v1/models/lora/predict", {"texts": [{"context": "x"}]}, 400, ""),
        # a field the API does not know is named, never dropped; generation settings on a classifier are refused
        ("/v1/models/lora/predict", {"texts": ["x"], "max_new_token": 5}, 422, "max_new_token"),
        ("/v1/models/lora/predict", {"texts": ["x"], "max_new_tokens": 5}, 400, "max_new_tokens"),
        ("/v1/models/lora/predict", {"texts": ["x"], "temperature": -1}, 422, "temperature"),
    ]
    for path, body, code, match in cases:
        status, answer = _call(port, path, body)
        assert status == code and match in json.dumps(answer), (path, body, answer)
    status, answer = _call(port, "/v1/models/lora/predict", raw=b"{not json")
    assert status == 422 and "json" in json.dumps(answer).lower()
    assert _call(port, "/health") == (200, {"status": "ok", "models": 4}) and process.poll() is None


def test_concurrent_requests_are_batched_and_each_gets_its_answer(server, artifacts):
    port, _ = server
    expected = {n: adapters.load(p).predict(TEXTS) for n, p in artifacts.items()}
    results, errors = [], []

    def ask(i):
        name = list(artifacts)[i % 4]
        texts = TEXTS[i % 4 :] + TEXTS[: i % 4]
        try:
            status, answer = _call(port, f"/v1/models/{name}/predict", {"texts": texts, "probabilities": False})
            results.append((name, texts, status, [p["prediction"] for p in answer["predictions"]]))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 24
    for name, texts, status, predictions in results:
        order = {t: e for t, e in zip(TEXTS, expected[name], strict=False)}
        assert status == 200 and predictions == [order[t] for t in texts]


def test_sigterm_answers_the_requests_in_flight_then_exits(artifacts):
    port, process = _start({"lora": artifacts["lora"]}, "--max-wait-ms", "1500")
    answers = []
    asker = threading.Thread(target=lambda: answers.append(_call(port, "/v1/models/lora/predict", {"texts": TEXTS})))
    asker.start()
    time.sleep(0.5)  # the request waits in its batch (1.5 s) when the signal comes
    process.send_signal(signal.SIGTERM)
    asker.join(60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status says SIGTERM
    assert process.wait(60) in (0, -signal.SIGTERM)
    log = process.stdout.read()
    assert "Application shutdown complete" in log
    assert answers and answers[0][0] == 200 and len(answers[0][1]["predictions"]) == len(TEXTS)


def test_artifact_names(tmp_path):
    from adapters.serving.server import parse_artifacts

    assert parse_artifacts(["runs/a", "b=runs/x"]) == {
        "a": tmp_path.__class__("runs/a"),
        "b": tmp_path.__class__("runs/x"),
    }
    with pytest.raises(adapters.ConfigError, match="used twice"):
        parse_artifacts(["runs/a", "a=runs/b"])


@pytest.mark.slow  # the packaged encoder, end to end
def test_two_artifacts_on_the_packaged_encoder_share_it(tmp_path):
    paths = {}
    for i, labels in enumerate((["negative", "positive"], ["sport", "politics", "film"])):
        model = adapters.adapt(
            "minilm-l6", adapter=adapters.LoRA(r=4), seed=i, head=adapters.Classification(labels=labels)
        )
        model.save_pretrained(tmp_path / f"a{i}")
        paths[f"a{i}"] = tmp_path / f"a{i}"
    port, process = _start(paths, wait=300)
    try:
        assert {m["base_group"] for m in _call(port, "/v1/models")[1]["models"]} == {0}
        for name, path in paths.items():
            status, answer = _call(port, f"/v1/models/{name}/predict", {"texts": TEXTS})
            expected = adapters.load(path).predict(TEXTS, probabilities=True)
            assert status == 200
            for got, (label, probs) in zip(answer["predictions"], expected, strict=False):
                assert got["prediction"] == label and got["probabilities"] == pytest.approx(probs, abs=1e-5)
    finally:
        process.terminate()
        process.wait(60)


def test_the_readme_serving_example_answers_with_and_without_a_json_header(server):
    """The README's curl line, run as written (its port and model name swapped for this server's), then
    without its Content-Type header, as a user who drops it would."""
    import re
    import shutil
    from pathlib import Path

    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    port, _ = server
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"^```bash\nqadapters serve sentiment=.*?^```", readme, flags=re.M | re.S).group(0)
    line = next(x for x in block.replace("\\\n", " ").splitlines() if x.startswith("curl "))
    line = line.replace("localhost:8000", f"127.0.0.1:{port}").replace("/sentiment/", "/lora/")
    for command in (line, line.replace("-H 'Content-Type: application/json'", "")):
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        answer = json.loads(done.stdout)
        assert answer["model"] == "lora" and len(answer["predictions"]) == 2, command
