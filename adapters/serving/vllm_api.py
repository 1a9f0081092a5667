"""vLLM's own endpoints beside OpenAI's, with vLLM's bodies, so scripts written against a vLLM server run here:

* ``POST /tokenize`` ``{"model", "prompt"}`` or ``{"model", "messages"}`` -> ``{"count", "max_model_len",
  "tokens", "token_strs"}`` (a chat counted as the completions endpoint renders it);
* ``POST /detokenize`` ``{"model", "tokens"}`` -> ``{"prompt"}``;
* ``POST /classify`` ``{"model", "input": text or texts}`` -> ``{"data": [{"index", "label", "probs",
  "num_classes"}], "usage"}`` for a classification artifact, through its micro-batcher like ``predict``.

Errors are OpenAI-shaped 4xx naming the problem (``openai_requests.OpenAIError``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from adapters.serving.backbones import Served
from adapters.serving.batcher import Batcher
from adapters.serving.openai_requests import OpenAIError, chat_messages, check_object, context_length, prompt_ids


def _named(body: Any, served: dict[str, Served], allowed: set[str]) -> Served:
    name = check_object(body, allowed).get("model")
    if not isinstance(name, str) or name not in served:
        raise OpenAIError(404, f"The model {name!r} does not exist; served: {sorted(served)}", "model")
    return served[name]


def _tokenizer(member: Served) -> Any:
    tokenizer = getattr(getattr(getattr(member, "group", None), "model", None), "tokenizer", None)
    if tokenizer is None:
        raise OpenAIError(400, f"{member.name!r} has no tokenizer to count with", "model")
    return tokenizer


def tokenize(body: Any, served: dict[str, Served], max_chars: int) -> dict[str, Any]:
    fields = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
    member = _named(body, served, fields)
    for flag in ("add_special_tokens", "add_generation_prompt", "return_token_strs"):
        if flag in body and not isinstance(body[flag], bool):
            raise OpenAIError(400, f"{flag} must be true or false", flag)
    tokenizer = _tokenizer(member)
    if ("prompt" in body) == ("messages" in body):
        raise OpenAIError(400, "give either prompt (a text) or messages (a chat)", "prompt")
    if "messages" in body:
        chat = chat_messages(body, max_chars)
        if member.head_spec.lm_logits:
            ids = prompt_ids(member, chat)  # exactly what /v1/chat/completions feeds the model
        else:
            add = body.get("add_generation_prompt", True)
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=add, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        if not isinstance(body["prompt"], str) or len(body["prompt"]) > max_chars:
            raise OpenAIError(400, f"prompt must be a string of at most {max_chars} characters", "prompt")
        ids = tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True) is not False)
        ids = ids["input_ids"]
    strs = tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": context_length(member), "tokens": list(ids), "token_strs": strs}


def detokenize(body: Any, served: dict[str, Served]) -> dict[str, Any]:
    member = _named(body, served, {"model", "tokens"})
    tokenizer = _tokenizer(member)
    tokens = body.get("tokens")
    vocabulary = len(tokenizer)
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocabulary for t in tokens
    ):
        raise OpenAIError(400, f"tokens must be a list of token ids from 0 to {vocabulary - 1}", "tokens")
    return {"prompt": tokenizer.decode(tokens)}


async def classify(body: Any, served: dict[str, Served], batchers: dict[str, Batcher], max_texts: int) -> dict:
    member = _named(body, served, {"model", "input", "user"})
    if member.head_spec.lm_logits:
        raise OpenAIError(400, f"{member.name!r} generates text: use /v1/completions", "model")
    if "user" in body and not isinstance(body["user"], str):
        raise OpenAIError(400, "user must be a string", "user")
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise OpenAIError(400, "input must be a text or a non-empty list of texts", "input")
    if len(texts) > max_texts:
        raise OpenAIError(413, f"{len(texts)} inputs in one request; at most {max_texts}", "input")
    predictions = await batchers[member.name].predict(texts, True)
    data = []
    for index, prediction in enumerate(predictions):
        label, probabilities = prediction if isinstance(prediction, tuple) else (prediction, {})
        probs = list(probabilities.values())
        data.append({"index": index, "label": label, "probs": probs, "num_classes": len(probs)})
    try:
        tokens = sum(len(ids) for ids in _tokenizer(member)(texts)["input_ids"])
    except OpenAIError:
        tokens = 0
    return {
        "id": f"classify-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": member.name,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }
