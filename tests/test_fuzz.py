"""Fuzzed: schemathesis over the server's own OpenAPI schema (any request the schema allows, and
malformed ones: never a 500, every answer matching the schema), and hypothesis over the file readers
and the YAML run-file loader (any input: rows or a typed error, never a raw traceback)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import adapters  # noqa: E402
from adapters.config.run_file import load_run_config  # noqa: E402
from adapters.data.sources import load_rows  # noqa: E402
from adapters.serving.server import create_app  # noqa: E402

from .test_serve_deploy import StandIn  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app({"m": StandIn()}))
guarded = schemathesis.openapi.from_asgi("/openapi.json", create_app({"m": StandIn()}, api_key="key"))


@schema.parametrize()
@FUZZ
def test_the_server_never_answers_500_and_keeps_to_its_schema(case):
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    response = case.call()
    assert response.status_code < 500, response.text
    # a schema cannot say which served artifacts generate text or have a tokenizer: the stand-in classifier
    # named in a valid body is a 400 by design on OpenAI's and vLLM's endpoints, so "valid data is accepted"
    # is not asked of them
    vllm = ("completions", "tokenize", "detokenize", "classify")
    skip = [positive_data_acceptance] if case.path.endswith(vllm) else []
    case.validate_response(response, excluded_checks=skip)


@guarded.parametrize()
@FUZZ
def test_with_an_api_key_a_request_without_it_is_refused(case):
    """schemathesis' own checks too: a missing or made-up key is a 401, never an answer."""
    response = case.call()
    assert response.status_code < 500, response.text
    case.validate_response(response)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_real_generation_never_answers_500_whatever_the_settings(served, path):
    """Every body the schema allows (any settings, prompts as text or token ids, logprobs, echo, streams) on
    models that do generate (two LoRA adapters and a classifier on a tiny base): a 200, or a 4xx whose
    OpenAI-shaped error names the problem; never a 500."""
    operation = schemathesis.openapi.from_asgi("/openapi.json", create_app(served[0]))[path]["POST"]

    @given(case=operation.as_strategy())
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    def answered(case):
        response = case.call()
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["error"]["message"]

    answered()


@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet"]))
@FUZZ
def test_any_file_is_rows_or_a_data_error(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(content)
    try:
        rows = load_rows(str(path))
    except adapters.DataError:
        return
    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
_sections = st.fixed_dictionaries(
    {},
    optional={
        "model": _yaml_values | st.fixed_dictionaries({"name": st.text(max_size=10)}),
        "adapter": _yaml_values | st.fixed_dictionaries({"kind": st.sampled_from(["lora", "bottleneck", "x"])}),
        "head": _yaml_values | st.fixed_dictionaries({"kind": st.sampled_from(["classification", "y"])}),
        "data": _yaml_values,
        "train": _yaml_values | st.fixed_dictionaries({"lr": _yaml_values, "epochs": _yaml_values}),
        "output": _yaml_values,
    },
)


@given(config=_sections | _yaml_values, raw=st.text(max_size=200))
@FUZZ
def test_any_yaml_run_file_is_a_config_or_a_typed_error(tmp_path_factory, config, raw):
    import yaml

    folder = tmp_path_factory.mktemp("yaml")
    for text in (yaml.safe_dump(config), raw):
        path = folder / "run.yaml"
        path.write_text(text)
        try:
            load_run_config(path)
        except adapters.AdaptersError:
            pass
