"""``HeadSpec``: what every head kind provides, and the checks its settings share.

A spec says how to encode data rows for its head (``encode``), read a target (``target``), its loss,
what to gather per example at evaluation (``eval_outputs``) and the metrics computed from it, and
how to turn raw inputs into predictions (``input_rows``, ``predict``, ``decode``). The model, the
loaders, the memory estimate and the artifact code ask the spec; none of them switches on its kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import torch

from adapters.data.encoding import encode_texts
from adapters.errors import ConfigError, DataError
from adapters.heads.layers import POOLINGS

LONG_TEXT = ("truncate", "windows")
WINDOW_POOLINGS = ("mean", "max")


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
    """What every head spec provides (see the module docstring). Defaults fit the whole-text heads."""

    kind: ClassVar[str]
    sequence_labels: ClassVar[bool] = False
    """Labels are per token, aligned with input_ids."""
    problem_type: ClassVar[str | None] = None
    """What transformers' ``AutoModelForSequenceClassification`` calls this head's task, where it has one
    (``qadapters export``)."""
    lm_logits: ClassVar[bool] = False
    """The outputs are the base's own vocabulary-wide LM logits: the base is loaded with its LM head,
    and evaluation batches are kept small."""

    def resolved_pooling(self, is_decoder: bool) -> str:
        pooling = getattr(self, "pooling", "auto")
        if pooling != "auto":
            return pooling
        return "last" if is_decoder else "mean"

    def to_dict(self) -> dict:
        return asdict(self)

    def packable(self) -> bool:
        """One pooled vector per plain row, so rows can be packed without padding (``batching.pack``)."""
        return False

    # --- data -------------------------------------------------------------------------------------

    def encode(self, data, tokenizer, text_column: str, label_column: str | None, max_length: int,
               what: str) -> tuple[dict[str, list], int]:
        """Columns of model inputs (and ``labels`` with a ``label_column``) for a ``datasets.Dataset``,
        and the number of rows cut at ``max_length``; one of ``data.py``'s encoders."""
        return encode_texts(data, tokenizer, self, text_column, label_column, max_length, what)

    def input_rows(self, inputs: list) -> list[dict]:
        """Unlabeled ``predict`` inputs as data rows (the text under ``"text"``) for ``encode``."""
        return [{"text": x} for x in inputs]

    def is_single(self, inputs) -> bool:
        """Whether ``predict`` was given one input (answered with one prediction) rather than a list."""
        return isinstance(inputs, (str, dict))

    def initialize(self, head: "torch.nn.Module", backbone, tokenizer) -> None:
        """Set the new head's first weights from the base (default: leave the random ones)."""

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """Empty inputs and labels of the shapes a training batch has (the memory estimate runs them on
        the meta device)."""
        shape = (batch_size, seq_len)
        return {"input_ids": torch.empty(shape, dtype=torch.long), "attention_mask": torch.empty(shape, dtype=torch.long),
                "labels": torch.empty(batch_size, dtype=torch.long)}

    # --- predictions ------------------------------------------------------------------------------

    def predict(self, model, inputs: list, probabilities: bool = False, batch_size: int | None = None,
                **kwargs) -> list:
        """Predictions of ``model`` for a list of ``inputs`` (see ``AdaptedModel.predict``)."""
        self.refuse_keywords(kwargs)
        return self.decode(model.logits(inputs, batch_size), probabilities)

    def refuse_keywords(self, kwargs: dict) -> None:
        if kwargs:  # a typo (probabilites=True) must not pass in silence
            raise ConfigError(f"predict() got unknown keyword(s) {sorted(kwargs)}: a {self.kind} head takes "
                              f"`probabilities` and `batch_size` (generate() keywords are for CausalLM heads)")

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
    prompt: str | None = field(default=None, kw_only=True)
    """A template put around every text, with ``{text}`` where the text goes, e.g. ``"Review: {text}\nThe
    review is"``: for decoders, whose last token then reads the text as the task asks (training,
    evaluation and prediction alike)."""
    bias: bool = field(default=True, kw_only=True)
    """A bias in the output layer. Decoders' ``AutoModelForSequenceClassification`` heads have none: train
    with ``bias=False`` to export the model for ``transformers.pipeline`` (``qadapters export``)."""

    def packable(self) -> bool:
        return self.long_text == "truncate"

    def check_prompt(self) -> None:
        check_template(self.prompt)
        if self.prompt is not None and self.long_text != "truncate":
            raise ConfigError("prompt= and long_text='windows' do not combine: each window would need the prompt")

    def prompted(self, texts: list[str]) -> list[str]:
        """``texts`` inside the prompt template (unchanged without one)."""
        return prompted(self.prompt, texts)


def check_template(prompt: str | None) -> None:
    """A head's ``prompt``: None, or text holding ``{text}`` exactly once."""
    if prompt is not None and (not isinstance(prompt, str) or prompt.count("{text}") != 1):
        raise ConfigError(f"prompt={prompt!r} must be text holding {{text}} once, where the input goes")


def prompted(prompt: str | None, texts: list[str]) -> list[str]:
    """``texts`` inside the ``prompt`` template (unchanged without one)."""
    return texts if prompt is None else [prompt.replace("{text}", t) for t in texts]


def tied_input_embedding(backbone, what: str, fix: str = ""):
    """The base's input embedding, which ``what`` uses as its output embedding: only where the two are
    one matrix (``tie_word_embeddings``); a separate LM head is not loaded with a headless base."""
    if not getattr(backbone.config, "tie_word_embeddings", False):
        raise ConfigError(f"{what} needs a base whose output embeddings are its input embeddings "
                          f"(tie_word_embeddings); this one has a separate LM head{fix}")
    return backbone.get_input_embeddings()
