"""``TokenClassification``: one tag per word (NER, POS), learned on each word's first sub-token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.data.encoding import IGNORE, encode_words
from adapters.errors import DataError
from adapters.heads.layers import TokenHead
from adapters.heads.metrics import token_metrics
from adapters.heads.spec import HeadSpec, _check_common, _check_labels, _label_index


@dataclass
class TokenClassification(HeadSpec):
    """One tag per word (NER, clause tagging). Data: the text column holds a list of words, the
    label column a list of as many tags (names or ids). Only each word's first sub-token is
    trained and predicted; the others are ignored."""

    labels: list[str]
    dropout: float = 0.1
    kind: str = field(default="token_classification", init=False)
    labels_per_token: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.labels = _check_labels(self.labels)
        _check_common(self)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def encode(self, data: Any, tokenizer: Any, text_column: Any, label_column: Any, max_length: Any, what: Any) -> Any:
        return encode_words(data, tokenizer, self, text_column, label_column, max_length, what)

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        batch = super().example_batch(batch_size, seq_len)
        batch["labels"] = torch.empty(batch_size, seq_len, dtype=torch.long)
        return batch

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return TokenHead(hidden_size, self.num_labels, self.dropout)

    def target(self, value: Any) -> list[int]:
        if isinstance(value, str) or not isinstance(value, (list, tuple, np.ndarray)):
            raise DataError(f"a TokenClassification target is a list of tags, one per word; got {value!r}")
        return [_label_index(self.labels, tag) for tag in value]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def eval_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        return logits.argmax(-1), labels, nll.sum(-1), (labels != IGNORE).sum(-1)

    def metrics(  # type: ignore[override]
        self, preds: torch.Tensor, labels: torch.Tensor, nll: torch.Tensor, tokens: torch.Tensor
    ) -> dict[str, Any]:
        rows = [
            (
                [self.labels[p] for p, t in zip(pr, la, strict=False) if t != IGNORE],
                [self.labels[t] for t in la if t != IGNORE],
            )
            for pr, la in zip(preds.tolist(), labels.tolist(), strict=False)
        ]
        out = token_metrics([r[0] for r in rows], [r[1] for r in rows])
        out["loss"] = float(nll.sum() / tokens.sum().clamp(min=1))
        return out

    def predict(
        self, model: Any, inputs: list[Any], probabilities: bool = False, batch_size: int | None = None, **kwargs: Any
    ) -> list[list[str]]:
        """One tag per word (inputs: word lists, or texts split on whitespace), read at each word's first
        sub-token; words cut by ``max_length`` get None: they were never seen."""
        self.refuse_keywords(kwargs)
        words = [x.split() if isinstance(x, str) else list(x) for x in inputs]
        batch_size = batch_size or 256
        out = []
        for i in range(0, len(words), batch_size):
            chunk = words[i : i + batch_size]
            encoded = model.tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=model.max_length)
            logits = model.logits(chunk, batch_size)
            left = model.tokenizer.padding_side == "left"
            for j, row in enumerate(chunk):
                word_ids = encoded.word_ids(j)
                row_logits = logits[j][-len(word_ids) :] if left else logits[j][: len(word_ids)]
                out.append(self._tags(row, word_ids, row_logits))
        return out

    def _tags(self, words: list[str], word_ids: list[Any], logits: torch.Tensor) -> list[Any]:
        tags: list[str | None] = [None] * len(words)
        previous = None
        for position, wid in enumerate(word_ids):
            if wid is not None and wid != previous:
                tags[wid] = self.labels[int(logits[position].argmax())]
            previous = wid
        return tags
