"""Shared data helpers of the recipes: reading user files or hub datasets, grouped splits."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path


def read_table(source: str):
    """A local CSV/JSONL/Parquet file, or a hub dataset name (needs internet), as a datasets.Dataset
    (or DatasetDict for hub datasets with splits)."""
    import datasets

    path = Path(source)
    if path.exists():
        kind = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise SystemExit(f"--data {source}: unsupported file type {path.suffix!r}; use .csv, .jsonl or .parquet")
        extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        return datasets.load_dataset(kind, data_files=str(path), split="train", **extra)
    return datasets.load_dataset(source)


def group_split(rows: list[dict], group_key: str, eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows so that no group (movie, licence...) has rows on both sides."""
    groups = sorted({r[group_key] for r in rows})
    random.Random(seed).shuffle(groups)
    target, eval_groups, count = eval_fraction * len(rows), set(), 0
    sizes = Counter(r[group_key] for r in rows)
    for g in groups:
        if count >= target:
            break
        eval_groups.add(g)
        count += sizes[g]
    return [r for r in rows if r[group_key] not in eval_groups], [r for r in rows if r[group_key] in eval_groups]


def sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def balance(rows: list[dict], label_key: str = "label") -> str:
    counts = Counter(r[label_key] for r in rows)
    return ", ".join(f"{k}: {v} ({100 * v / len(rows):.1f}%)" for k, v in counts.most_common())


def majority_accuracy(train: list[dict], test: list[dict], label_key: str = "label") -> float:
    """Accuracy of always answering the most frequent training label."""
    top = Counter(r[label_key] for r in train).most_common(1)[0][0]
    return sum(r[label_key] == top for r in test) / len(test)
