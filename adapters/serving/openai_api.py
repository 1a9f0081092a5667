"""OpenAI-compatible endpoints for the served artifacts whose head generates text (``CausalLM``), so the
clients users already have (the ``openai`` package, anything that speaks its API) talk to an adapter:

* ``POST /v1/chat/completions``: ``model`` names a served artifact, ``messages`` a chat (rendered with
  the base's chat template); ``POST /v1/completions``: a ``prompt``.
* the usual settings: ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``n`` (up to 16 choices,
  generated as one batch; not with streaming);
  ``stream: true`` answers with server-sent events, one chunk per piece of text as it is generated,
  ending in ``data: [DONE]``; ``usage`` counts the prompt's and the completion's tokens.
* As OpenAI's API does, an argument it does not know is a 400 naming it; asking a classification
  artifact for a completion is a 400 saying so.

Every completion (streamed or whole, each of its ``n`` choices) is a row of its backbone's continuous
batch (``scheduler.py``): all running rows, whatever their artifact, decode in one forward per step, each
with its own temperature, top_p and seeded generator, so a seed gives the same text whatever else runs.
A row whose stop sequence appeared, or whose client went away, is freed at the next step.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from adapters.errors import ConfigError
from adapters.serving.backbones import Served
from adapters.serving.scheduler import Scheduler, Sequence

CHAT_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "user",
}
MAX_CHOICES = 16  # n: choices of one request, generated together as one batch
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts: a seed outside is a 400, not a 500
ROLES = ("system", "developer", "user", "assistant", "tool")
Pieces = asyncio.Queue[tuple[str | None, str | None]]  # a generation's text: (piece, None)..., (None, finish)
GREEDY_BELOW = 1e-5  # a temperature under this samples greedily (vLLM's _SAMPLING_EPS)
RANGES = {"temperature": (0.0, 2.0, "[0, 2]"), "top_p": (0.0, 1.0, "(0, 1]")}  # OpenAI's
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "user"}


class OpenAIError(Exception):
    """A request OpenAI's API would refuse: answered with its status and ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}}


def parse(body: Any, fields: set[str], input_field: str, served: dict[str, Served]) -> tuple[Served, dict[str, Any]]:
    """The artifact asked for and the request's settings, checked as OpenAI checks them (400s)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    name = body.get("model")
    if not isinstance(name, str):
        raise OpenAIError(400, "model must be the name of a served artifact (a string)", "model")
    if name not in served:
        raise OpenAIError(404, f"The model {name!r} does not exist; served: {sorted(served)}", "model")
    if not served[name].head_spec.lm_logits:
        raise OpenAIError(
            400,
            f"{name!r} is a {served[name].head_spec.kind} model: it classifies, it does not complete text; "
            f"use POST /v1/models/{name}/predict",
            "model",
        )
    if input_field not in body:
        raise OpenAIError(400, f"Missing required parameter: {input_field!r}", input_field)
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise OpenAIError(400, f"n must be an integer from 1 to {MAX_CHOICES}", "n")
    if n > 1 and body.get("stream"):
        raise OpenAIError(400, "n > 1 is answered whole: ask without stream, or n=1 to stream", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise OpenAIError(400, "stop must be a string or a list of non-empty strings", "stop")
    check_bounds(body)
    request = {"stop": stop or [], "stream": bool(body.get("stream", False)), "seed": body.get("seed"), "n": n}
    given = {
        "max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
    }
    settings: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if "temperature" in settings and settings["temperature"] < GREEDY_BELOW:  # OpenAI's greedy, and vLLM's
        del settings["temperature"]  # below 1e-5 (dividing by a subnormal temperature overflows to NaN)
    if "temperature" in settings or "top_p" in settings:
        settings["do_sample"] = True
    return served[name], {**request, "settings": settings}


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_bounds(body: dict[str, Any]) -> None:
    """Every numeric and boolean setting within what OpenAI (and vLLM) accept, else a 400 naming it: a value
    out of range never reaches the model (a seed past 64 bits was a 500, an infinite temperature ran)."""
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None and not (_integer(body[key]) and body[key] >= 1):
            raise OpenAIError(400, f"{key} must be a positive integer, got {body[key]!r}", key)
    for key, (low, high, shown) in RANGES.items():
        value = body.get(key)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not low <= value <= high or (key == "top_p" and value == 0):
            raise OpenAIError(400, f"{key} must be a number in {shown}, got {value!r}", key)
    seed = body.get("seed")
    if seed is not None and not (_integer(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise OpenAIError(400, f"seed must be an integer from -2**63 to 2**64 - 1, got {seed!r}", "seed")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise OpenAIError(400, f"stream must be true or false, got {body['stream']!r}", "stream")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise OpenAIError(400, "user must be a string", "user")


def check_context(member: Served, prompt: Any, settings: dict[str, Any]) -> None:
    """The prompt's tokens plus ``max_tokens`` within the model's context, else a 400 naming the limit (vLLM's
    wording)."""
    model = member.group.model
    config = getattr(model.backbone, "config", None)
    context = getattr(config, "max_position_embeddings", None) or model.tokenizer.model_max_length
    tokenizer = model.tokenizer
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        tokens = len(tokenizer(prompt)["input_ids"])
    new = settings.get("max_new_tokens", member.head_spec.generation_defaults()["max_new_tokens"])
    if tokens + new > context:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {tokens + new} "
            f"tokens ({tokens} in the prompt, {new} in the completion). Please reduce the length of the prompt "
            f"or max_tokens.",
            "max_tokens" if tokens < context else ("messages" if isinstance(prompt, list) else "prompt"),
        )


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, and whether one was found."""
    ends = [text.index(s) for s in stop if s in text]
    return (text[: min(ends)], True) if ends else (text, False)


