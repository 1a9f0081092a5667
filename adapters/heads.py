"""Task heads: small full-precision modules over the backbone's hidden states.

Long texts: the whole-text heads (classification, multi-label, regression) can read a text
longer than the model's length as overlapping windows (``long_text="windows"``): every window
is scored and the window logits are pooled (mean or max) into the text's logits, in training
and in prediction, so nothing past the first window is dropped.

A head is split in two, as peft splits config and layer: a *spec* (a dataclass the user
builds, saved as JSON with the artifact: labels, pooling, loss settings) and the *module*
(weights, saved as safetensors). Heads are never part of the quantized backbone, so they are
never quantized and always train in float32.

Each spec says how to read a target from a data row (``target``), its loss, what to gather
per example at evaluation (``eval_outputs``) and the metrics computed from it, and how to turn
outputs into predictions (``decode``). The heads:

=====================  ==================================  ==============================
head                   module                              loss
=====================  ==================================  ==============================
Classification         pool -> linear(num_labels)          cross-entropy (weights, smoothing)
MultiLabel             pool -> linear(num_labels)          BCE with logits
Regression             pool -> linear(num_outputs)         MSE
MultipleChoice         pool each (context, choice) -> 1    cross-entropy over choices
TokenClassification    linear(num_labels) on every token   cross-entropy on first sub-tokens
CausalLM               the base's own LM head, frozen      next-token loss on the response
=====================  ==================================  ==============================

Pooling turns per-token states into one vector per text and must fit the base: a decoder sees
only the left context, so only its last real token has read the whole text (``"last"``); an
encoder is bidirectional, so the mean of its tokens (``"mean"``) or its first token
(``"first"``, BERT's [CLS]) work. Positions come from the attention mask, so left and right
padding give the same result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError
from .metrics import classification_metrics, multilabel_metrics, regression_metrics, token_metrics

POOLINGS = ("auto", "last", "first", "mean")
LONG_TEXT = ("truncate", "windows")
WINDOW_POOLINGS = ("mean", "max")
IGNORE = -100  # label of positions that take no part in a loss (padding, later sub-tokens, prompts)


def pool_windows(logits: torch.Tensor, document: torch.Tensor, method: str) -> torch.Tensor:
    """Per-window logits (windows, outputs) -> per-document logits, ``document`` giving each
    window's row in the batch: the mean or the max over each document's windows."""
    count = int(document.max()) + 1
    index = document.unsqueeze(-1).expand_as(logits)
    if method == "max":
        return torch.full((count, logits.shape[-1]), float("-inf"), dtype=logits.dtype,
                          device=logits.device).scatter_reduce(0, index, logits, "amax")
    sums = torch.zeros(count, logits.shape[-1], dtype=logits.dtype, device=logits.device).index_add(0, document, logits)
    return sums / torch.bincount(document, minlength=count).unsqueeze(-1).to(logits.dtype)


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


def pool_segments(hidden: torch.Tensor, segments: torch.Tensor, method: str) -> torch.Tensor:
    """Reduce packed ``hidden`` (rows, tokens, dim) to one vector per segment (``segments``: each
    token's text, -1 for filler; see ``batching.pack``), as ``pool`` does for padded rows."""
    flat, owner = hidden.reshape(-1, hidden.shape[-1]), segments.reshape(-1)
    keep = owner >= 0
    flat, owner = flat[keep], owner[keep]
    count = int(owner.max()) + 1
    if method == "mean":
        sums = torch.zeros(count, flat.shape[-1], dtype=flat.dtype, device=flat.device).index_add(0, owner, flat)
        return sums / torch.bincount(owner, minlength=count).unsqueeze(-1).to(flat.dtype)
    if method not in ("last", "first"):
        raise ConfigError(f"pooling={method!r} is not one of {POOLINGS}")
    positions = torch.arange(owner.numel(), device=flat.device)
    start = torch.full((count,), owner.numel() if method == "first" else -1, device=flat.device)
    index = start.scatter_reduce(0, owner, positions, "amin" if method == "first" else "amax")
    return flat[index]


class SequenceHead(nn.Module):
    """Pooling -> dropout -> linear layer: one output vector per text."""

    def __init__(self, hidden_size: int, outputs: int, pooling: str, dropout: float):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, outputs)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        pooled = pool(hidden, attention_mask, self.pooling) if segments is None else pool_segments(
            hidden, segments, self.pooling)
        return self.score(self.dropout(pooled.to(self.score.weight.dtype)))


class TokenHead(nn.Module):
    """Dropout -> linear layer on every token."""

    pooling = "none"

    def __init__(self, hidden_size: int, outputs: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, outputs)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.dropout(hidden.to(self.score.weight.dtype)))


def _check_labels(labels) -> list[str]:
    if isinstance(labels, str) or not labels or len(labels) < 2:
        raise ConfigError(f"the head needs a list of at least 2 label names, got {labels!r}")
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"label names must be distinct, got {labels}")
    return labels


def _check_common(spec) -> None:
    if getattr(spec, "long_text", "truncate") not in LONG_TEXT:
        raise ConfigError(f"long_text={spec.long_text!r} must be one of {LONG_TEXT}")
    window_batch = getattr(spec, "window_batch", 16)
    if not isinstance(window_batch, int) or window_batch < 1:
        raise ConfigError(f"window_batch={window_batch!r} must be a positive integer")
    if getattr(spec, "window_pooling", "mean") not in WINDOW_POOLINGS:
        raise ConfigError(f"window_pooling={spec.window_pooling!r} must be one of {WINDOW_POOLINGS}")
    overlap = getattr(spec, "window_overlap", None)
    if overlap is not None and (not isinstance(overlap, int) or overlap < 0):
        raise ConfigError(f"window_overlap={overlap!r} must be a non-negative number of tokens")
    if getattr(spec, "pooling", "auto") not in POOLINGS:
        raise ConfigError(f"pooling={spec.pooling!r} is not one of {POOLINGS}")
    if not 0 <= getattr(spec, "dropout", 0.0) < 1:
        raise ConfigError(f"dropout={spec.dropout!r} must be in [0, 1)")


def _label_index(labels: list[str], value) -> int:
    """A label given as its name or its id -> its id; anything else is a DataError."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, np.integer)):
        if 0 <= value < len(labels):
            return int(value)
        raise DataError(f"label id {value} is out of range: the head has {len(labels)} labels {labels} "
                        f"(ids 0..{len(labels) - 1})")
    try:
        return labels.index(str(value))
    except ValueError:
        raise DataError(f"label {value!r} is not one of the head's labels {labels}; add it to the head's "
                        f"labels or fix the data") from None


class HeadSpec:
    """What every head spec provides (see the module docstring)."""

    kind: ClassVar[str]
    sequence_labels: ClassVar[bool] = False  # labels are per token, aligned with input_ids

    def resolved_pooling(self, is_decoder: bool) -> str:
        pooling = getattr(self, "pooling", "auto")
        if pooling != "auto":
            return pooling
        return "last" if is_decoder else "mean"

    def to_dict(self) -> dict:
        return asdict(self)

    def eval_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return logits.float(), labels

    def describe(self) -> str:
        labels = getattr(self, "labels", None)
        return f"{type(self).__name__} ({len(labels)} labels)" if labels else type(self).__name__


@dataclass
class LongTextHead(HeadSpec):
    """Whole-text heads (classification, multi-label, regression): how texts longer than
    ``max_length`` are read (keyword-only settings, shared by the three)."""

    long_text: str = field(default="truncate", kw_only=True)
    """``"truncate"``: only the first ``max_length`` tokens are read. ``"windows"``: the text is split
    into overlapping windows of ``max_length`` tokens, each is scored, and the window logits are
    pooled (``window_pooling``), in training and prediction alike: nothing is dropped."""
    window_overlap: int | None = field(default=None, kw_only=True)
    """Tokens shared by consecutive windows (default: a quarter of ``max_length``)."""
    window_pooling: str = field(default="mean", kw_only=True)
    """``"mean"`` or ``"max"`` of the window logits."""
    window_batch: int = field(default=16, kw_only=True)
    """Windows run through the model at most this many at a time. In training each group is
    recomputed during backward (activation checkpointing), so memory is bounded by this number
    whatever the documents' length (a 20,000-token text is 200+ windows)."""


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
    kind: str = field(default="classification", init=False)

    def __post_init__(self):
        self.labels = _check_labels(self.labels)
        _check_common(self)
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

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return SequenceHead(hidden_size, self.num_labels, self.resolved_pooling(is_decoder), self.dropout)

    def label_id(self, value) -> int:
        return _label_index(self.labels, value)

    target = label_id

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.label_smoothing)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        out = classification_metrics(logits.argmax(-1).numpy(), labels.numpy(), self.num_labels)
        out["loss"] = float(self.loss(logits, labels))
        return out

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list:
        probs = logits.float().softmax(-1)
        labels = [self.labels[i] for i in probs.argmax(-1).tolist()]
        if not probabilities:
            return labels
        return [(label, dict(zip(self.labels, p.tolist()))) for label, p in zip(labels, probs)]


