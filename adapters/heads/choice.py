"""``MultipleChoice``: a context and N candidate texts; each (context, choice) pair is scored, the
scores compete in one softmax.

Two ways to score a pair. ``scoring="head"``: a new linear layer reads the pooled pair, as BERT's
SWAG/RACE heads do; it starts random, so the model learns the task from the training rows alone.
``scoring="likelihood"``: the score is the mean log-probability the base itself gives the choice's
tokens after the context, with its own (tied) output embedding, as language-model evaluations
score multiple choice (GPT-3's few-shot paper, Brown et al. 2020; EleutherAI's lm-evaluation-harness).
A decoder then starts as its zero-shot chooser, and training (cross-entropy over the choices'
scores) moves the adapter from there; no new weights are added. Scoring computes the vocabulary
logits at the choice's positions only, not at every position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.data.encoding import IGNORE, encode_choices
from adapters.errors import ConfigError, DataError
from adapters.heads.layers import ChoiceLikelihood, SequenceHead
from adapters.heads.spec import HeadSpec, _check_common, check_template, prompted, tied_input_embedding

SCORINGS = ("head", "likelihood")
CHOICE_TOKENS = 8  # choice tokens per sequence in the memory estimate's example batch


@dataclass
class MultipleChoice(HeadSpec):
    """Pick the right one of ``num_choices`` candidates for a context (CaseHOLD-style).

    Data: the text column holds the context, ``choices_column`` a list of ``num_choices``
    candidate texts, the label column the index of the right one. Each (context, candidate) pair
    is encoded as one sequence and scored (``scoring``, see the module docstring); the scores are
    compared with a softmax over the candidates.
    """

    num_choices: int
    choices_column: str = "choices"
    pooling: str = "auto"
    dropout: float = 0.1
    scoring: str = "head"
    """``"head"``: a new linear layer on the pooled pair. ``"likelihood"``: the base's own mean
    log-probability of the choice after the context (a decoder with tied embeddings; no new weights)."""
    prompt: str | None = None
    """A template around the context with ``{text}`` where it goes, e.g. ``"{text}\nThe licence is"``;
    with ``"likelihood"`` the choice follows it after one space. Long contexts are cut, never the
    template or the choice."""
    kind: str = field(default="multiple_choice", init=False)

    def __post_init__(self) -> None:
        _check_common(self)
        if not isinstance(self.num_choices, int) or self.num_choices < 2:
            raise ConfigError(f"num_choices={self.num_choices!r} must be an integer >= 2")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring={self.scoring!r} must be one of {SCORINGS}")
        check_template(self.prompt)

    def prompted(self, texts: list[str]) -> list[str]:
        return prompted(self.prompt, texts)

    def encode(self, data: Any, tokenizer: Any, text_column: Any, label_column: Any, max_length: Any, what: Any) -> Any:
        return encode_choices(data, tokenizer, self, text_column, label_column, max_length, what)

    def input_rows(self, inputs: list[Any]) -> list[dict[str, Any]]:
        return [{"text": r["context"], self.choices_column: r["choices"]} for r in inputs]

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        shape = (batch_size, self.num_choices, seq_len)
        batch = {
            "input_ids": torch.empty(shape, dtype=torch.long),
            "attention_mask": torch.empty(shape, dtype=torch.long),
            "labels": torch.empty(batch_size, dtype=torch.long),
        }
        if self.scoring == "likelihood":
            scored = (batch_size, self.num_choices, min(CHOICE_TOKENS, seq_len - 1))
            batch.update(
                choice_index=torch.zeros(scored, dtype=torch.long),
                choice_targets=torch.full(scored, IGNORE, dtype=torch.long),
            )
        return batch

    def collate(self, rows: list[dict[str, Any]], collator: Any) -> dict[str, torch.Tensor]:
        """(batch, choices, length) tokens: every (context, choice) sequence, padded together."""
        k = len(rows[0]["input_ids"])
        if "choice_start" in rows[0]:  # scored by the base's likelihood
            batch = self._scored_choices(rows, collator)
        else:
            batch = {key: value.view(len(rows), k, -1) for key, value in collator.nested(rows).items()}
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch

    @staticmethod
    def _scored_choices(rows: list[dict[str, Any]], collator: Any) -> dict[str, torch.Tensor]:
        """Tokens and masks, plus for every sequence the positions that predict its choice's tokens
        (``choice_index``) and those tokens (``choice_targets``, ``IGNORE`` as filler), counted in the
        padded sequence, so the head gathers them with fixed shapes."""
        sequences = [seq for r in rows for seq in r["input_ids"]]
        starts = [s for r in rows for s in r["choice_start"]]
        longest, left = max(map(len, sequences)), collator.tokenizer.padding_side == "left"
        width = max(len(seq) - s for seq, s in zip(sequences, starts, strict=False))
        index, targets = [], []
        for seq, start in zip(sequences, starts, strict=False):
            shift, n = (longest - len(seq) if left else 0), len(seq) - start
            index.append([shift + start - 1 + t for t in range(n)] + [0] * (width - n))
            targets.append(seq[start:] + [IGNORE] * (width - n))
        k = len(rows[0]["input_ids"])
        return {
            "input_ids": collator.pad(sequences, collator.tokenizer.pad_token_id).view(len(rows), k, -1),
            "attention_mask": collator.pad([[1] * len(s) for s in sequences], 0).view(len(rows), k, -1),
            "choice_index": torch.tensor(index).view(len(rows), k, -1),
            "choice_targets": torch.tensor(targets).view(len(rows), k, -1),
        }

    def logits(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Every (context, choice) sequence scored as one row, then regrouped: (batch, choices)."""
        flat = {key: value.flatten(0, 1) for key, value in batch.items()}
        scored = {key: flat[key] for key in ("choice_index", "choice_targets") if key in flat}
        logits = model.sequence_logits(flat["input_ids"], flat["attention_mask"], flat.get("token_type_ids"), scored)
        return self.regroup(logits, batch)

    def regroup(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """One score per (context, choice) sequence -> (batch, choices)."""
        return logits.view(-1, batch["input_ids"].shape[1])

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        if self.scoring == "likelihood":
            if not is_decoder:
                raise ConfigError(
                    "scoring='likelihood' needs a decoder (an encoder has no next-token scores); use scoring='head'"
                )
            return ChoiceLikelihood()
        return SequenceHead(hidden_size, 1, self.resolved_pooling(is_decoder), self.dropout)

    def initialize(self, head: nn.Module, backbone: Any, tokenizer: Any) -> None:
        """With ``"likelihood"``: the head scores with the base's output embedding (tied to its input one)."""
        if self.scoring != "likelihood":
            return
        embedding = tied_input_embedding(backbone, "scoring='likelihood'", fix=": use scoring='head'")
        cast(ChoiceLikelihood, head).use_embedding(embedding)

    def describe(self) -> str:
        how = "the base's likelihood" if self.scoring == "likelihood" else "a new linear head"
        return f"MultipleChoice ({self.num_choices} choices, scored by {how})"

    def target(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < self.num_choices:
            raise DataError(
                f"a MultipleChoice target is the index of the right choice, 0..{self.num_choices - 1}; got {value!r}"
            )
        return int(value)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:  # type: ignore[override]
        return {
            "accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "count": int(labels.numel()),
            "loss": float(self.loss(logits, labels)),
        }

    def decode(self, logits: torch.Tensor, probabilities: bool) -> list[Any]:
        best = logits.argmax(-1).tolist()
        if not probabilities:
            return best
        return [(b, p.tolist()) for b, p in zip(best, logits.float().softmax(-1), strict=False)]
