"""``HeadSpec``: what every head kind provides, and the checks its settings share.

A spec says how to encode data rows for its head (``encode``), read a target (``target``), lay rows out
as a batch (``collate``) and run a batch through the model (``logits``: windows, choices and packed rows
are the head's business), its loss, what to gather per example at evaluation (``eval_outputs``) and the
metrics computed from it, and how to turn raw inputs into predictions (``input_rows``, ``predict``,
``decode``). The model, the loaders, the memory estimate and the artifact code ask the spec; none of
them switches on its kind. ``HeadSpec`` is an abstract base class: a kind that misses one of its
abstract methods cannot be built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from adapters.data.encoding import IGNORE, encode_texts
from adapters.errors import ConfigError, DataError
from adapters.heads.layers import POOLINGS, pool_windows

if TYPE_CHECKING:
    from torch import nn

    from adapters.data.encoding import Collator

LONG_TEXT = ("truncate", "windows")
WINDOW_POOLINGS = ("mean", "max")


def _check_labels(labels: Any) -> list[str]:
    if isinstance(labels, str) or not labels or len(labels) < 2:
        raise ConfigError(f"the head needs a list of at least 2 label names, got {labels!r}")
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"label names must be distinct, got {labels}")
    return labels


def _check_common(spec: Any) -> None:
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


def _label_index(labels: list[str], value: Any) -> int:
    """A label given as its name or its id -> its id; anything else is a DataError."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, np.integer)):
        if 0 <= value < len(labels):
            return int(value)
        raise DataError(
            f"label id {value} is out of range: the head has {len(labels)} labels {labels} (ids 0..{len(labels) - 1})"
        )
    try:
        return labels.index(str(value))
    except ValueError:
        raise DataError(
            f"label {value!r} is not one of the head's labels {labels}; add it to the head's labels or fix the data"
        ) from None


