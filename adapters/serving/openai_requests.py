"""An OpenAI (and vLLM) completion request, checked and read into one ``Ask`` before anything runs.

What the field's clients send at their defaults is accepted and honoured: ``prompt`` as a string, a list of
strings, a list of token ids or a list of such lists (lm-eval sends token ids); ``echo`` with ``logprobs`` (lm-eval's
loglikelihood: ``max_tokens`` 1 or 0); message ``content`` as a string or a list of text parts (guidellm);
``stream_options``; OpenAI's penalties, ``logit_bias``, ``logprobs``/``top_logprobs``, ``response_format``; vLLM's
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``. A field outside
these is a 400 naming it, as OpenAI answers; so is a value out of its range, or ``suffix`` (not served).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adapters.errors import ConfigError
from adapters.serving.backbones import Served
from adapters.serving.sampling import MAX_LOGPROBS, Sampling

SAMPLING_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user",
    "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens",
    "ignore_eos", "stop_token_ids",
}  # fmt: skip
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "logprobs", "suffix", "best_of"}
MAX_CHOICES = 16  # n: choices of one prompt
MAX_ROWS = 64  # prompts x n in one request: each is a row of the batch
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts: a seed outside is a 400, not a 500
ROLES = ("system", "developer", "user", "assistant", "tool")
RANGES = {
    "temperature": (0.0, 2.0, "[0, 2]"),
    "top_p": (0.0, 1.0, "(0, 1]"),
    "min_p": (0.0, 1.0, "[0, 1]"),
    "presence_penalty": (-2.0, 2.0, "[-2, 2]"),
    "frequency_penalty": (-2.0, 2.0, "[-2, 2]"),
    "repetition_penalty": (0.01, 100.0, "[0.01, 100]"),
}  # fmt: skip  (OpenAI's ranges; vLLM's takes any positive repetition_penalty, but dividing logits by a
#  subnormal one overflows them to inf and NaN)
OPEN_BELOW = {"top_p"}  # ranges whose lower end is excluded


class OpenAIError(Exception):
    """A request OpenAI's API would refuse: answered with its status and ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}}


@dataclass
class Ask:
    """One checked request: its artifact, its prompts as token ids and every choice's settings."""

    member: Served
    chat: bool
    prompts: list[list[int]]
    texts: list[str | None]  # each prompt as sent, when it was a string (what ``echo`` repeats)
    n: int
    max_new_tokens: int
    sampling: Sampling
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    response_format: dict[str, Any] | None = None  # {"schema": ...} to follow, or None

    def rows(self) -> list[tuple[int, int, int]]:
        """``(choice index, prompt index, choice of that prompt)`` for every row, indexed as OpenAI does."""
        return [(p * self.n + i, p, i) for p in range(len(self.prompts)) for i in range(self.n)]