@dataclass
class MultiLabel(LongTextHead):
    """Any subset of ``labels`` per text. Data: a label column holding a list of label names (or ids)."""

    labels: list[str]
    threshold: float = 0.5
    """A label is predicted when its probability (sigmoid) reaches this."""
    pooling: str = "auto"
    dropout: float = 0.1
    kind: str = field(default="multi_label", init=False)

    def __post_init__(self):
        self.labels = _check_labels(self.labels)
        _check_common(self)
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold={self.threshold!r} must be in (0, 1)")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return SequenceHead(hidden_size, self.num_labels, self.resolved_pooling(is_decoder), self.dropout)

    def target(self, value) -> list[float]:
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, np.ndarray)):
            raise DataError(f"a MultiLabel target must be a list of label names (possibly empty), got {value!r}")
        hot = [0.0] * self.num_labels
        for item in value:
            hot[_label_index(self.labels, item)] = 1.0
        return hot

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        preds = (logits.float().sigmoid() >= self.threshold).numpy()
        out = multilabel_metrics(preds, labels.numpy() > 0.5)
        out["loss"] = float(self.loss(logits, labels))
        return out

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list:
        probs = logits.float().sigmoid()
        sets = [[self.labels[i] for i in range(self.num_labels) if p[i] >= self.threshold] for p in probs]
        if not probabilities:
            return sets
        return [(s, dict(zip(self.labels, p.tolist()))) for s, p in zip(sets, probs)]


@dataclass
class Regression(LongTextHead):
    """One or more real numbers per text. Data: a label column holding a number (or a list of them)."""

    num_outputs: int = 1
    pooling: str = "auto"
    dropout: float = 0.1
    kind: str = field(default="regression", init=False)

    def __post_init__(self):
        _check_common(self)
        if not isinstance(self.num_outputs, int) or self.num_outputs < 1:
            raise ConfigError(f"num_outputs={self.num_outputs!r} must be a positive integer")

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return SequenceHead(hidden_size, self.num_outputs, self.resolved_pooling(is_decoder), self.dropout)

    def target(self, value) -> list[float]:
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

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        out = regression_metrics(logits.float().numpy(), labels.float().numpy())
        out["loss"] = out["mse"]
        return out

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list:
        values = logits.float().tolist()
        return [v[0] for v in values] if self.num_outputs == 1 else values


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


@dataclass
class TokenClassification(HeadSpec):
    """One tag per word (NER, clause tagging). Data: the text column holds a list of words, the
    label column a list of as many tags (names or ids). Only each word's first sub-token is
    trained and predicted; the others are ignored."""

    labels: list[str]
    dropout: float = 0.1
    kind: str = field(default="token_classification", init=False)
    sequence_labels: ClassVar[bool] = True

    def __post_init__(self):
        self.labels = _check_labels(self.labels)
        _check_common(self)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        return TokenHead(hidden_size, self.num_labels, self.dropout)

    def target(self, value) -> list[int]:
        if isinstance(value, str) or not isinstance(value, (list, tuple, np.ndarray)):
            raise DataError(f"a TokenClassification target is a list of tags, one per word; got {value!r}")
        return [_label_index(self.labels, tag) for tag in value]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def eval_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        return logits.argmax(-1), labels, nll.sum(-1), (labels != IGNORE).sum(-1)

    def metrics(self, preds: torch.Tensor, labels: torch.Tensor, nll: torch.Tensor, tokens: torch.Tensor) -> dict:
        rows = [([self.labels[p] for p, t in zip(pr, la) if t != IGNORE], [self.labels[t] for t in la if t != IGNORE])
                for pr, la in zip(preds.tolist(), labels.tolist())]
        out = token_metrics([r[0] for r in rows], [r[1] for r in rows])
        out["loss"] = float(nll.sum() / tokens.sum().clamp(min=1))
        return out

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list:
        raise NotImplementedError  # per word, done by AdaptedModel.predict with the word ids


@dataclass
class CausalLM(HeadSpec):
    """Generate text with the base's own LM head (frozen): only the adapter learns.

    Data: the text column holds the prompt and the label column the response, or a
    ``messages_column`` holds chat messages (the last one, the assistant's, is the response)
    rendered with the tokenizer's chat template. The loss is counted on response tokens only.
    """

    messages_column: str = "messages"
    max_new_tokens: int = 64
    """Default length of generated answers in ``predict`` (any ``generate`` kwarg can be passed there)."""
    kind: str = field(default="causal_lm", init=False)
    sequence_labels: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        if not is_decoder:
            raise ConfigError("CausalLM needs a decoder base (an encoder has no next-token head)")
        return nn.Module()  # no new weights: the logits come from the base's LM head

    def target(self, value) -> str:
        if not isinstance(value, str) or not value:
            raise DataError(f"a CausalLM response must be non-empty text, got {value!r}")
        return value

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # position t predicts token t+1; prompt and padding positions are IGNORE
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    def eval_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shifted = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none")
        return nll.sum(-1), (shifted != IGNORE).sum(-1)

    def metrics(self, nll: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        loss = float(nll.sum() / tokens.sum().clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "count": int(nll.numel())}

    def describe(self) -> str:
        return "CausalLM (the base's LM head, frozen)"


HEADS: dict[str, type] = {cls.__dataclass_fields__["kind"].default: cls for cls in
                          (Classification, MultiLabel, Regression, MultipleChoice, TokenClassification, CausalLM)}


def head_from_dict(data: dict) -> Any:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in HEADS:
        raise ConfigError(f"unknown head kind {kind!r}; known: {sorted(HEADS)}")
    return HEADS[kind](**data)