def _usage(member: Served, prompt: Any, completion: str) -> dict[str, int]:
    model = member.group.model
    prompt_tokens = int(model.encode([prompt])["attention_mask"].sum())
    completion_tokens = len(model.tokenizer(completion, add_special_tokens=False)["input_ids"])
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish(member: Served, completion: str, stopped: bool, settings: dict[str, Any]) -> str:
    if stopped:
        return "stop"
    limit = settings.get("max_new_tokens", member.head_spec.generation_defaults()["max_new_tokens"])
    tokens = len(member.group.model.tokenizer(completion, add_special_tokens=False)["input_ids"])
    return "length" if tokens >= limit else "stop"


def prompt_ids(member: Served, prompt: Any) -> list[int]:
    """The token ids of ``prompt`` as ``member``'s head renders it (its chat template, its max_length), read
    without the backbone's lock: the event loop never waits for a decoding step."""
    from adapters.data.encoding import encode_rows

    rows = member.head_spec.input_rows([prompt])
    tokenizer = member.group.model.tokenizer
    columns, _ = encode_rows(rows, tokenizer, member.head_spec, "text", None, member.max_length, "inputs")
    return list(columns["input_ids"][0])


def submit(
    scheduler: Scheduler, member: Served, prompt: Any, request: dict[str, Any], choice: int = 0
) -> tuple[Sequence, Pieces]:
    """Queue one generation of ``prompt`` on the backbone's scheduler; its pieces of text arrive on the
    returned queue (``(piece, None)``, then ``(None, finish_reason)``). ``choice``: the index among ``n``
    (a seeded request samples choice ``i`` with seed ``seed + i``)."""
    loop = asyncio.get_running_loop()
    pieces: Pieces = asyncio.Queue()
    settings = request["settings"]
    ids = prompt_ids(member, prompt)
    sampled = settings.get("do_sample", False)
    seq = Sequence(
        member,
        ids,
        settings.get("max_new_tokens", member.head_spec.generation_defaults()["max_new_tokens"]),
        lambda piece, finish: loop.call_soon_threadsafe(pieces.put_nowait, (piece, finish)),
        temperature=settings.get("temperature", 1.0) if sampled else None,
        top_p=settings.get("top_p") if sampled else None,
        seed=None if request["seed"] is None else request["seed"] + choice,
    )
    scheduler.submit(seq)
    return seq, pieces


async def texts_of(seq: Sequence, pieces: Pieces, finish: list[str]) -> AsyncIterator[str]:
    """The pieces of ``seq``'s text as they come; its finish reason appended to ``finish`` at the end."""
    while True:
        piece, reason = await pieces.get()
        if piece is not None:
            yield piece
            continue
        if reason is not None and reason.startswith("error"):
            raise RuntimeError(f"generation failed: {reason}")
        finish.append(reason or "stop")
        return


