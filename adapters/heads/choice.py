"""``MultipleChoice``: a context and N candidate texts; each (context, choice) pair is scored, the
scores compete in one softmax."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import encode_choices
from ..errors import ConfigError, DataError
from .layers import SequenceHead
from .spec import HeadSpec, _check_common


@dataclass
class MultipleChoice(HeadSpec):
    """Pick the right one of ``num_choices`` candidates for a context (CaseHOLD-style).

    Data: the text column holds the context, ``choices_column`` a list of ``num_choices``
    candidate texts, the label column the index of the right one. Each (context, candidate) pair
    is encoded as one sequence and scored by a shared linear layer; the scores are compared with
    a softmax over the candidates.
    """

    num_choices: int
    choices_column: str = "choices"
    pooling: str = "auto"
    dropout: float = 0.1
    kind: str = field(default="multiple_choice", init=False)

    def __post_init__(self):
        _check_common(self)
        if not isinstance(self.num_choices, int) or self.num_choices < 2:
            raise ConfigError(f"num_choices={self.num_choices!r} must be an integer >= 2")

    def encode(self, data, tokenizer, text_column, label_column, max_length, what):
        return encode_choices(data, tokenizer, self, text_column, label_column, max_length, what)

    def input_rows(self, inputs: list) -> list[dict]:
        return [{"text": r["context"], self.choices_column: r["choices"]} for r in inputs]

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        shape = (batch_size, self.num_choices, seq_len)
        return {"input_ids": torch.empty(shape, dtype=torch.long), "attention_mask": torch.empty(shape, dtype=torch.long),
                "labels": torch.empty(batch_size, dtype=torch.long)}

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return SequenceHead(hidden_size, 1, self.resolved_pooling(is_decoder), self.dropout)

    def target(self, value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < self.num_choices:
            raise DataError(f"a MultipleChoice target is the index of the right choice, 0..{self.num_choices - 1}; "
                            f"got {value!r}")
        return int(value)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "count": int(labels.numel()),
                "loss": float(self.loss(logits, labels))}

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list:
        best = logits.argmax(-1).tolist()
        if not probabilities:
            return best
        return [(b, p.tolist()) for b, p in zip(best, logits.float().softmax(-1))]
