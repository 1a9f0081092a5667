"""Task heads: small full-precision modules over the backbone's hidden states.

A head is split in two, as peft splits config and layer: a *spec* (a dataclass the user
builds, saved as JSON with the artifact: labels, pooling, loss settings) and the *module*
(weights, saved as safetensors). Heads are never part of the quantized backbone, so they are
never quantized and always train in float32.

Pooling turns per-token states into one vector per text and must fit the base:
a decoder sees only the left context, so only its last real token has read the whole text
(``"last"``); an encoder is bidirectional, so the mean of its tokens (``"mean"``) or its
first token (``"first"``, BERT's [CLS]) work. Positions come from the attention mask, so
left and right padding give the same result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError

POOLINGS = ("auto", "last", "first", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Reduce ``hidden`` (batch, seq, dim) to (batch, dim) over the tokens the mask keeps."""
    mask = attention_mask.to(hidden.dtype)
    if method == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    keep = attention_mask.bool()
    if method == "last":  # highest kept position: works for left and right padding alike
        index = torch.where(keep, positions, -1).max(dim=1).values.clamp(min=0)
    elif method == "first":
        index = torch.where(keep, positions, hidden.shape[1]).min(dim=1).values.clamp(max=hidden.shape[1] - 1)
    else:
        raise ConfigError(f"pooling={method!r} is not one of {POOLINGS}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class ClassificationHead(nn.Module):
    """Pooling -> dropout -> linear layer to one logit per label."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool(hidden, attention_mask, self.pooling)
        return self.score(self.dropout(pooled.to(self.score.weight.dtype)))


@dataclass
class Classification:
    """Single-label classification over ``labels`` (the names, in id order)."""

    labels: list[str]
    pooling: str = "auto"
    """``"auto"`` = ``"last"`` for decoders, ``"mean"`` for encoders; or one of them by name."""
    dropout: float = 0.1
    class_weights: list[float] | None = None
    """Loss weight per label, for imbalanced data (e.g. inverse frequency)."""
    label_smoothing: float = 0.0
    kind: str = field(default="classification", init=False)

    def __post_init__(self):
        if isinstance(self.labels, str) or not self.labels or len(self.labels) < 2:
            raise ConfigError(f"Classification needs a list of at least 2 label names, got {self.labels!r}")
        self.labels = [str(label) for label in self.labels]
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"Classification labels must be distinct, got {self.labels}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if self.class_weights is not None:
            if len(self.class_weights) != len(self.labels) or any(w < 0 for w in self.class_weights):
                raise ConfigError(f"class_weights needs one non-negative weight per label ({len(self.labels)}), "
                                  f"got {self.class_weights}")
            self.class_weights = [float(w) for w in self.class_weights]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def resolved_pooling(self, is_decoder: bool) -> str:
        if self.pooling != "auto":
            return self.pooling
        return "last" if is_decoder else "mean"

    def build(self, hidden_size: int, is_decoder: bool) -> ClassificationHead:
        return ClassificationHead(hidden_size, self.num_labels, self.resolved_pooling(is_decoder), self.dropout)

    def label_id(self, value) -> int:
        """A label given as its name or as its id -> its id; anything else is a DataError."""
        if isinstance(value, bool):
            value = str(value)
        if isinstance(value, int) or (hasattr(value, "item") and not isinstance(value, str)):
            value = int(value)
            if 0 <= value < self.num_labels:
                return value
            raise DataError(f"label id {value} is out of range: the head has {self.num_labels} labels "
                            f"{self.labels} (ids 0..{self.num_labels - 1})")
        try:
            return self.labels.index(str(value))
        except ValueError:
            raise DataError(f"label {value!r} is not one of the head's labels {self.labels}; add it to "
                            f"Classification(labels=...) or fix the data") from None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device)
        return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.label_smoothing)

    def to_dict(self) -> dict:
        return asdict(self)


HEADS = {"classification": Classification}


def head_from_dict(data: dict):
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in HEADS:
        raise ConfigError(f"unknown head kind {kind!r}; known: {sorted(HEADS)}")
    return HEADS[kind](**data)