async def complete(scheduler: Scheduler, member: Served, prompt: Any, request: dict[str, Any]) -> list[str]:
    """The ``n`` whole completions of ``prompt`` (a text or a chat message list), each a row of the batch,
    each cut at its first stop sequence (its row freed at the next step)."""

    async def one(choice: int) -> str:
        seq, pieces = submit(scheduler, member, prompt, request, choice)
        text = ""
        try:
            async for piece in texts_of(seq, pieces, []):
                text += piece
                if _cut(text, request["stop"])[1]:
                    break
        finally:
            seq.cancelled.set()  # stopped, or the request went away: free the row
        return text

    return list(await asyncio.gather(*(one(i) for i in range(request["n"]))))


def chunk(endpoint: str, name: str, ident: str, piece: str | None, finish: str | None, role: bool = False) -> str:
    """One server-sent event of a streamed chat or text completion."""
    if endpoint == "chat":
        delta = {**({"role": "assistant"} if role else {}), **({"content": piece} if piece is not None else {})}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish}
        obj = "text_completion"
    body = {"id": ident, "object": obj, "created": int(time.time()), "model": name, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


async def sse(
    endpoint: str, member: Served, seq: Sequence, pieces: Pieces, request: dict[str, Any]
) -> AsyncIterator[str]:
    """The stream of submitted ``seq`` as server-sent events, stop sequences applied, ending in ``[DONE]``.
    When the client goes away (the server closes this stream) or a stop sequence ends it, its row is freed
    at the scheduler's next step."""
    try:
        async for event in _events(endpoint, member, seq, pieces, request):
            yield event
    finally:
        seq.cancelled.set()


async def _events(
    endpoint: str, member: Served, seq: Sequence, pieces: Pieces, request: dict[str, Any]
) -> AsyncIterator[str]:
    ident = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    yield chunk(endpoint, member.name, ident, None if endpoint == "chat" else "", None, role=endpoint == "chat")
    text, sent, stopped, finish = "", 0, False, list[str]()
    async for piece in texts_of(seq, pieces, finish):
        text += piece
        kept, stopped = _cut(text, request["stop"])
        # hold back what could still be the start of a stop sequence
        hold = max((len(s) - 1 for s in request["stop"]), default=0)
        ready = len(kept) if stopped else max(sent, len(kept) - hold)
        if ready > sent:
            yield chunk(endpoint, member.name, ident, kept[sent:ready], None)
            sent = ready
        if stopped:
            break
    if not stopped and sent < len(text):
        yield chunk(endpoint, member.name, ident, text[sent:], None)
    reason = "stop" if stopped or not finish else finish[0]
    yield chunk(endpoint, member.name, ident, None if endpoint == "chat" else "", reason)
    yield "data: [DONE]\n\n"


def answer(endpoint: str, member: Served, prompt: Any, texts: list[str], request: dict[str, Any]) -> dict[str, Any]:
    """A whole (not streamed) chat or text completion with its choices, and their usage (the prompt counted
    once, the completion tokens of every choice summed, as OpenAI counts them)."""
    choices, kept = [], []
    for index, generated in enumerate(texts):
        text, stopped = _cut(generated, request["stop"])
        finish = _finish(member, text, stopped, request["settings"])
        kept.append(text)
        if endpoint == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        else:
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": None})
    usage = _usage(member, prompt, kept[0])
    usage["completion_tokens"] = sum(_usage(member, prompt, text)["completion_tokens"] for text in kept)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": member.name,
        "choices": choices,
        "usage": usage,
    }


def chat_prompt(body: dict[str, Any], max_chars: int) -> list[dict[str, str]]:
    messages = body["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise OpenAIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    unknown = sorted({m["role"] for m in messages} - set(ROLES))
    if unknown:
        raise OpenAIError(400, f"unknown message role(s) {unknown}; roles are {list(ROLES)}", "messages")
    _check_chars(sum(len(m["content"]) for m in messages), max_chars, "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_chars(chars: int, max_chars: int, field: str) -> None:
    if chars > max_chars:
        raise OpenAIError(400, f"{field} holds {chars} characters; this server takes at most {max_chars}", field)


def text_prompt(body: dict[str, Any], max_chars: int) -> str:
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise OpenAIError(400, "prompt must be one non-empty string", "prompt")
    _check_chars(len(prompt), max_chars, "prompt")
    return prompt


def checked(settings: dict[str, Any], member: Served) -> None:
    """Generation settings refused before anything runs, as a 400."""
    try:
        member.head_spec.check_generation(member.group.model, settings)
    except ConfigError as err:
        raise OpenAIError(400, str(err)) from None
