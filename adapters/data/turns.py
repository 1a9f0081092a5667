"""Every assistant turn of a chat as a training target (``CausalLM(mask_history=False)``).

A conversation teaches more than its last answer: a client's follow-up ("can I ship it in a closed product?")
is answered in the context of what was said before, and each of those answers is worth learning. The field's
trainers do this (LLaMA-Factory's multi-turn data with ``mask_history=False``, TRL's ``assistant_only_loss``,
axolotl's ``roles_to_train``); TRL reads the spans from ``{% generation %}`` markers that few chat templates
carry. Here the spans come from the template itself: the conversation up to an assistant message, rendered
with the generation prompt, is a prefix of the whole conversation, and the message's text (with the end-of-turn
token that follows it) comes next. Tokens are mapped to those character spans through the fast tokenizer's
offsets, so the whole chat is tokenized once, as generation will see it. A template that rewrites earlier
turns (some drop past reasoning) breaks the prefix rule and is refused by name.
"""

from __future__ import annotations

from typing import Any

from adapters.errors import DataError


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat (ending with its last assistant message's end of turn) and the character span of each
    assistant message: its text and the end-of-turn token after it."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:j], add_generation_prompt=True, tokenize=False) if j else ""
        start = len(prefix)
        if not full.startswith(prefix) or not full.startswith(message["content"], start):
            raise DataError(
                f"{where}: the chat template does not render assistant message {j} after the conversation before "
                "it (it rewrites earlier turns), so its tokens cannot be found to learn every turn; use "
                "CausalLM(mask_history=True) to learn the last answer only"
            )
        end = start + len(message["content"])
        after = len(full) - len(full[end:].lstrip())  # a template may put a space before the end of turn
        spans.append((start, after + len(eos) if eos and full.startswith(eos, after) else end))
    return full[: spans[-1][1]] if spans else full, spans


def encode_turns(
    tokenizer: Any, chats: list[list[dict[str, Any]]], max_length: int, where: Any, ignore: int
) -> tuple[dict, list]:
    """input_ids, attention_mask and labels (every assistant span learned, the rest ``ignore``) for each chat, and
    the rows that were cut: a chat longer than ``max_length`` loses its start, the latest turns are kept."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "learning every assistant turn needs a fast tokenizer (character offsets); use CausalLM(mask_history=True)"
        )
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    cut = []
    for i, messages in enumerate(chats):
        text, spans = assistant_spans(tokenizer, messages, where(i))
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [
            t if any(a <= s < b for a, b in spans) else ignore
            for t, (s, _) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        if len(ids) > max_length:
            cut.append(i)
            ids, labels = ids[-max_length:], labels[-max_length:]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out, cut
