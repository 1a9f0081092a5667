"""The legal assistant's first answer opens with a licence of the knowledge base: constrained decoding.

A small model that reads the right licence off its list may still misspell the id (``GPL-2.0`` for
``GPL-2.0+``), invent one, or pair the licence with another's category. The answer's opening,
``"<SPDX id> (<name>). Category: <category>:"``, is a fact of the knowledge base, so it is decoded constrained
to the openings of the licences the system message lists (``listed``) or of every licence the knowledge base
has (``known``); what follows is free. The model still chooses: each token is its own greedy pick among those
that keep the text a prefix of some opening (a token trie, through transformers' ``prefix_allowed_tokens_fn``,
the same masking a grammar engine does; Willard and Louf 2023, https://arxiv.org/abs/2307.09702).
"""

from __future__ import annotations

from typing import Any

import torch


class Openings:
    """A token trie of answer openings: which tokens may come next after the tokens so far."""

    def __init__(self, tokenizer: Any, openings: list[str]):
        following: dict[tuple[int, ...], set[int]] = {}
        for text in openings:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for j, token in enumerate(ids):
                following.setdefault(tuple(ids[:j]), set()).add(token)
        self.following = {prefix: sorted(tokens) for prefix, tokens in following.items()}

    def allowed(self, so_far: tuple[int, ...]) -> list[int] | None:
        """The tokens that keep ``so_far`` a prefix of an opening; None once an opening is complete."""
        return self.following.get(so_far)


def constrained(openings: list[Openings], prompt_length: int, vocabulary: int) -> Any:
    """A ``prefix_allowed_tokens_fn`` for one batch: row ``i`` opens with one of ``openings[i]``, then is free.
    ``prompt_length``: the batch's (left-padded) prompt length, after which the answer's tokens come."""
    everything = torch.arange(vocabulary)

    def allowed(row: int, ids: torch.Tensor) -> Any:
        tokens = openings[row].allowed(tuple(ids[prompt_length:].tolist()))
        return everything if tokens is None else tokens

    return allowed


def first_answers(model: Any, histories: list[list[dict]], openings: list[Openings], batch_size: int, tokens: int):
    """Greedy first answers of ``histories``, each opening constrained to its row's ``openings``."""
    vocabulary = model.backbone.get_output_embeddings().weight.shape[0]
    answers: list[str] = []
    for i in range(0, len(histories), batch_size):
        batch = histories[i : i + batch_size]
        length = model.encode(batch)["input_ids"].shape[1]
        allow = constrained(openings[i : i + batch_size], length, vocabulary)
        answers += model.predict(batch, batch_size=len(batch), max_new_tokens=tokens, prefix_allowed_tokens_fn=allow)
    return answers
