"""Whole-text heads: one output vector per text, pooled from the backbone's states.

``Classification`` (cross-entropy, optional class weights and label smoothing), ``MultiLabel``
(one sigmoid per label) and ``Regression`` (MSE on one or more outputs). Long texts can be read as
overlapping windows whose logits are pooled (``LongTextHead``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import ConfigError, DataError
from adapters.heads.layers import SequenceHead
from adapters.heads.metrics import classification_metrics, multilabel_metrics, regression_metrics
from adapters.heads.spec import LongTextHead, _check_common, _check_labels, _label_index, tied_input_embedding


@dataclass
class Classification(LongTextHead):
    """Single-label classification over ``labels`` (the names, in id order).

    Data: a text column and a label column holding a label name or id.
    """

    labels: list[str]
    pooling: str = "auto"
    """``"auto"`` = ``"last"`` for decoders, ``"mean"`` for encoders; or one of them by name."""
    dropout: float = 0.1
    class_weights: list[float] | None = None
    """Loss weight per label, for imbalanced data (e.g. inverse frequency)."""
    label_smoothing: float = 0.0
    label_words: list[str] | None = None
    """One word per label (e.g. ``[" negative", " positive"]``, with the space a tokenizer puts before a
    word): the head starts as the base's own next-token scores of these words (the rows of its output
    embedding), so a decoder begins as its zero-shot classifier instead of a random head. Needs tied
    input and output embeddings (SmolLM2, Llama 3.2, Qwen2.5 small, Gemma...)."""
    kind: str = field(default="classification", init=False)
    problem_type: ClassVar[str | None] = "single_label_classification"

    def __post_init__(self) -> None:
        self.labels = _check_labels(self.labels)
        _check_common(self)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        self.check_prompt()
        if self.label_words is not None and (
            not isinstance(self.label_words, list)
            or len(self.label_words) != len(self.labels)
            or not all(isinstance(w, str) and w for w in self.label_words)
        ):
            raise ConfigError(
                f"label_words needs one non-empty word per label ({len(self.labels)}), got {self.label_words!r}"
            )
        if self.class_weights is not None:
            if len(self.class_weights) != len(self.labels) or any(w < 0 for w in self.class_weights):
                raise ConfigError(
                    f"class_weights needs one non-negative weight per label ({len(self.labels)}), "
                    f"got {self.class_weights}"
                )
            self.class_weights = [float(w) for w in self.class_weights]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return SequenceHead(hidden_size, self.num_labels, self.resolved_pooling(is_decoder), self.dropout, self.bias)

    def initialize(self, head: nn.Module, backbone: Any, tokenizer: Any) -> None:
        """With ``label_words``: each label's row is the output embedding of its word's first token."""
        if self.label_words is None or tokenizer is None:
            return
        embedding = tied_input_embedding(backbone, "label_words")
        ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in self.label_words]
        if any(not i for i in ids) or len({i[0] for i in ids}) != len(ids):
            raise ConfigError(f"label_words {self.label_words} must start with distinct tokens; got token ids {ids}")
        rows = embedding.weight[[i[0] for i in ids]]
        score = cast(nn.Linear, head.score)
        with torch.no_grad():
            score.weight.copy_(rows.float())
            if score.bias is not None:
                score.bias.zero_()

    def reads_input_embeddings(self) -> bool:
        return self.label_words is not None

    def label_id(self, value: Any) -> int:
        return _label_index(self.labels, value)

    target = label_id

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.label_smoothing)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:  # type: ignore[override]
        out = classification_metrics(logits.argmax(-1).numpy(), labels.numpy(), self.num_labels)
        out["loss"] = float(self.loss(logits, labels))
        return out

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list[Any]:
        probs = logits.float().softmax(-1)
        labels = [self.labels[i] for i in probs.argmax(-1).tolist()]
        if not probabilities:
            return labels
        return [
            (label, dict(zip(self.labels, p.tolist(), strict=True))) for label, p in zip(labels, probs, strict=True)
        ]


@dataclass
class MultiLabel(LongTextHead):
    """Any subset of ``labels`` per text. Data: a label column holding a list of label names (or ids)."""

    labels: list[str]
    threshold: float = 0.5
    """A label is predicted when its probability (sigmoid) reaches this."""
    pooling: str = "auto"
    dropout: float = 0.1
    kind: str = field(default="multi_label", init=False)
    problem_type: ClassVar[str | None] = "multi_label_classification"

    def __post_init__(self) -> None:
        self.labels = _check_labels(self.labels)
        _check_common(self)
        self.check_prompt()
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold={self.threshold!r} must be in (0, 1)")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return SequenceHead(hidden_size, self.num_labels, self.resolved_pooling(is_decoder), self.dropout, self.bias)

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        return {
            **super().example_batch(batch_size, seq_len),
            "labels": torch.empty(batch_size, self.num_labels, dtype=torch.float32),
        }

    def target(self, value: Any) -> list[float]:
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, np.ndarray)):
            raise DataError(f"a MultiLabel target must be a list of label names (possibly empty), got {value!r}")
        hot = [0.0] * self.num_labels
        for item in value:
            hot[_label_index(self.labels, item)] = 1.0
        return hot

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:  # type: ignore[override]
        preds = (logits.float().sigmoid() >= self.threshold).numpy()
        out = multilabel_metrics(preds, labels.numpy() > 0.5)
        out["loss"] = float(self.loss(logits, labels))
        return out

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list[Any]:
        probs = logits.float().sigmoid()
        sets = [[self.labels[i] for i in range(self.num_labels) if p[i] >= self.threshold] for p in probs]
        if not probabilities:
            return sets
        return [(s, dict(zip(self.labels, p.tolist(), strict=False))) for s, p in zip(sets, probs, strict=False)]


@dataclass
class Regression(LongTextHead):
    """One or more real numbers per text. Data: a label column holding a number (or a list of them)."""

    num_outputs: int = 1
    pooling: str = "auto"
    dropout: float = 0.1
    kind: str = field(default="regression", init=False)

    def __post_init__(self) -> None:
        _check_common(self)
        self.check_prompt()
        if not isinstance(self.num_outputs, int) or self.num_outputs < 1:
            raise ConfigError(f"num_outputs={self.num_outputs!r} must be a positive integer")

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return SequenceHead(hidden_size, self.num_outputs, self.resolved_pooling(is_decoder), self.dropout, self.bias)

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        return {
            **super().example_batch(batch_size, seq_len),
            "labels": torch.empty(batch_size, self.num_outputs, dtype=torch.float32),
        }

    def target(self, value: Any) -> list[float]:
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise DataError(f"a Regression target must be a number or a list of numbers, got {value!r}") from None
        if len(values) != self.num_outputs:
            raise DataError(f"Regression(num_outputs={self.num_outputs}) got {len(values)} value(s): {value!r}")
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"Regression target {value!r} is not finite")
        return values

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float(), labels.float())

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:  # type: ignore[override]
        out = regression_metrics(logits.float().numpy(), labels.float().numpy())
        out["loss"] = out["mse"]
        return out

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list[Any]:
        values = logits.float().tolist()
        return [v[0] for v in values] if self.num_outputs == 1 else values