def read(body: Any, chat: bool, served: dict[str, Served], max_chars: int) -> Ask:
    """``body`` of ``/v1/chat/completions`` (``chat``) or ``/v1/completions``, checked (``OpenAIError``)."""
    required = "messages" if chat else "prompt"
    check_object(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if required not in body:
        raise OpenAIError(400, f"Missing required parameter: {required!r}", required)
    member = _member(body, served)
    check_bounds(body)
    _check_refused(body)
    tokenizer = member.group.model.tokenizer
    if chat:
        messages = chat_messages(body, max_chars)
        prompts, texts = [prompt_ids(member, messages)], list[str | None]([None])
    else:
        prompts, texts = _text_prompts(body, member, max_chars)
    n = body.get("n", 1) if body.get("n") is not None else 1
    if n * len(prompts) > MAX_ROWS:
        raise OpenAIError(400, f"{len(prompts)} prompts x n={n} is over {MAX_ROWS} choices in one request", "n")
    new = body.get("max_completion_tokens", body.get("max_tokens"))
    new = member.head_spec.generation_defaults()["max_new_tokens"] if new is None else new
    echo = bool(body.get("echo"))
    if new == 0 and not echo:
        raise OpenAIError(400, "max_tokens 0 asks for nothing: it is only for echo with logprobs", "max_tokens")
    for ids in prompts:
        check_context(member, len(ids), new, "messages" if chat else "prompt")
    options = body.get("stream_options") or {}
    return Ask(
        member, chat, prompts, texts, n, new, sampling(body, tokenizer, vocabulary_size(member)), body.get("seed"),
        _stops(body), bool(body.get("stream")), bool(options.get("include_usage")),
        bool(options.get("continuous_usage_stats")), echo, _response_format(body),
    )  # fmt: skip


def check_object(body: Any, fields: set[str]) -> dict[str, Any]:
    """``body`` as a JSON object with no field beyond ``fields``, else a 400 naming the first unknown one."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    return body


def _member(body: dict[str, Any], served: dict[str, Served]) -> Served:
    name = body.get("model")
    if not isinstance(name, str):
        raise OpenAIError(400, "model must be the name of a served artifact (a string)", "model")
    if name not in served:
        raise OpenAIError(404, f"The model {name!r} does not exist; served: {sorted(served)}", "model")
    if not served[name].head_spec.lm_logits:
        raise OpenAIError(
            400,
            f"{name!r} is a {served[name].head_spec.kind} model: it classifies, it does not complete text; "
            f"use POST /v1/models/{name}/predict or /classify",
            "model",
        )
    return served[name]


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_bounds(body: dict[str, Any]) -> None:
    """Every numeric and boolean setting within what OpenAI (and vLLM) accept, else a 400 naming it: a value
    out of range never reaches the model (a seed past 64 bits was a 500, an infinite temperature ran)."""
    lowest = 0 if body.get("echo") else 1  # echo with max_tokens 0: the prompt's logprobs only
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None and not (_integer(body[key]) and body[key] >= lowest):
            raise OpenAIError(400, f"{key} must be an integer >= {lowest}, got {body[key]!r}", key)
    for key, (low, high, shown) in RANGES.items():
        value = body.get(key)
        if value is None:
            continue
        if not _number(value) or not low <= value <= high or (key in OPEN_BELOW and value == low):
            raise OpenAIError(400, f"{key} must be a number in {shown}, got {value!r}", key)
    seed = body.get("seed")
    if seed is not None and not (_integer(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise OpenAIError(400, f"seed must be an integer from -2**63 to 2**64 - 1, got {seed!r}", "seed")
    _check_integers(body)
    for key in ("stream", "echo", "ignore_eos"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise OpenAIError(400, f"{key} must be true or false, got {body[key]!r}", key)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise OpenAIError(400, "user must be a string", "user")


def _check_integers(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and not (_integer(n) and 1 <= n <= MAX_CHOICES):
        raise OpenAIError(400, f"n must be an integer from 1 to {MAX_CHOICES}", "n")
    top_k = body.get("top_k")
    if top_k is not None and not (_integer(top_k) and (top_k >= 1 or top_k in (0, -1))):
        raise OpenAIError(400, f"top_k must be -1 or 0 (all tokens) or a positive integer, got {top_k!r}", "top_k")
    min_tokens = body.get("min_tokens")
    if min_tokens is not None and not (_integer(min_tokens) and min_tokens >= 0):
        raise OpenAIError(400, f"min_tokens must be an integer >= 0, got {min_tokens!r}", "min_tokens")
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if "messages" in body:  # chat: logprobs is a switch, top_logprobs the count
        if logprobs is not None and not isinstance(logprobs, bool):
            raise OpenAIError(400, f"logprobs must be true or false, got {logprobs!r}", "logprobs")
        if top is not None and not (_integer(top) and 0 <= top <= MAX_LOGPROBS):
            raise OpenAIError(400, f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}", "top_logprobs")
        if top is not None and not logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    elif logprobs is not None and not (_integer(logprobs) and 0 <= logprobs <= MAX_LOGPROBS):
        raise OpenAIError(400, f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r}", "logprobs")


def _check_refused(body: dict[str, Any]) -> None:
    """Fields accepted by name but not served (a 400 saying so, not a silent drop)."""
    if body.get("suffix") not in (None, ""):
        raise OpenAIError(400, "suffix (text after the insertion point) is not supported by this server", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise OpenAIError(400, "best_of other than n is not supported: ask for n choices and pick", "best_of")
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise OpenAIError(400, "stream_options can only be given with stream: true", "stream_options")
        allowed = {"include_usage", "continuous_usage_stats"}
        if not isinstance(options, dict) or set(options) - allowed:
            raise OpenAIError(400, f"stream_options takes {sorted(allowed)}", "stream_options")


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise OpenAIError(400, "stop must be a string or a list of strings", "stop")
    return [s for s in stop or [] if s]


def sampling(body: dict[str, Any], tokenizer: Any, vocabulary: int) -> Sampling:
    """The row settings of ``body`` (``sampling.py``)."""
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_integer(t) and 0 <= t < vocabulary for t in stop_ids):
        raise OpenAIError(400, f"stop_token_ids must be token ids from 0 to {vocabulary - 1}", "stop_token_ids")
    logprobs = body.get("logprobs")
    if "messages" in body:
        logprobs = (body.get("top_logprobs") or 0) if logprobs else None
    echo = bool(body.get("echo"))
    top_k = body.get("top_k")
    return Sampling(  # floats as floats: transformers' processors refuse an int (a JSON 2 for 2.0)
        temperature=_float(body.get("temperature")),
        top_p=_float(body.get("top_p")),
        top_k=top_k if top_k and top_k > 0 else None,
        min_p=_float(body.get("min_p")) or None,
        presence_penalty=float(body.get("presence_penalty") or 0.0),
        frequency_penalty=float(body.get("frequency_penalty") or 0.0),
        repetition_penalty=float(body.get("repetition_penalty") or 1.0),
        min_tokens=body.get("min_tokens") or 0,
        ignore_eos=bool(body.get("ignore_eos")),
        stop_token_ids=tuple(stop_ids),
        logit_bias=_logit_bias(body.get("logit_bias"), vocabulary),
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _logit_bias(bias: Any, vocabulary: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: ``{"token id": bias in [-100, 100]}``."""
    if bias is None:
        return ()
    ok = isinstance(bias, dict) and all(
        isinstance(k, str) and k.isdigit() and int(k) < vocabulary and _number(v) and -100 <= v <= 100
        for k, v in bias.items()
    )
    if not ok:
        raise OpenAIError(400, f"logit_bias maps token ids (0 to {vocabulary - 1}) to numbers in [-100, 100]")
    return tuple((int(k), float(v)) for k, v in bias.items())


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """``{"schema": ...}`` the answer must follow (``{}`` for any JSON object), or None for free text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    asked = fmt.get("type") if isinstance(fmt, dict) else None
    if asked == "text":
        return None
    if asked == "json_object":
        return {"schema": {"type": "object"}}
    if asked == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise OpenAIError(400, "json_schema response_format needs json_schema.schema, an object", "response_format")
        return {"schema": schema}
    raise OpenAIError(400, "response_format type must be text, json_object or json_schema", "response_format")


def vocabulary_size(member: Served) -> int:
    """The model's vocabulary (its logits' width): token ids from 0 to this, exclusive."""
    config = getattr(member.group.model.backbone, "config", None)
    return getattr(config, "vocab_size", None) or len(member.group.model.tokenizer)


def chat_messages(body: dict[str, Any], max_chars: int) -> list[dict[str, str]]:
    """The chat as ``{role, content}`` with string contents (text parts joined by newlines, as vLLM does)."""
    messages = body["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise OpenAIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    unknown = sorted({str(m.get("role")) for m in messages} - set(ROLES))
    if unknown:
        raise OpenAIError(400, f"unknown message role(s) {unknown}; roles are {list(ROLES)}", "messages")
    chat = [{"role": m["role"], "content": _content(m.get("content"))} for m in messages]
    _check_chars(sum(len(m["content"]) for m in chat), max_chars, "messages")
    return chat


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise OpenAIError(400, "a message's content must be a string or a list of content parts", "messages")
    other = sorted({str(p.get("type")) for p in content} - {"text"})
    if other:
        raise OpenAIError(400, f"content parts of type {other} are not supported: this model reads text", "messages")
    if not all(isinstance(p.get("text"), str) for p in content):
        raise OpenAIError(400, "a text content part needs its text (a string)", "messages")
    return "\n".join(p["text"] for p in content)


def _check_chars(chars: int, max_chars: int, field: str) -> None:
    if chars > max_chars:
        raise OpenAIError(400, f"{field} holds {chars} characters; this server takes at most {max_chars}", field)


def _text_prompts(body: dict[str, Any], member: Served, max_chars: int) -> tuple[list[list[int]], list[str | None]]:
    """``prompt`` as a string, strings, token ids or lists of token ids: each prompt's ids, and its text."""
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise OpenAIError(400, "prompt must be a string, a list of strings or a list of token-id lists", "prompt")
    if all(_integer(t) for t in prompt):
        prompt = [prompt]  # one prompt as token ids
    vocabulary = vocabulary_size(member)
    if all(isinstance(p, str) for p in prompt):
        if not all(p for p in prompt):
            raise OpenAIError(400, "a prompt must not be empty", "prompt")
        _check_chars(sum(len(p) for p in prompt), max_chars, "prompt")
        return [prompt_ids(member, p) for p in prompt], list(prompt)
    if all(isinstance(p, list) and p and all(_integer(t) and 0 <= t < vocabulary for t in p) for p in prompt):
        return [list(p) for p in prompt], [None] * len(prompt)
    raise OpenAIError(
        400,
        f"prompt must be a non-empty string, a list of them, a list of token ids (0 to {vocabulary - 1}) "
        "or a list of such lists",
        "prompt",
    )


