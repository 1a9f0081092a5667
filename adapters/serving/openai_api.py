"""OpenAI-compatible completions for the served artifacts whose head generates text (``CausalLM``), so the
clients users already have (the ``openai`` package, lm-eval's ``local-completions``, guidellm, litellm) talk
to an adapter at their defaults:

* ``POST /v1/chat/completions``: ``messages`` rendered with the base's chat template;
  ``POST /v1/completions``: one or many ``prompt``s (strings or token ids), each with ``n`` choices.
* every setting of ``openai_requests.py``, each applied per row in the continuous batch (``sampling.py``);
  ``logprobs`` (the model's own log-softmax, up to 20 alternatives), with ``echo`` the prompt's too;
  ``response_format`` by constrained decoding (``grammar.py``).
* ``stream: true`` answers with server-sent events, one chunk per piece of text as it is generated, each
  choice by its index, ending in ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with the
  usage, ``continuous_usage_stats`` the running usage on every chunk.

Every choice is a row of its backbone's continuous batch (``scheduler.py``): all running rows, whatever their
artifact and settings, decode in one forward per step. A row whose stop sequence appeared, or whose client
went away, is freed at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from adapters.errors import ConfigError
from adapters.serving.openai_requests import Ask, OpenAIError
from adapters.serving.sampling import TokenLogprob
from adapters.serving.scheduler import Scheduler, Sequence

Pieces = asyncio.Queue[tuple[str | None, str | None, int]]  # (piece, None, tokens so far)..., (None, finish, n)


@dataclass
class Choice:
    """One row of a request as it is generated: its sequence, the text kept so far and how it ended."""

    index: int
    prompt: int  # which of the request's prompts
    seq: Sequence
    pieces: Pieces
    text: str = ""
    finish: str | None = None
    tokens: int = 0  # tokens whose text is in ``text`` (the logprobs reported)
    sent_tokens: int = 0  # of them, those already streamed


def submit(scheduler: Scheduler, ask: Ask) -> list[Choice]:
    """Queue every row of ``ask`` on the backbone's scheduler (``QueueFull`` when its queue is full); each row's
    text arrives on its own queue. Choice ``i`` of a seeded request samples with seed ``seed + i``."""
    loop = asyncio.get_running_loop()
    constraint = _constraint_maker(ask, sorted(scheduler.eos))
    choices = []
    for index, prompt, i in ask.rows():
        pieces: Pieces = asyncio.Queue()
        seq = Sequence(
            ask.member, ask.prompts[prompt], ask.max_new_tokens, _nowhere, ask.sampling,
            None if ask.seed is None else ask.seed + i, constraint(),
        )  # fmt: skip
        seq.emit = _emitter(loop, pieces, seq)
        choices.append(Choice(index, prompt, seq, pieces))
    try:
        for choice in choices:
            scheduler.submit(choice.seq)
    except Exception:
        for choice in choices:
            choice.seq.cancelled.set()
        raise
    return choices


def _nowhere(piece: str | None, finish: str | None) -> None:
    """A placeholder until the sequence's own emitter is set."""


def _emitter(loop: asyncio.AbstractEventLoop, pieces: Pieces, seq: Sequence) -> Any:
    """What the scheduler's thread calls with ``seq``'s pieces: each goes to the event loop's queue with the
    count of tokens generated so far (the logprobs its text covers; the end-of-text token counts too, as
    lm-eval, which drops the last logprob of an echo as the generated one, expects)."""

    def emit(piece: str | None, finish: str | None) -> None:
        tokens = max(len(seq.generated), len(seq.logprobs))
        loop.call_soon_threadsafe(pieces.put_nowait, (piece, finish, tokens))

    return emit


def _constraint_maker(ask: Ask, stops: list[int]) -> Any:
    """A function giving each row its own grammar matcher (or None without ``response_format``); ``stops``: the
    end-of-text tokens the scheduler ends a row on, the only tokens a complete answer allows."""
    if ask.response_format is None:
        return lambda: None
    from adapters.serving import grammar
    from adapters.serving.openai_requests import vocabulary_size

    model = ask.member.group.model
    vocabulary = vocabulary_size(ask.member)
    try:
        compiled = grammar.compile_schema(ask.response_format["schema"], model.tokenizer, vocabulary, stops)
    except ConfigError as err:
        raise OpenAIError(400, str(err), "response_format") from None
    if not grammar.Constraint(compiled, vocabulary).can_start():
        raise OpenAIError(400, f"{ask.member.name!r}'s vocabulary cannot write this response_format", "response_format")
    return lambda: grammar.Constraint(compiled, vocabulary)


