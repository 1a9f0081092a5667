"""Reporting helpers shared by the recipes."""

from __future__ import annotations

from collections import Counter


def balance(rows: list[dict], label_key: str = "label") -> str:
    counts = Counter(r[label_key] for r in rows)
    return ", ".join(f"{k}: {v} ({100 * v / len(rows):.1f}%)" for k, v in counts.most_common())


def majority_accuracy(train: list[dict], test: list[dict], label_key: str = "label") -> float:
    """Accuracy of always answering the most frequent training label."""
    top = Counter(r[label_key] for r in train).most_common(1)[0][0]
    return sum(r[label_key] == top for r in test) / len(test)