def prompt_ids(member: Served, prompt: Any) -> list[int]:
    """The token ids of ``prompt`` (a text or a chat) as ``member``'s head renders it (its chat template, its
    max_length), read without the backbone's lock: the event loop never waits for a decoding step."""
    from adapters.data.encoding import encode_rows

    rows = member.head_spec.input_rows([prompt])
    tokenizer = member.group.model.tokenizer
    columns, _ = encode_rows(rows, tokenizer, member.head_spec, "text", None, member.max_length, "inputs")
    return list(columns["input_ids"][0])


def context_length(member: Served) -> int:
    model = member.group.model
    config = getattr(model.backbone, "config", None)
    return getattr(config, "max_position_embeddings", None) or model.tokenizer.model_max_length


def check_context(member: Served, tokens: int, new: int, field: str) -> None:
    """The prompt's tokens plus ``max_tokens`` within the model's context, else a 400 naming the limit (vLLM's
    wording)."""
    context = context_length(member)
    if tokens + new > context:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {tokens + new} "
            f"tokens ({tokens} in the prompt, {new} in the completion). Please reduce the length of the prompt "
            f"or max_tokens.",
            "max_tokens" if tokens < context else field,
        )


def checked_generation(ask: Ask) -> None:
    """Generation settings the head refuses, as a 400, before anything runs."""
    try:
        ask.member.head_spec.check_generation(ask.member.group.model, {"max_new_tokens": max(ask.max_new_tokens, 1)})
    except ConfigError as err:
        raise OpenAIError(400, str(err)) from None