class HeadSpec(ABC):
    """What every head spec provides (see the module docstring). Defaults fit the whole-text heads."""

    kind: str
    labels_per_token: ClassVar[bool] = False
    """Labels are per token, aligned with input_ids."""
    problem_type: ClassVar[str | None] = None
    """What transformers' ``AutoModelForSequenceClassification`` calls this head's task, where it has one
    (``qadapters export``)."""
    lm_logits: ClassVar[bool] = False
    """The outputs are the base's own vocabulary-wide LM logits: the base is loaded with its LM head,
    and evaluation batches are kept small."""

    prompt: str | None = None
    """A template around every input text (``{text}`` marks the place); None: texts as they are."""
    messages_column: str | None = None
    """The data column holding chat message lists, for heads that read chats."""
    system_prompt: str | None = None
    """The system message put first in chats that have none, for heads that read chats."""

    # --- the head itself --------------------------------------------------------------------------

    @abstractmethod
    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        """The new head module, on the backbone's last hidden states (``hidden_size`` wide)."""

    @abstractmethod
    def target(self, value: Any) -> Any:
        """One data row's label as the head trains on it (a ``DataError`` naming the fix when it is not one)."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (fp32): ``logits`` against the labels ``loss_targets`` gave."""

    def loss_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The output positions the loss reads (None: every one; ``logits`` then computes only those) and the
        labels ``loss`` compares them with. Default: every position, the labels as collated."""
        return None, labels

    @abstractmethod
    def metrics(self, *outputs: torch.Tensor) -> dict[str, float | int]:
        """Evaluation metrics from what ``eval_outputs`` gathered over the whole evaluation set."""

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list[Any]:
        """Predictions from the head's outputs (``predict``'s default path)."""
        raise NotImplementedError(f"{type(self).__name__} predicts through its own predict()")

    def generated_metrics(self, model: Any, data: Any, text_column: str, label_column: str) -> dict[str, float]:
        """Metrics of what the model produces for ``data``'s rows against their labels, for heads whose
        outputs are not scored by ``metrics`` alone (generated text); none by default."""
        return {}

    def generation_defaults(self) -> dict[str, Any]:
        """``generate`` keywords this head sets (heads that generate text); others refuse generation."""
        raise ConfigError(f"generate() needs a CausalLM head; this model has a {type(self).__name__} head")

    def check_generation(self, model: Any, settings: dict[str, Any]) -> None:
        """Refuse (``ConfigError``) generation settings that ``model`` would fail on, before generating."""
        self.generation_defaults()  # a head that does not generate refuses here

    def reads_windows(self) -> bool:
        """Whether a long text is read as several windows (rows then hold a list of sequences each)."""
        return False

    def resolved_pooling(self, is_decoder: bool) -> str:
        pooling = getattr(self, "pooling", "auto")
        if pooling != "auto":
            return pooling
        return "last" if is_decoder else "mean"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # every kind is a dataclass

    def packable(self) -> bool:
        """One pooled vector per plain row, so rows can be packed without padding (``batching.pack``)."""
        return False

    # --- batches ----------------------------------------------------------------------------------

    def collate(self, rows: list[dict[str, Any]], collator: Collator) -> dict[str, torch.Tensor]:
        """Encoded rows -> one batch (default: one sequence and one label per row)."""
        batch = collator.sequences(rows)
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            # per-token labels are padded with IGNORE on the tokens' side
            batch["labels"] = collator.pad(labels, IGNORE) if self.labels_per_token else torch.tensor(labels)
        return batch

    def logits(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The head's outputs for a collated ``batch`` (labels excluded) through ``model``
        (an ``AdaptedModel``): packed rows (``batching.pack``) give one row per segment."""
        if "segments" in batch:
            return model.packed_logits(batch["input_ids"], batch["position_ids"], batch["segments"])
        return model.sequence_logits(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def regroup(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sequence outputs of a collated ``batch`` -> one output per example (default: the same);
        ``logits`` and the linear probe (``training/probe.py``) both end here."""
        return logits

    # --- data -------------------------------------------------------------------------------------

    def encode(
        self, data: Any, tokenizer: Any, text_column: str, label_column: str | None, max_length: int, what: str
    ) -> tuple[dict[str, list[Any]], int]:
        """Columns of model inputs (and ``labels`` with a ``label_column``) for a ``datasets.Dataset``,
        and the number of rows cut at ``max_length``; one of ``data/encoding.py``'s encoders."""
        return encode_texts(data, tokenizer, self, text_column, label_column, max_length, what)

    def input_rows(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """Unlabeled ``predict`` inputs as data rows (the text under ``"text"``) for ``encode``."""
        return [{"text": x} for x in inputs]

    def is_single(self, inputs: Any) -> bool:
        """Whether ``predict`` was given one input (answered with one prediction) rather than a list."""
        return isinstance(inputs, (str, dict))

    def initialize(self, head: torch.nn.Module, backbone: Any, tokenizer: Any) -> None:  # noqa: B027 - optional, no-op
        """Set the new head's first weights from the base (default: leave the random ones)."""

    def reads_input_embeddings(self) -> bool:
        """Whether ``initialize`` reads rows of the base's input embeddings: a sharded load (``sharding/load.py``)
        then reads the whole table before the head is built."""
        return False

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """Empty inputs and labels of the shapes a training batch has (the memory estimate runs them on
        the meta device)."""
        shape = (batch_size, seq_len)
        return {
            "input_ids": torch.empty(shape, dtype=torch.long),
            "attention_mask": torch.empty(shape, dtype=torch.long),
            "labels": torch.empty(batch_size, dtype=torch.long),
        }

    # --- predictions ------------------------------------------------------------------------------

    def predict(
        self, model: Any, inputs: list[Any], probabilities: bool = False, batch_size: int | None = None, **kwargs: Any
    ) -> list[Any]:
        """Predictions of ``model`` for a list of ``inputs`` (see ``AdaptedModel.predict``)."""
        self.refuse_keywords(kwargs)
        return self.decode(model.logits(inputs, batch_size), probabilities)

    def refuse_keywords(self, kwargs: dict[str, Any]) -> None:
        if kwargs:  # a typo (probabilites=True) must not pass in silence
            raise ConfigError(
                f"predict() got unknown keyword(s) {sorted(kwargs)}: a {self.kind} head takes "
                f"`probabilities` and `batch_size` (generate() keywords are for CausalLM heads)"
            )

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

    def reads_windows(self) -> bool:
        return self.long_text == "windows"

    def collate(self, rows: list[dict[str, Any]], collator: Collator) -> dict[str, torch.Tensor]:
        if not self.reads_windows():
            return super().collate(rows, collator)
        # a variable number of windows per text: flattened, each saying whose it is
        batch = collator.nested(rows)
        batch["window_doc"] = torch.tensor([i for i, r in enumerate(rows) for _ in r["input_ids"]])
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch

    def logits(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        if "window_doc" not in batch:
            return super().logits(model, batch)
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        if ids.shape[0] > self.window_batch:
            logits = self._windows_in_groups(model, ids, mask, types)
        else:
            logits = model.sequence_logits(ids, mask, types)
        return self.regroup(logits, batch)

    def regroup(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """A long text's window logits pooled into one row per text."""
        if "window_doc" not in batch:
            return logits
        return pool_windows(logits, batch["window_doc"], self.window_pooling)

    def _windows_in_groups(self, model: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> torch.Tensor:
        """The windows of a batch's long texts, ``window_batch`` at a time. With gradients, each group
        is checkpointed: only its inputs and logits are kept, and it is recomputed (same dropout
        masks: the RNG state is replayed) when backward reaches it."""
        from torch.utils.checkpoint import checkpoint

        size, parts = self.window_batch, []
        for start in range(0, input_ids.shape[0], size):
            group = (
                input_ids[start : start + size],
                attention_mask[start : start + size],
                None if token_type_ids is None else token_type_ids[start : start + size],
            )
            if torch.is_grad_enabled() and model.training:
                parts.append(checkpoint(model.sequence_logits, *group, use_reentrant=False))
            else:
                parts.append(model.sequence_logits(*group))
        return torch.cat(parts)

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


def tied_input_embedding(backbone: Any, what: str, fix: str = "") -> Any:
    """The base's input embedding, which ``what`` uses as its output embedding: only where the two are
    one matrix (``tie_word_embeddings``); a separate LM head is not loaded with a headless base."""
    if not getattr(backbone.config, "tie_word_embeddings", False):
        raise ConfigError(
            f"{what} needs a base whose output embeddings are its input embeddings "
            f"(tie_word_embeddings); this one has a separate LM head{fix}"
        )
    return backbone.get_input_embeddings()
