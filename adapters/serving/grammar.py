"""Constrained decoding for ``response_format``: a row may only pick tokens that keep its text a prefix of an
answer to the JSON schema, so the answer parses and follows the schema however small the model.

The grammar engine is xgrammar's (Dong et al., 2024, "XGrammar: flexible and efficient structured generation",
the engine vLLM and SGLang use): a JSON schema compiles to a pushdown automaton whose token masks are mostly
precomputed. It was chosen by measurement on CPU (``benchmarks/constrained.py``): on SmolLM2's 49k-token
vocabulary a schema compiles in ~1-5 ms and a token's mask costs ~0.2-0.3 ms, against llguidance's 74 ms per token
on a schema's first answer (its lexer is built lazily) and lm-format-enforcer, which does not import with
transformers 5. The tokenizer's table is built once per served base (~150 ms) and shared by every request.

Answers are compact JSON (no free whitespace between tokens): a small model that may put a newline anywhere
otherwise fills ``max_tokens`` with them.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from adapters.errors import ConfigError

_COMPILERS: dict[tuple[int, int], Any] = {}
_LOCK = threading.Lock()


def available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def _compiler(tokenizer: Any, vocabulary: int, stops: list[int]) -> Any:
    """The grammar compiler of ``tokenizer`` (its token table built once per served base)."""
    import xgrammar as xgr

    key = (id(tokenizer), vocabulary)
    with _LOCK:
        if key not in _COMPILERS:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocabulary, stop_token_ids=stops)
            _COMPILERS[key] = xgr.GrammarCompiler(info)
        return _COMPILERS[key]


class Constraint:
    """One row's grammar: masks the tokens it does not allow, follows the tokens picked."""

    def __init__(self, compiled: Any, vocabulary: int):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.mask = xgr.allocate_token_bitmask(1, vocabulary)
        self.vocabulary = vocabulary

    def restrict(self, scores: torch.Tensor) -> None:
        """Every token the grammar does not allow next gets ``-inf`` in ``scores`` (1 x vocabulary, CPU, float)."""
        import xgrammar as xgr

        self.matcher.fill_next_token_bitmask(self.mask)
        xgr.apply_token_bitmask_inplace(scores, self.mask, vocab_size=self.vocabulary)

    def can_start(self) -> bool:
        """Whether some token of the vocabulary may begin the answer (a word-level vocabulary cannot spell ``{``)."""
        scores = torch.zeros(1, self.vocabulary)
        self.restrict(scores)
        return bool(torch.isfinite(scores).any())

    def accept(self, token: int) -> bool:
        """Follow ``token``; True when the grammar is complete and nothing may follow."""
        self.matcher.accept_token(token)
        return bool(self.matcher.is_terminated())


def compile_schema(schema: dict[str, Any], tokenizer: Any, vocabulary: int, stops: list[int]) -> Any:
    """``schema`` compiled for ``tokenizer``; ``ConfigError`` when xgrammar is missing or the schema is invalid."""
    if not available():
        raise ConfigError("response_format needs xgrammar: pip install 'qadapters[structured]'")
    try:
        return _compiler(tokenizer, vocabulary, stops).compile_json_schema(json.dumps(schema), any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ConfigError(f"response_format's JSON schema cannot be compiled: {err}") from None
