"""AdaptedModel = frozen (quantized) backbone + trainable adapter + task head.

``adapt`` builds one; ``AdaptedModel.forward`` runs backbone -> head (and the loss when
labels are given); ``predict`` maps raw texts to labels. Saving and loading live in
``artifact.py``.
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
from .heads import Classification
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
        # Decoders get positions counted from the first real token, so a left-padded text sees
        # the same positions as unpadded (what generate() does); encoders are right-padded.
        forward_args = inspect.signature(self.base_model.forward).parameters
        self._positions_from_mask = backbone.is_decoder and "position_ids" in forward_args

    @property
    def base_model(self) -> nn.Module:
        """The plain transformers backbone, under any peft wrapping."""
        return self.body.get_base_model() if hasattr(self.body, "get_base_model") else self.body

    @property
    def tokenizer(self):
        return self.backbone_info.tokenizer

    @property
    def device(self) -> torch.device:
        return self.head.score.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        extra = {}
        if self._positions_from_mask:
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        logits = self.head(hidden, attention_mask)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = self.head_spec.loss(logits, labels)
        return out

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
            ("head", f"{type(self.head_spec).__name__} ({self.head_spec.num_labels} labels, "
                     f"pooling={self.head.pooling})"),
            ("trainable params", f"{counts['trainable']:,} ({100 * counts['trainable'] / counts['total']:.3f}%)"),
            ("total params", f"{counts['total']:,}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Raw head outputs for ``texts``, in eval mode, batch by batch."""
        was_training = self.training
        self.eval()
        try:
            out = [self(**self.encode(texts[i:i + batch_size]))["logits"].float().cpu()
                   for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out)

    def predict(self, texts: str | list[str], probabilities: bool = False, batch_size: int = 32) -> Any:
        """Labels for ``texts`` (a list, or one label for one string); with ``probabilities=True``
        a list of ``(label, {label: probability})`` pairs instead."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            return []
        probs = self.logits(texts, batch_size).softmax(-1)
        labels = [self.head_spec.labels[i] for i in probs.argmax(-1).tolist()]
        result: list = labels
        if probabilities:
            result = [(label, dict(zip(self.head_spec.labels, p.tolist()))) for label, p in zip(labels, probs)]
        return result[0] if single else result

    def save_pretrained(self, path, overwrite: bool = False) -> None:
        """Write the trainable part (adapter + head) and the spec to ``path``; see ``artifact.py``."""
        from .artifact import save_artifact

        save_artifact(self, path, overwrite=overwrite)


def adapt(
    model: str,
    adapter: LoRA | Bottleneck | None = None,
    head: Classification | None = None,
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
    if not isinstance(head, Classification):
        raise ConfigError(f"head must be a head spec such as adapters.Classification, got {type(head).__name__}")
    if adapter is not None and not isinstance(adapter, ADAPTERS):
        raise ConfigError(f"adapter must be one of {[a.__name__ for a in ADAPTERS]} or None, got {type(adapter).__name__}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length={max_length} must be at least 2 tokens")
    backbone = load_backbone(model, quantization, dtype, device, double_quant, trust_remote_code, padding_side)
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
            body = apply_lora(body, adapter, model)
        elif isinstance(adapter, Bottleneck):
            bottleneck = BottleneckLayers(body, adapter, backbone.hidden_size)
        head_module = head.build(backbone.hidden_size, backbone.is_decoder)
    head_module.to(next(backbone.model.parameters()).device)
    return AdaptedModel(backbone, body, adapter, head, head_module, max_length,
                        dtype if isinstance(dtype, str) or dtype is None else str(dtype).replace("torch.", ""),
                        bottleneck)
