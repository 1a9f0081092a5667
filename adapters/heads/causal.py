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
from adapters.heads.metrics import generation_metrics
from adapters.heads.spec import HeadSpec


@dataclass
class CausalLM(HeadSpec):
    """Generate text with the base's own LM head (frozen): only the adapter learns.

    Data: the text column holds the prompt and the label column the response, or a
    ``messages_column`` holds chat messages (the last one, the assistant's, is the response)
    rendered with the tokenizer's chat template. The loss is counted on response tokens only: a chat's
    last assistant message, or every assistant message with ``mask_history=False``.
    """

    messages_column: str = "messages"
    max_new_tokens: int = 64
    """Default length of generated answers in ``predict`` (any ``generate`` kwarg can be passed there)."""
    system_prompt: str | None = None
    """The system message put first in every chat that has none (training, evaluation, prediction). None:
    the chat template decides, and some add a default one of their own (a warning says so and its size)."""
    mask_history: bool = True
    """In chats of several turns, learn the last assistant message only (True), or every assistant message
    (False: a multi-turn conversation teaches each answer in its context; LLaMA-Factory's ``mask_history``,
    TRL's ``assistant_only_loss``). User and system messages are never learned."""
    kind: str = field(default="causal_lm", init=False)
    labels_per_token: ClassVar[bool] = True
    lm_logits: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigError(f"system_prompt={self.system_prompt!r} must be text (or None)")
        if not isinstance(self.mask_history, bool):
            raise ConfigError(f"mask_history={self.mask_history!r} must be True or False")

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
        """The generated text for each prompt (or chat message list); keywords go to ``generate``, checked
        first (an unknown or invalid setting is a ``ConfigError``, not transformers' own error)."""
        if probabilities:
            raise ConfigError("probabilities=True: a CausalLM head generates text, it has no label probabilities")
        self.check_generation(model, generate_kwargs)
        return model.generate(inputs, batch_size or 32, **generate_kwargs)

    def build(self, hidden_size: int, is_decoder: bool) -> nn.Module:
        if not is_decoder:
            raise ConfigError("CausalLM needs a decoder base (an encoder has no next-token head)")
        return nn.Module()  # no new weights: the logits come from the base's LM head

    def target(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise DataError(f"a CausalLM response must be non-empty text, got {value!r}")
        return value

    def loss_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Position t predicts token t + 1, so the loss reads the positions before a response token of any row
        (prompt and padding tokens are IGNORE) and only those are projected onto the vocabulary: a batch of
        long prompts with short answers keeps a fraction of its (batch x length x vocabulary) fp32 logits,
        their log-softmax and their gradient. The memory estimate's meta tensors have no values: there every
        position counts, as when every token is a response token."""
        if labels.is_meta:
            return every_position(labels)
        positions = (labels[:, 1:] != IGNORE).any(0).nonzero().flatten()
        return positions, labels[:, positions + 1]

    def logits(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return model.sequence_logits(batch["input_ids"], batch["attention_mask"], positions=batch.get("loss_positions"))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # the logits of the positions ``loss_targets`` kept, against the tokens they predict
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def eval_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shifted = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none")
        return nll.sum(-1), (shifted != IGNORE).sum(-1)

    def metrics(self, nll: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:  # type: ignore[override]
        loss = float(nll.sum() / tokens.sum().clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "count": int(nll.numel())}

    def generation_defaults(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens}

    def check_generation(self, model: Any, settings: dict[str, Any]) -> None:
        check_generation(model, {**self.generation_defaults(), **settings})

    def generated_metrics(self, model: Any, data: Any, text_column: str, label_column: str) -> dict[str, float]:
        """Greedy answers to the rows' prompts against their reference responses: exact match, token F1,
        ROUGE-L (``metrics.generation_metrics``)."""
        from adapters.data.encoding import as_dataset, prompts_and_responses

        rows = as_dataset(data, "evaluation rows")
        prompts, references = prompts_and_responses(rows, model.tokenizer, self, text_column, label_column)
        inputs = [m for m in rows[self.messages_column]] if prompts is None else prompts
        generated = model.generate(_without_answers(inputs) if prompts is None else inputs)
        return generation_metrics(generated, references)

    def describe(self) -> str:
        return "CausalLM (the base's LM head, frozen)"


def every_position(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``CausalLM.loss_targets`` when every position but the last counts: each predicts the next token."""
    positions = torch.arange(labels.shape[1] - 1, device=labels.device)
    return positions, labels[:, positions + 1]


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def _without_answers(conversations: list[Any]) -> list[Any]:
    """Chat rows for generation: each conversation up to (not including) its last, the assistant's, message."""
    return [m[:-1] for m in conversations]


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# what the sampling code would reject (or silently misuse) only once generation has started
_RANGES = (
    ("max_new_tokens", _positive_int, "a positive integer"),
    ("num_beams", _positive_int, "a positive integer"),
    ("temperature", lambda x: _number(x) and x > 0, "a positive number (leave it out, or do_sample=False, for greedy)"),
    ("top_p", lambda x: _number(x) and 0 < x <= 1, "in (0, 1]"),
    ("top_k", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0, "a non-negative integer"),
    ("repetition_penalty", lambda x: _number(x) and x > 0, "a positive number"),
)


def check_generation(model: Any, settings: dict[str, Any]) -> None:
    """``generate`` settings a ``GenerationConfig`` accepts, checked before any generation: an unknown
    key or an invalid value is a ``ConfigError`` naming it."""
    import warnings

    from transformers import GenerationConfig

    base = getattr(model.backbone, "generation_config", None) or GenerationConfig()  # type: ignore[no-untyped-call]
    known = set(base.to_dict()) | {
        "pad_token_id",
        "eos_token_id",
        "bos_token_id",
        "streamer",
        "logits_processor",
        "stopping_criteria",
        "prefix_allowed_tokens_fn",
        "synced_gpus",
        "assistant_model",
        "negative_prompt_ids",
        "negative_prompt_attention_mask",
    }
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"unknown generation setting(s) {unknown}; the settings are GenerationConfig's "
            f"(max_new_tokens, do_sample, temperature, top_p, top_k, num_beams, ...)"
        )
    for name, valid, rule in _RANGES:
        if name in settings and settings[name] is not None and not valid(settings[name]):
            raise ConfigError(f"generation setting {name}={settings[name]!r}: it must be {rule}")
    config = GenerationConfig(**{**base.to_dict(), **settings})  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # transformers warns about some invalid combinations: refuse them
            config.validate(strict=True)
    except (ValueError, UserWarning) as err:
        raise ConfigError(f"generation settings {settings}: {err}") from None
