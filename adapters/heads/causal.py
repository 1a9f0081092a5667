"""``CausalLM``: generate text with the base's own LM head (frozen); only the adapter learns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapters.data.encoding import IGNORE, encode_causal
from adapters.errors import ConfigError, DataError
from adapters.heads.spec import HeadSpec


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
    labels_per_token: ClassVar[bool] = True
    lm_logits: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")

    def encode(self, data: Any, tokenizer: Any, text_column: Any, label_column: Any, max_length: Any, what: Any) -> Any:
        return encode_causal(data, tokenizer, self, text_column, label_column, max_length, what)

    def input_rows(self, inputs: list[Any]) -> list[dict[str, Any]]:
        if inputs and isinstance(inputs[0], list):  # chat message lists
            return [{self.messages_column: m} for m in inputs]
        return [{"text": x} for x in inputs]

    def is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, (str, dict)) or _is_messages(inputs)

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        batch = super().example_batch(batch_size, seq_len)
        batch["labels"] = torch.empty(batch_size, seq_len, dtype=torch.long)
        return batch

    def predict(
        self,
        model: Any,
        inputs: list[Any],
        probabilities: bool = False,
        batch_size: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """The generated text for each prompt (or chat message list); keywords go to ``generate``."""
        return model.generate(inputs, batch_size or 32, **generate_kwargs)

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        if not is_decoder:
            raise ConfigError("CausalLM needs a decoder base (an encoder has no next-token head)")
        return nn.Module()  # no new weights: the logits come from the base's LM head

    def target(self, value: Any) -> str:
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

    def metrics(self, nll: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:  # type: ignore[override]
        loss = float(nll.sum() / tokens.sum().clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "count": int(nll.numel())}

    def generation_defaults(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens}

    def describe(self) -> str:
        return "CausalLM (the base's LM head, frozen)"


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)
