"""Helpers shared by the recipes: reporting, and what kind of base a model is before it loads."""

from __future__ import annotations

from collections import Counter


def balance(rows: list[dict], label_key: str = "label") -> str:
    counts = Counter(r[label_key] for r in rows)
    return ", ".join(f"{k}: {v} ({100 * v / len(rows):.1f}%)" for k, v in counts.most_common())


def majority_accuracy(train: list[dict], test: list[dict], label_key: str = "label") -> float:
    """Accuracy of always answering the most frequent training label."""
    top = Counter(r[label_key] for r in train).most_common(1)[0][0]
    return sum(r[label_key] == top for r in test) / len(test)


def typed_text(text: str | None) -> str | None:
    """A template typed on a command line, its ``\\n`` read as a line break; empty -> None (none)."""
    return text.replace("\\n", "\n") if text else None


def decoder_and_tied(model: str) -> tuple[bool, bool]:
    """Whether ``model`` is a decoder, and whether its output embeddings are its input embeddings
    (what label words and likelihood scoring need), read from its config alone: a recipe picks its
    defaults before loading anything."""
    from transformers import AutoConfig

    from adapters.backbone.loading import is_decoder_config, resolve_source

    config = AutoConfig.from_pretrained(resolve_source(model))
    return is_decoder_config(config), bool(getattr(config, "tie_word_embeddings", False))
