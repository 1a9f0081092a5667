"""The head modules (full precision, never quantized) and how they pool per-token states.

Pooling turns per-token states into one vector per text and must fit the base: a decoder sees
only the left context, so only its last real token has read the whole text (``"last"``); an
encoder is bidirectional, so the mean of its tokens (``"mean"``) or its first token
(``"first"``, BERT's [CLS]) work. Positions come from the attention mask, so left and right
padding give the same result; packed rows (``batching.pack``) are pooled per segment.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.errors import ConfigError

POOLINGS = ("auto", "last", "first", "mean")


def pool_windows(logits: torch.Tensor, document: torch.Tensor, method: str) -> torch.Tensor:
    """Per-window logits (windows, outputs) -> per-document logits, ``document`` giving each
    window's row in the batch: the mean or the max over each document's windows."""
    count = int(document.max()) + 1
    index = document.unsqueeze(-1).expand_as(logits)
    if method == "max":
        return torch.full(
            (count, logits.shape[-1]), float("-inf"), dtype=logits.dtype, device=logits.device
        ).scatter_reduce(0, index, logits, "amax")
    sums = torch.zeros(count, logits.shape[-1], dtype=logits.dtype, device=logits.device).index_add(0, document, logits)
    return sums / torch.bincount(document, minlength=count).unsqueeze(-1).to(logits.dtype)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, method: str) -> torch.Tensor:
    """Reduce ``hidden`` (batch, seq, dim) to (batch, dim) over the tokens the mask keeps (all without one)."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
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

    def __init__(self, hidden_size: int, outputs: int, pooling: str, dropout: float, bias: bool = True):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, outputs, bias=bias)
        nn.init.normal_(self.score.weight, std=0.02)
        if bias:
            nn.init.zeros_(self.score.bias)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        pooled = (
            pool(hidden, attention_mask, self.pooling)
            if segments is None
            else pool_segments(hidden, segments, self.pooling)
        )
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


class ChoiceLikelihood(nn.Module):
    """A choice's score: the mean log-probability of its tokens under the base's own next-token
    scores (hidden state @ output embedding). No weights of its own: it borrows the base's embedding
    (``use_embedding``), kept out of this module's parameters so it is neither saved with the head
    nor trained."""

    pooling = "choice tokens"

    def __init__(self) -> None:
        super().__init__()
        self._embedding: list[nn.Embedding] = []  # a list hides the module from nn.Module's registry

    def use_embedding(self, embedding: nn.Embedding) -> None:
        self._embedding[:] = [embedding]

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        choice_index: torch.Tensor,
        choice_targets: torch.Tensor,
    ) -> torch.Tensor:
        """(sequences, length, dim) states -> (sequences, 1) scores. ``choice_index[i, k]`` is the position
        whose state predicts ``choice_targets[i, k]``, the choice's k-th token (``IGNORE``: filler)."""
        if not self._embedding:
            raise ConfigError("ChoiceLikelihood has no output embedding: MultipleChoice.initialize sets it")
        weight = self._embedding[0].weight
        states = hidden.gather(1, choice_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        log_probs = torch.log_softmax((states.to(weight.dtype) @ weight.T).float(), dim=-1)
        real = choice_targets >= 0
        picked = log_probs.gather(-1, choice_targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * real
        return (picked.sum(-1) / real.sum(-1).clamp(min=1)).unsqueeze(-1)
