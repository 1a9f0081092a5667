"""The OpenAPI request bodies of the OpenAI and vLLM endpoints (the endpoints read raw JSON, to answer OpenAI's own
400s, so FastAPI cannot derive these): what clients and fuzzers read at ``/openapi.json``. ``model`` lists the
artifacts each route serves."""

from __future__ import annotations

from typing import Any

from adapters.serving.backbones import Served
from adapters.serving.openai_requests import MAX_CHOICES, ROLES, SEED_RANGE
from adapters.serving.sampling import MAX_LOGPROBS

NUMBER = {"type": "number"}
GENERATIVE = "generative"
CLASSIFIERS = "classifiers"
EVERY = "every"


class ModelNames:
    """The lists of served names the schemas' ``model`` enums hold, kept current as adapters are loaded and
    unloaded at run time (``refresh``): each list is shared by the schemas that name it."""

    def __init__(self, served: dict[str, Served]):
        self.served = served
        self.lists: dict[str, list[str]] = {GENERATIVE: [], CLASSIFIERS: [], EVERY: []}
        self.refresh()

    def refresh(self) -> None:
        generative = sorted(n for n, m in self.served.items() if m.head_spec.lm_logits)
        self.lists[GENERATIVE][:] = generative
        self.lists[CLASSIFIERS][:] = sorted(set(self.served) - set(generative))
        self.lists[EVERY][:] = sorted(self.served)

    def field(self, which: str) -> dict[str, Any]:
        names = self.lists[which]
        return {"type": "string", "enum": names} if names else {"type": "string"}


INTEGER = {"type": "integer"}
TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}


def _sampling(model: dict[str, Any]) -> dict[str, Any]:
    """The settings both completion endpoints take."""
    return {
        "model": model,
        "max_tokens": {**INTEGER, "minimum": 1},
        "temperature": {**NUMBER, "minimum": 0, "maximum": 2},
        "top_p": {**NUMBER, "exclusiveMinimum": 0, "maximum": 1},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        "seed": {**INTEGER, "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]},
        "n": {**INTEGER, "minimum": 1, "maximum": MAX_CHOICES},
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}},
            "additionalProperties": False,
        },
        "user": {"type": "string"},
        "presence_penalty": {**NUMBER, "minimum": -2, "maximum": 2},
        "frequency_penalty": {**NUMBER, "minimum": -2, "maximum": 2},
        "logit_bias": {"type": "object", "additionalProperties": {**NUMBER, "minimum": -100, "maximum": 100}},
        "top_k": {**INTEGER, "minimum": -1},
        "min_p": {**NUMBER, "minimum": 0, "maximum": 1},
        "repetition_penalty": {**NUMBER, "minimum": 0.01, "maximum": 100},
        "min_tokens": {**INTEGER, "minimum": 0},
        "ignore_eos": {"type": "boolean"},
        "stop_token_ids": {"type": "array", "items": {**INTEGER, "minimum": 0}},
    }


def _body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "required": required, "properties": properties, "additionalProperties": False}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}


def _message() -> dict[str, Any]:
    part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    }
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}
    role = {"type": "string", "enum": list(ROLES)}
    return {"type": "object", "required": ["role", "content"], "properties": {"role": role, "content": content}}


def openai_schemas(names: ModelNames) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bodies of ``/v1/chat/completions`` and ``/v1/completions``; ``model`` lists only the generative
    artifacts (a classifier is a 400 there: ``/classify`` and ``predict`` serve it)."""
    chat = {
        **_sampling(names.field(GENERATIVE)),
        "messages": {"type": "array", "minItems": 1, "items": _message()},
        "max_completion_tokens": {**INTEGER, "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {**INTEGER, "minimum": 0, "maximum": MAX_LOGPROBS},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}},
        },
    }
    prompt = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            TOKEN_IDS,
            {"type": "array", "minItems": 1, "items": TOKEN_IDS},
        ]
    }
    text = {
        **_sampling(names.field(GENERATIVE)),
        "prompt": prompt,
        "echo": {"type": "boolean"},
        "logprobs": {"anyOf": [{**INTEGER, "minimum": 0, "maximum": MAX_LOGPROBS}, {"type": "null"}]},
        "suffix": {"type": "null"},
        "best_of": {**INTEGER, "minimum": 1, "maximum": MAX_CHOICES},
    }
    return _body(["model", "messages"], chat), _body(["model", "prompt"], text)


def vllm_schemas(names: ModelNames) -> dict[str, dict[str, Any]]:
    """The bodies of vLLM's ``/tokenize``, ``/detokenize`` and ``/classify``."""
    model = names.field(EVERY)
    text_or_texts = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]}
    return {
        "tokenize": _body(
            ["model"],
            {
                "model": model,
                "prompt": {"type": "string"},
                "messages": {"type": "array", "minItems": 1, "items": _message()},
                "add_special_tokens": {"type": "boolean"},
                "add_generation_prompt": {"type": "boolean"},
                "return_token_strs": {"type": "boolean"},
            },
        ),
        "detokenize": _body(["model", "tokens"], {"model": model, "tokens": {"type": "array", "items": INTEGER}}),
        "classify": _body(
            ["model", "input"],
            {
                "model": names.field(CLASSIFIERS),
                "input": text_or_texts,
                "user": {"type": "string"},
            },
        ),
    }
