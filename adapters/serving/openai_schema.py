"""The OpenAPI request bodies of the OpenAI and vLLM endpoints (the endpoints read raw JSON, to answer OpenAI's own
400s, so FastAPI cannot derive these): what clients and fuzzers read at ``/openapi.json``. ``model`` lists the
artifacts each route serves."""

from __future__ import annotations

from typing import Any

from adapters.serving.backbones import Served
from adapters.serving.openai_requests import MAX_CHOICES, ROLES, SEED_RANGE
from adapters.serving.sampling import MAX_LOGPROBS

NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}


def _sampling(names: list[str]) -> dict[str, Any]:
    """The settings both completion endpoints take."""
    return {
        "model": {"type": "string", "enum": names} if names else {"type": "string"},
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
        "repetition_penalty": {**NUMBER, "exclusiveMinimum": 0},
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


def openai_schemas(served: dict[str, Served]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bodies of ``/v1/chat/completions`` and ``/v1/completions``; ``model`` lists only the generative
    artifacts (a classifier is a 400 there: ``/classify`` and ``predict`` serve it)."""
    names = sorted(name for name, member in served.items() if member.head_spec.lm_logits)
    chat = {
        **_sampling(names),
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
        **_sampling(names),
        "prompt": prompt,
        "echo": {"type": "boolean"},
        "logprobs": {"anyOf": [{**INTEGER, "minimum": 0, "maximum": MAX_LOGPROBS}, {"type": "null"}]},
        "suffix": {"type": "null"},
        "best_of": {**INTEGER, "minimum": 1, "maximum": MAX_CHOICES},
    }
    return _body(["model", "messages"], chat), _body(["model", "prompt"], text)


def vllm_schemas(served: dict[str, Served]) -> dict[str, dict[str, Any]]:
    """The bodies of vLLM's ``/tokenize``, ``/detokenize`` and ``/classify``."""
    names = sorted(served)
    model = {"type": "string", "enum": names} if names else {"type": "string"}
    classifiers = sorted(name for name, member in served.items() if not member.head_spec.lm_logits)
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
                "model": {"type": "string", "enum": classifiers} if classifiers else {"type": "string"},
                "input": text_or_texts,
                "user": {"type": "string"},
            },
        ),
    }
