"""Text -> tensors: datasets, label ids, tokenization and padding.

Users hand us a ``datasets.Dataset`` or a list of dicts with a text column and a label
column. Labels are checked against the head *before* any tokenization, so a bad row fails
fast with its index. Padding is dynamic (to the longest text of each batch), on the side the
tokenizer says, which the heads' pooling handles either way.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .errors import DataError


def as_dataset(data: Any, what: str = "dataset"):
    """Accept a ``datasets.Dataset`` or an iterable of dicts; refuse an empty one."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        raise DataError(f"{what} is a DatasetDict with splits {list(data)}; pass one split, e.g. data['train']")
    if not isinstance(data, datasets.Dataset):
        if isinstance(data, dict):
            data = datasets.Dataset.from_dict(data)
        else:
            rows = list(data)
            if rows and not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{what} must be a datasets.Dataset or a list of dicts, got rows of {type(rows[0]).__name__}")
            data = datasets.Dataset.from_list(rows)
    if len(data) == 0:
        raise DataError(f"{what} is empty: it needs at least one row")
    return data


def _require_columns(data, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise DataError(f"{what} has no column {missing[0]!r}; its columns are {data.column_names}. "
                        f"Rename the column or pass text_column=/label_column= in TrainConfig")


def encode_dataset(data, tokenizer, head, text_column: str, label_column: str | None, max_length: int, what: str):
    """Validate labels, then tokenize (truncating to ``max_length``) into model inputs."""
    data = as_dataset(data, what)
    columns = [text_column] + ([label_column] if label_column else [])
    _require_columns(data, columns, what)
    texts = list(data[text_column])
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{what} row {i}: column {text_column!r} holds {type(text).__name__}, not text")
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if label_column:
        labels = []
        for i, value in enumerate(list(data[label_column])):
            try:
                labels.append(head.label_id(value))
            except DataError as err:
                raise DataError(f"{what} row {i}: {err}") from None
        out["labels"] = labels
    import datasets

    return datasets.Dataset.from_dict(out)


class Collator:
    """Pad a list of encoded rows to the longest one (``tokenizer.pad``) and stack labels."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad(
            [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows],
            return_tensors="pt")
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return dict(batch)
