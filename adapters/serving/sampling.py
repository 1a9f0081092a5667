"""How one row of the continuous batch picks its next token: its own settings, applied to its own logits.

The settings are OpenAI's and vLLM's (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``presence_penalty``,
``frequency_penalty``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``), applied in
vLLM's order: the penalties on the raw logits, then the temperature, then the truncations. Where transformers
has the processor (repetition penalty, temperature, top-k, top-p, min-p) it is transformers' own class, so a
row is processed exactly as ``generate`` would process it; OpenAI's presence and frequency penalties, which
transformers lacks, subtract from each token already generated as OpenAI documents (``logits[t] -=
presence * (count[t] > 0) + frequency * count[t]``, over the completion's tokens, as vLLM does).

A constrained row (``response_format``) also carries a grammar matcher (``grammar.py``) that masks every token
the grammar does not allow before the penalties run.

Log-probabilities are the model's own: the log-softmax of the raw logits, before any setting (vLLM's default
``raw_logprobs``), so a served logprob equals the in-process model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_LOGPROBS = 20  # the most alternatives a token reports (OpenAI's limit for top_logprobs)
GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily (vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class Sampling:
    """A row's decoding settings; the defaults decode greedily with nothing applied."""

    temperature: float | None = None  # None: greedy unless top_p/top_k/min_p ask to sample; 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # the end of text is masked until this many tokens are generated
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, added to its logit)
    logprobs: int | None = None  # per generated token: its logprob and this many alternatives (None: none)
    prompt_logprobs: int | None = None  # the same for every prompt token (``echo`` with ``logprobs``)

    @property
    def samples(self) -> bool:
        if self.temperature is not None:
            return self.temperature >= GREEDY_BELOW  # OpenAI's temperature 0 is greedy, whatever else is set
        return any(x is not None for x in (self.top_p, self.top_k, self.min_p))

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the argmax of the raw logits."""
        changes = self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
        return not self.samples and not changes

    def processors(self) -> Any:
        """transformers' processors for this row (penalty, then temperature and truncations when sampling)."""
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        chosen: list[Any] = []
        if self.repetition_penalty != 1.0:
            chosen.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.samples:
            if self.temperature is not None and self.temperature != 1.0:
                chosen.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None and self.top_k > 0:
                chosen.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                chosen.append(TopPLogitsWarper(self.top_p))
            if self.min_p is not None and self.min_p > 0:
                chosen.append(MinPLogitsWarper(self.min_p))
        return LogitsProcessorList(chosen)


@dataclass
class TokenLogprob:
    """One token's logprob and its ``top`` alternatives (``(token id, logprob)``, most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def logprob_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` (one position's raw logits) and the ``top`` most likely."""
    logprobs = torch.log_softmax(logits.float(), -1)
    best = logprobs.topk(top) if top else None
    alternatives = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(logits: torch.Tensor, following: list[int], top: int) -> list[TokenLogprob]:
    """The logprob of each of ``following`` (``logits[i]`` predicts ``following[i]``), with ``top`` alternatives."""
    logprobs = torch.log_softmax(logits.float(), -1)
    ids = torch.tensor(following, device=logprobs.device)
    own = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(t, lp) for t, lp in zip(following, own, strict=True)]
    best = logprobs.topk(top, -1)
    pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
    return [
        TokenLogprob(t, lp, list(zip(i, v, strict=True))) for t, lp, (i, v) in zip(following, own, pairs, strict=True)
    ]


def penalised(logits: torch.Tensor, generated: list[int], sampling: Sampling) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on ``logits`` (a float copy), from the completion's counts."""
    if not generated or (sampling.presence_penalty == 0 and sampling.frequency_penalty == 0):
        return logits
    counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1]).to(logits.device, logits.dtype)
    return logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0).to(logits.dtype)


def next_token(
    logits: torch.Tensor,
    prompt: list[int],
    generated: list[int],
    sampling: Sampling,
    processors: Any,
    generator: torch.Generator | None,
    banned: list[int] | None = None,
    restrict: Callable[[torch.Tensor], None] | None = None,
) -> int:
    """The next token of a row from its last raw ``logits``: ``banned`` tokens masked, and whatever
    ``restrict`` (a grammar) masks in place, then the penalties, then greedy or sampled with the row's own
    ``generator``."""
    if sampling.plain_greedy and not banned and restrict is None:
        return int(logits.argmax())  # nothing to apply: no copy to the CPU
    scores = logits.float().cpu().clone()[None]  # the raw logits stay as they are, for the logprobs
    if banned:
        scores[0, banned] = -float("inf")
    for token, bias in sampling.logit_bias:
        scores[0, token] += bias
    if restrict is not None:
        restrict(scores)
    scores = penalised(scores, generated, sampling)
    if len(processors):
        scores = processors(torch.tensor([prompt + generated]), scores)
    if not sampling.samples:
        return int(scores[0].argmax())
    probs = torch.softmax(scores[0], -1)
    return int(torch.multinomial(probs, 1, generator=generator))
