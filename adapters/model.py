"""AdaptedModel = frozen (quantized) backbone + trainable adapter + task head.

``adapt`` builds one; ``AdaptedModel.forward`` runs backbone -> head (and the loss when
labels are given); ``predict`` maps raw inputs to the head's predictions. Saving and loading
live in ``artifact.py``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .base import Backbone, load_backbone
from .bottleneck import Bottleneck, BottleneckLayers
from .errors import ConfigError
from .heads import HeadSpec, pool_windows
from .lora import LoRA, apply_lora

ADAPTERS = (LoRA, Bottleneck)


class AdaptedModel(nn.Module):
    """A backbone with an adapter and a head; only adapter and head parameters train."""

    def __init__(self, backbone: Backbone, body: nn.Module, adapter, head_spec, head: nn.Module,
                 max_length: int, dtype_arg: str | None, bottleneck: BottleneckLayers | None = None):
        super().__init__()
        self.body = body  # the backbone, wrapped by peft when the adapter is LoRA
        self.bottleneck = bottleneck  # bottleneck adapters, hooked into the body's projections
        self.head = head
        self.backbone_info = backbone
        self.adapter = adapter
        self.head_spec = head_spec
        self.max_length = max_length
        self.dtype_arg = dtype_arg  # what the user asked for (None = per device), saved as is
        self.training_record: dict | None = None  # set by train(): metrics, data sizes, settings
        # Decoders get positions counted from the first real token, so a left-padded text sees
        # the same positions as unpadded (what generate() does); encoders are right-padded.
        forward_args = inspect.signature(self.base_model.forward).parameters
        self._positions_from_mask = backbone.is_decoder and "position_ids" in forward_args
        # no KV cache: nothing here generates, the cache would hold every layer's keys and values, and
        # with it transformers does not detect packed rows
        self._no_cache = {"use_cache": False} if "use_cache" in forward_args else {}

    @property
    def base_model(self) -> nn.Module:
        """The plain transformers backbone, under any peft wrapping."""
        return self.body.get_base_model() if hasattr(self.body, "get_base_model") else self.body

    @property
    def tokenizer(self):
        return self.backbone_info.tokenizer

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def _positions(self, attention_mask: torch.Tensor) -> dict:
        if not self._positions_from_mask:
            return {}
        return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                window_doc: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segments: torch.Tensor | None = None):
        """Logits for the head (and ``loss`` with ``labels``). Multiple-choice inputs are
        (batch, choices, length): every (context, choice) sequence is scored, then regrouped.
        With ``window_doc`` the rows are windows of longer texts (``window_doc[i]`` = the text of
        window i): their logits are pooled per text. ``token_type_ids`` (BERT's segment ids of
        text pairs) are passed on when given. Packed rows (``batching.pack``) come with
        ``position_ids`` and ``segments`` instead of an attention mask: one logit row per segment."""
        if segments is not None:
            out = self.body(input_ids=input_ids, position_ids=position_ids, **self._no_cache)
            logits = self.head(out.last_hidden_state, None, segments)
            return {"logits": logits, **({"loss": self.head_spec.loss(logits, labels)} if labels is not None else {})}
        choices = input_ids.shape[1] if input_ids.dim() == 3 else None
        if choices:
            input_ids, attention_mask = input_ids.flatten(0, 1), attention_mask.flatten(0, 1)
            token_type_ids = token_type_ids.flatten(0, 1) if token_type_ids is not None else None
        if window_doc is not None and input_ids.shape[0] > self.head_spec.window_batch:
            logits = self._windows_in_groups(input_ids, attention_mask, token_type_ids)
        else:
            logits = self._sequence_logits(input_ids, attention_mask, token_type_ids)
        if choices:
            logits = logits.view(-1, choices)
        if window_doc is not None:
            logits = pool_windows(logits, window_doc, self.head_spec.window_pooling)
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = self.head_spec.loss(logits, labels)
        return result

    def _sequence_logits(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Backbone -> head for a batch of sequences."""
        extra = self._positions(attention_mask)
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, **extra, **self._no_cache)
        if self.head_spec.kind == "causal_lm":
            return out.logits
        return self.head(out.last_hidden_state, attention_mask)

    def _windows_in_groups(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """The windows of a batch's long texts, ``window_batch`` at a time. With gradients, each group
        is checkpointed: only its inputs and logits are kept, and it is recomputed (same dropout
        masks: the RNG state is replayed) when backward reaches it."""
        from torch.utils.checkpoint import checkpoint

        size, parts = self.head_spec.window_batch, []
        for start in range(0, input_ids.shape[0], size):
            group = (input_ids[start:start + size], attention_mask[start:start + size],
                     None if token_type_ids is None else token_type_ids[start:start + size])
            if torch.is_grad_enabled() and self.training:
                parts.append(checkpoint(self._sequence_logits, *group, use_reentrant=False))
            else:
                parts.append(self._sequence_logits(*group))
        return torch.cat(parts)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts (4-bit weights counted as the values they hold)."""
        total = trainable = 0
        for p in self.parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
                n = int(getattr(p, "quant_state", None).shape.numel()) if getattr(p, "quant_state", None) else n * 2
            total += n
            trainable += n if p.requires_grad else 0
        return {"trainable": trainable, "total": total}

    def summary(self) -> str:
        counts = self.parameter_counts()
        adapter = type(self.adapter).__name__ if self.adapter else "none (head only)"
        rows = [
            ("base", f"{self.backbone_info.source} ({'decoder' if self.backbone_info.is_decoder else 'encoder'})"),
            ("quantization", self.backbone_info.quantization or "none"),
            ("compute dtype", str(self.backbone_info.compute_dtype).replace("torch.", "")),
            ("device", str(self.device)),
            ("adapter", f"{adapter} {self.adapter.to_dict() if self.adapter else ''}".strip()),
            ("head", self.head_spec.describe() + (f", pooling={self.head.pooling}" if hasattr(self.head, "pooling") else "")),
            ("trainable params", f"{counts['trainable']:,} ({100 * counts['trainable'] / counts['total']:.3f}%)"),
            ("total params", f"{counts['total']:,}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def _encoded_rows(self, inputs: list) -> list[dict]:
        """Unlabeled ``inputs`` (texts; word lists; {context, choices} dicts; prompts or chat message
        lists) as encoded rows, one dict per input."""
        from .data import encode_rows

        kind = self.head_spec.kind
        if kind == "multiple_choice":
            rows = [{"text": r["context"], self.head_spec.choices_column: r["choices"]} for r in inputs]
        elif kind == "causal_lm" and inputs and isinstance(inputs[0], list):
            rows = [{self.head_spec.messages_column: m} for m in inputs]
        else:
            rows = [{"text": x} for x in inputs]
        columns, _ = encode_rows(rows, self.tokenizer, self.head_spec, "text", None, self.max_length, "inputs")
        return [dict(zip(columns, v)) for v in zip(*columns.values())]

    def encode(self, inputs: list) -> dict[str, torch.Tensor]:
        """Model inputs for unlabeled ``inputs`` (see ``_encoded_rows``), padded, on the model's device."""
        from .data import Collator

        batch = Collator(self.tokenizer, self.head_spec)(self._encoded_rows(inputs))
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def logits(self, inputs: list, batch_size: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Raw head outputs for ``inputs``, in eval mode, in the caller's order (a list of per-input
        tensors for per-token heads, whose lengths differ). Inputs run sorted by length, in batches of
        ``batch_size`` rows or, by default, of up to 8,192 padded tokens (``batching.py``)."""
        from .batching import inference_batches, row_length
        from .data import Collator

        rows = self._encoded_rows(inputs)
        if batch_size is None and self.head_spec.kind == "causal_lm":
            batch_size = 32  # logits span the vocabulary
        batches = inference_batches([row_length(r["input_ids"]) for r in rows], batch_size)
        collate = Collator(self.tokenizer, self.head_spec)
        out: list = [None] * len(rows)
        was_training = self.training
        self.eval()
        try:
            for chunk in batches:
                batch = {k: v.to(self.device) for k, v in collate([rows[i] for i in chunk]).items()}
                for i, row in zip(chunk, self(**batch)["logits"].float().cpu()):
                    out[i] = row
        finally:
            self.train(was_training)
        if self.head_spec.sequence_labels:
            return out
        return torch.stack(out)

    def predict(self, inputs, probabilities: bool = False, batch_size: int | None = None, **generate_kwargs) -> Any:
        """Predictions for ``inputs`` (a list, or one input for one prediction):

        * Classification: label names (``probabilities=True``: ``(label, {label: p})`` pairs);
        * MultiLabel: lists of label names (with probabilities: ``(labels, {label: p})``);
        * Regression: floats (lists of floats for several outputs);
        * MultipleChoice: inputs ``{"context": ..., "choices": [...]}``, the index of the chosen one
          (with probabilities: ``(index, [p per choice])``);
        * TokenClassification: a list of inputs, each a word list (or a text, split on whitespace);
          one tag per word;
        * CausalLM: inputs are prompts (or chat message lists); the generated text.
          ``generate_kwargs`` go to ``transformers``' ``generate``.
        """
        kind = self.head_spec.kind
        if generate_kwargs and kind != "causal_lm":  # a typo (probabilites=True) must not pass in silence
            raise ConfigError(f"predict() got unknown keyword(s) {sorted(generate_kwargs)}: a {kind} head takes "
                              f"`probabilities` and `batch_size` (generate() keywords are for CausalLM heads)")
        single = isinstance(inputs, (str, dict)) or (kind == "causal_lm" and _is_messages(inputs))
        inputs = [inputs] if single else list(inputs)
        if not inputs:
            return []
        if kind == "token_classification":
            inputs = [x.split() if isinstance(x, str) else list(x) for x in inputs]
            result = self._predict_tags(inputs, batch_size or 256)
        elif kind == "causal_lm":
            result = self._generate(inputs, batch_size or 32, generate_kwargs)
        else:
            result = self.head_spec.decode(self.logits(inputs, batch_size), probabilities)
        return result[0] if single else result

    def _predict_tags(self, words: list[list[str]], batch_size: int) -> list[list[str]]:
        labels = self.head_spec.labels
        out = []
        for i in range(0, len(words), batch_size):
            chunk = words[i:i + batch_size]
            encoded = self.tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=self.max_length)
            logits = self.logits(chunk, batch_size)
            left = self.tokenizer.padding_side == "left"
            for j, row in enumerate(chunk):
                word_ids = encoded.word_ids(j)
                row_logits = logits[j][-len(word_ids):] if left else logits[j][:len(word_ids)]
                tags, previous = [None] * len(row), None
                for position, wid in enumerate(word_ids):
                    if wid is not None and wid != previous:
                        tags[wid] = labels[int(row_logits[position].argmax())]
                    previous = wid
                out.append(tags)  # words cut by max_length keep None: they were never seen
        return out

    @torch.no_grad()
    def _generate(self, prompts: list, batch_size: int, generate_kwargs: dict) -> list[str]:
        kwargs = {"max_new_tokens": self.head_spec.max_new_tokens, "do_sample": False,
                  "pad_token_id": self.tokenizer.pad_token_id, **generate_kwargs}
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"  # generation appends on the right
        was_training = self.training
        self.eval()
        try:
            texts = []
            for i in range(0, len(prompts), batch_size):
                batch = self.encode(prompts[i:i + batch_size])
                generated = self.body.generate(**batch, **kwargs)
                new = generated[:, batch["input_ids"].shape[1]:]
                texts += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        finally:
            self.tokenizer.padding_side = side
            self.train(was_training)
        return texts

    def save_pretrained(self, path, overwrite: bool = False) -> None:
        """Write the trainable part (adapter + head) and the spec to ``path``; see ``artifact.py``."""
        from .artifact import save_artifact

        save_artifact(self, path, overwrite=overwrite)


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def adapt(
    model: str,
    adapter: LoRA | Bottleneck | None = None,
    head: HeadSpec | None = None,
    quantization: str | None = "nf4",
    dtype: str | None = None,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    padding_side: str | None = None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    seed: int | None = 0,
) -> AdaptedModel:
    """Load ``model`` frozen (and quantized), add ``adapter`` and a new ``head``.

    ``model``: a packaged name (``"smollm2-135m"``, ``"minilm-l6"``), a local HF folder or a hub id.
    ``adapter``: ``LoRA(...)``, ``Bottleneck(...)``, or ``None`` to train the head only.
    ``quantization``: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``None``; ``dtype`` overrides the compute
    dtype (default: float32 on CPU, bfloat16 on capable GPUs).
    ``seed`` makes the new adapter and head weights reproducible (without touching global RNG).
    """
    if head is None:
        raise ConfigError("adapt() needs a head, e.g. head=adapters.Classification(labels=['neg', 'pos'])")
    if not isinstance(head, HeadSpec):
        raise ConfigError(f"head must be a head spec such as adapters.Classification, got {type(head).__name__}")
    if adapter is not None and not isinstance(adapter, ADAPTERS):
        raise ConfigError(f"adapter must be one of {[a.__name__ for a in ADAPTERS]} or None, got {type(adapter).__name__}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length={max_length} must be at least 2 tokens")
    backbone = load_backbone(model, quantization, dtype, device, double_quant, trust_remote_code, padding_side,
                             with_lm_head=head.kind == "causal_lm")
    limit = min(getattr(backbone.model.config, "max_position_embeddings", 512) or 512,
                backbone.tokenizer.model_max_length or 512)
    if max_length is None:
        max_length = min(limit, 512)
    elif max_length > limit:
        raise ConfigError(f"max_length={max_length} exceeds what {model!r} accepts ({limit} tokens)")

    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        body, bottleneck = backbone.model, None
        if isinstance(adapter, LoRA):
            body = apply_lora(body, adapter, backbone.location)
        elif isinstance(adapter, Bottleneck):
            bottleneck = BottleneckLayers(body, adapter, backbone.hidden_size)
        head_module = head.build(backbone.hidden_size, backbone.is_decoder)
    head_module.to(next(backbone.model.parameters()).device)
    return AdaptedModel(backbone, body, adapter, head, head_module, max_length,
                        dtype if isinstance(dtype, str) or dtype is None else str(dtype).replace("torch.", ""),
                        bottleneck)