async def follow(choice: Choice, stop: list[str]) -> AsyncIterator[str]:
    """The new text of ``choice`` as it comes, cut at its first stop sequence (its row freed at the next step);
    what could still be the start of a stop sequence is held back until it is not."""
    hold = max((len(s) - 1 for s in stop), default=0)
    raw, sent = "", 0
    try:
        while True:
            piece, reason, tokens = await choice.pieces.get()
            if piece is None:
                if reason is not None and reason.startswith("error"):
                    raise RuntimeError(f"generation failed: {reason}")
                choice.finish = reason or "stop"
                choice.tokens = tokens
                break
            raw += piece
            kept, stopped = _cut(raw, stop)
            choice.tokens = tokens
            ready = len(kept) if stopped else max(sent, len(kept) - hold)
            if ready > sent:
                choice.text = kept[:ready]
                yield kept[sent:ready]
                sent = ready
            if stopped:
                choice.finish = "stop"
                return
        if sent < len(raw):
            choice.text = raw
            yield raw[sent:]
    finally:
        choice.seq.cancelled.set()


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, and whether one was found."""
    ends = [text.index(s) for s in stop if s in text]
    return (text[: min(ends)], True) if ends else (text, False)


async def complete(choices: list[Choice], ask: Ask) -> None:
    """Every choice generated whole (each ends with its text and finish reason)."""

    async def one(choice: Choice) -> None:
        async for _ in follow(choice, ask.stop):
            pass

    await asyncio.gather(*(one(c) for c in choices))


# --- what is answered -------------------------------------------------------------------------------------


def _ident(ask: Ask) -> str:
    return f"{'chatcmpl' if ask.chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(ask: Ask, choices: list[Choice]) -> dict[str, int]:
    """OpenAI's count: each prompt once, the generated tokens of every choice summed."""
    prompt = sum(len(p) for p in ask.prompts)
    completion = sum(c.tokens for c in choices)  # up to the text kept (a stop sequence ends it)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer(ask: Ask, choices: list[Choice]) -> dict[str, Any]:
    """A whole (not streamed) chat or text completion with its choices and usage."""
    body = []
    for choice in choices:
        logprobs = _logprobs(ask, choice, 0, choice.tokens, echo=ask.echo)
        if ask.chat:
            message = {"role": "assistant", "content": choice.text}
            body.append({"index": choice.index, "message": message, "logprobs": logprobs})
        else:
            text = (_prompt_text(ask, choice) if ask.echo else "") + choice.text
            body.append({"index": choice.index, "text": text, "logprobs": logprobs})
        body[-1]["finish_reason"] = choice.finish
    return {
        "id": _ident(ask),
        "object": "chat.completion" if ask.chat else "text_completion",
        "created": int(time.time()),
        "model": ask.member.name,
        "choices": body,
        "usage": usage(ask, choices),
    }


def _prompt_text(ask: Ask, choice: Choice) -> str:
    text = ask.texts[choice.prompt]
    return text if text is not None else ask.member.group.model.tokenizer.decode(ask.prompts[choice.prompt])


def _logprobs(ask: Ask, choice: Choice, start: int, end: int, echo: bool) -> dict[str, Any] | None:
    """The logprobs of generated tokens ``start:end`` (and of the prompt, with ``echo``) in the endpoint's shape:
    chat's ``{"content": [...]}``, the legacy completion's ``tokens``/``token_logprobs``/``top_logprobs``."""
    if ask.sampling.logprobs is None:
        return None
    tokenizer = ask.member.group.model.tokenizer
    generated = choice.seq.logprobs[start:end]
    if ask.chat:
        return {"content": [_chat_entry(tokenizer, entry) for entry in generated]}
    entries: list[TokenLogprob | None] = list(generated)
    if echo:
        entries = [None, *choice.seq.prompt_logprobs, *generated]
    tokens = ([choice.seq.prompt[0]] if echo else []) + [e.token for e in entries if e is not None]
    texts = [tokenizer.decode([t]) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {tokenizer.decode([t]): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def _chat_entry(tokenizer: Any, entry: TokenLogprob) -> dict[str, Any]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**one(entry.token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}


def _chunk(ask: Ask, ident: str, choice: Choice, piece: str | None, finish: str | None, role: bool = False) -> dict:
    """One streamed chunk of ``choice`` (its new ``piece``, its logprobs since the last chunk)."""
    logprobs = _logprobs(ask, choice, choice.sent_tokens, choice.tokens, echo=False)
    choice.sent_tokens = choice.tokens
    if ask.chat:
        delta = {**({"role": "assistant"} if role else {}), **({"content": piece} if piece is not None else {})}
        entry: dict[str, Any] = {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        entry = {"index": choice.index, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}
    return {
        "id": ident,
        "object": "chat.completion.chunk" if ask.chat else "text_completion",
        "created": int(time.time()),
        "model": ask.member.name,
        "choices": [entry],
    }


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def sse(ask: Ask, choices: list[Choice]) -> AsyncIterator[str]:
    """The streams of ``choices`` as server-sent events, interleaved as their pieces come, ending in ``[DONE]``.
    When the client goes away (the server closes this stream), every row is freed at the next step."""
    ident = _ident(ask)
    merged: asyncio.Queue[tuple[Choice, str | None, bool]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for piece in follow(choice, ask.stop):
                await merged.put((choice, piece, False))
        finally:
            await merged.put((choice, None, True))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        for choice in choices:  # the opening chunk: the role, or the echoed prompt
            opening = _prompt_text(ask, choice) if ask.echo else ("" if not ask.chat else None)
            yield _event(_with_usage(ask, choices, _chunk(ask, ident, choice, opening, None, role=ask.chat)))
        open_choices = len(choices)
        while open_choices:
            choice, piece, ended = await merged.get()
            if ended:
                open_choices -= 1
                body = _chunk(ask, ident, choice, None if ask.chat else "", choice.finish or "stop")
            else:
                body = _chunk(ask, ident, choice, piece, None)
            yield _event(_with_usage(ask, choices, body))
        for task in tasks:
            task.result()  # a failed generation fails the stream
        if ask.include_usage:
            last = {**_chunk(ask, ident, choices[0], None, None), "choices": [], "usage": usage(ask, choices)}
            yield _event(last)
        yield "data: [DONE]\n\n"
    finally:
        for choice in choices:
            choice.seq.cancelled.set()
        for task in tasks:
            task.cancel()


def _with_usage(ask: Ask, choices: list[Choice], body: dict[str, Any]) -> dict[str, Any]:
    """``continuous_usage_stats``: the usage so far on every chunk (vLLM's)."""
    if ask.continuous_usage:
        body["usage"] = usage(ask, choices)
    return body
