"""AdaptedModel = frozen (quantized) backbone + trainable adapter + task head.

``adapt`` builds one; ``AdaptedModel.forward`` runs backbone -> head (and the loss when
labels are given); ``predict`` maps raw inputs to the head's predictions (the head spec says how).
``save_pretrained`` writes an artifact (the format is ``artifacts/format.py``'s) and ``from_pretrained``
(``adapters.load``) rebuilds the model from one.

Names: ``backbone`` is the frozen transformers network (an adapter kind may put its layers inside it);
``adapter_layers`` holds the modules an adapter kind keeps outside it (registered, so they move, count
and save with the model); ``adapter_state`` is the kind's own bookkeeping (e.g. peft's wrapper), which
nothing but the kind reads; ``head`` is the task head; ``base`` says what the backbone is (source,
quantization, compute dtype, tokenizer: ``BackboneInfo``).
"""

from __future__ import annotations

import inspect
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters.artifacts.format import HEAD_FILE, open_artifact, save_artifact
from adapters.backbone.loading import (
    BackboneInfo,
    LoadPlan,
    dtype_name,
    eval_mode,
    load_planned,
    plan_load,
    resolve_source,
)
from adapters.backbone.sharded import inference_context
from adapters.backbone.weight_files import WeightFiles
from adapters.data.batching import inference_batches, packable, row_length
from adapters.data.encoding import Collator, encode_rows
from adapters.errors import ConfigError
from adapters.files import check_state
from adapters.heads import HeadSpec
from adapters.methods.spec import AdapterSpec
from adapters.registry import ADAPTERS
from adapters.sharding.fsdp import ShardReport, check_fsdp
from adapters.sharding.load import ShardedLoad, launched_world, open_sharded, shard_loaded, weight_files


class AdaptedModel(nn.Module):
    """A backbone with an adapter and a head; only adapter and head parameters train."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        base: BackboneInfo,
        adapter: AdapterSpec | None,
        head_spec: HeadSpec,
        max_length: int,
        dtype_arg: str | None,
    ):
        super().__init__()
        self.backbone = backbone  # the frozen transformers network; LoRA layers live inside it
        self.base = base
        self.adapter = adapter
        self.adapter_layers: nn.Module | None = None  # modules an adapter kind keeps outside the backbone
        self.adapter_state: dict[str, Any] = {}  # the adapter kind's own objects; only the kind reads them
        self.adapter_started = False  # its weights came from data or an artifact: train starts it from data once
        if adapter is not None:
            adapter.attach(self)
        self.head_spec = head_spec
        self.head = head_spec.build(base.hidden_size, base.is_decoder)
        head_spec.initialize(self.head, backbone, base.tokenizer)
        self.max_length = max_length
        self.dtype_arg = dtype_arg  # what the user asked for (None = per device), saved as is
        self.training_record: dict[str, Any] | None = None  # set by train(): metrics, data sizes, settings
        self.load_options: dict[str, Any] = {}  # set by adapt(): revision, attn_implementation, trust_remote_code
        self.shard_report: ShardReport | None = None  # set by adapt(fsdp=True) when it loaded sharded
        # Decoders get positions counted from the first real token, so a left-padded text sees
        # the same positions as unpadded (what generate() does); encoders are right-padded.
        forward_args = inspect.signature(self.backbone.forward).parameters
        self._positions_from_mask = base.is_decoder and "position_ids" in forward_args
        # no KV cache: nothing here generates, the cache would hold every layer's keys and values, and
        # with it transformers does not detect packed rows
        self._no_cache = {"use_cache": False} if "use_cache" in forward_args else {}
        # transformers' causal LMs project only the positions asked for onto the vocabulary
        self._keeps_logits = "logits_to_keep" in forward_args

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def device(self) -> torch.device:
        return cast(nn.Embedding, self.backbone.get_input_embeddings()).weight.device

    def _positions(self, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._positions_from_mask:
            return {}
        return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **head_inputs: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Logits for the head (and ``loss`` with ``labels``) of a batch the head's ``collate`` laid out:
        ``head_inputs`` are what that layout adds (``token_type_ids`` of text pairs, ``window_doc`` of long
        texts' windows, ``position_ids`` and ``segments`` of packed rows, the choices' scored positions).
        How the batch runs through the backbone and the head is the head spec's ``logits``."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **head_inputs}
        targets = labels
        if labels is not None:
            # a head whose loss reads few positions (a CausalLM's response tokens) gets only their logits
            positions, targets = self.head_spec.loss_targets(labels)
            if positions is not None:
                batch["loss_positions"] = positions
        logits = self.head_spec.logits(self, batch)
        result = {"logits": logits}
        if targets is not None:
            result["loss"] = self.head_spec.loss(logits, targets)
        return result

    def sequence_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        head_inputs: dict[str, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone -> head for a batch of padded sequences (``head_inputs``: what the head module reads
        besides the states; ``positions``: for the base's LM head, the only positions whose logits are wanted)."""
        extra = self._positions(attention_mask)
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        if positions is not None and self._keeps_logits:
            extra["logits_to_keep"] = positions
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra, **self._no_cache)
        if self.head_spec.lm_logits:
            if positions is not None and not self._keeps_logits:  # a model class without logits_to_keep
                return cast(torch.Tensor, out.logits[:, positions])
            return cast(torch.Tensor, out.logits)
        return cast(torch.Tensor, self.head(out.last_hidden_state, attention_mask, **(head_inputs or {})))

    def packed_logits(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, segments: torch.Tensor
    ) -> torch.Tensor:
        """Backbone -> head for packed rows (``batching.pack``): one logit row per segment."""
        out = self.backbone(input_ids=input_ids, position_ids=position_ids, **self._no_cache)
        return cast(torch.Tensor, self.head(out.last_hidden_state, None, segments))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts (4-bit weights counted as the values they hold)."""
        total = trainable = 0
        for p in self.parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
                state = getattr(p, "quant_state", None)
                n = int(state.shape.numel()) if state is not None else n * 2
            total += n
            trainable += n if p.requires_grad else 0
        return {"trainable": trainable, "total": total}

    def summary(self) -> str:
        counts = self.parameter_counts()
        adapter = type(self.adapter).__name__ if self.adapter else "none (head only)"
        rows = [
            ("base", f"{self.base.source} ({'decoder' if self.base.is_decoder else 'encoder'})"),
            ("quantization", self.base.quantization or "none"),
            ("compute dtype", dtype_name(self.base.compute_dtype)),
            ("device", str(self.device)),
            ("adapter", f"{adapter} {self.adapter.to_dict() if self.adapter else ''}".strip()),
            (
                "head",
                self.head_spec.describe() + (f", pooling={self.head.pooling}" if hasattr(self.head, "pooling") else ""),
            ),
            ("trainable params", f"{counts['trainable']:,} ({100 * counts['trainable'] / counts['total']:.3f}%)"),
            ("total params", f"{counts['total']:,}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def _encoded_rows(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """Unlabeled ``inputs`` (texts; word lists; {context, choices} dicts; prompts or chat message
        lists: whatever the head reads) as encoded rows, one dict per input."""
        rows = self.head_spec.input_rows(inputs)
        columns, _ = encode_rows(rows, self.tokenizer, self.head_spec, "text", None, self.max_length, "inputs")
        return [dict(zip(columns, v, strict=False)) for v in zip(*columns.values(), strict=False)]

    def encode(self, inputs: list[Any]) -> dict[str, torch.Tensor]:
        """Model inputs for unlabeled ``inputs`` (see ``_encoded_rows``), padded, on the model's device."""
        batch = Collator(self.tokenizer, self.head_spec)(self._encoded_rows(inputs))
        return {k: v.to(self.device) for k, v in batch.items()}

    def logits(self, inputs: list[Any], batch_size: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Raw head outputs for ``inputs``, in eval mode, in the caller's order (a list of per-input
        tensors for per-token heads, whose lengths differ). Inputs run sorted by length, in batches of
        ``batch_size`` rows or, by default, of padded tokens up to a budget (``data/batching.py``: 2,048 on
        CPU, 8,192 on GPUs)."""
        rows = self._encoded_rows(inputs)
        if batch_size is None and self.head_spec.lm_logits:
            batch_size = 32  # logits span the vocabulary
        batches = inference_batches([row_length(r["input_ids"]) for r in rows], batch_size)
        # packed where it pays: sorted batches still carry padding (``batching.packing_pays``)
        collate = Collator(self.tokenizer, self.head_spec, pack=packable(self.head_spec, self.base.is_decoder))
        out: list[Any] = [None] * len(rows)
        with eval_mode(self), inference_context(self):
            for chunk in batches:
                batch = {k: v.to(self.device) for k, v in collate([rows[i] for i in chunk]).items()}
                for i, row in zip(chunk, self(**batch)["logits"].float().cpu(), strict=False):
                    out[i] = row
        if self.head_spec.labels_per_token:
            return out
        return torch.stack(out)

    def predict(
        self, inputs: Any, probabilities: bool = False, batch_size: int | None = None, **generate_kwargs: Any
    ) -> Any:
        """Predictions for ``inputs`` (a list, or one input for one prediction):

        * Classification: label names (``probabilities=True``: ``(label, {label: p})`` pairs);
        * MultiLabel: lists of label names (with probabilities: ``(labels, {label: p})``);
        * Regression: floats (lists of floats for several outputs);
        * MultipleChoice: inputs ``{"context": ..., "choices": [...]}``, the index of the chosen one
          (with probabilities: ``(index, [p per choice])``);
        * TokenClassification: a list of inputs, each a word list (or a text, split on whitespace);
          one tag per word;
        * CausalLM: inputs are prompts (or chat message lists); the generated text.
          ``generate_kwargs`` go to ``transformers``' ``generate``; other heads refuse them.
        """
        single = self.head_spec.is_single(inputs)
        inputs = [inputs] if single else list(inputs)
        if not inputs and not generate_kwargs:
            return []
        result = self.head_spec.predict(self, inputs, probabilities, batch_size, **generate_kwargs)
        return result[0] if single else result

    @torch.no_grad()
    def generate(self, prompts: list[Any], batch_size: int = 32, **generate_kwargs: Any) -> list[str]:
        """The continuation of each prompt (or chat message list), greedy by default (CausalLM heads)."""
        kwargs = {
            **self.head_spec.generation_defaults(),
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            **generate_kwargs,
        }
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"  # generation appends on the right
        try:
            with eval_mode(self):
                texts = []
                for i in range(0, len(prompts), batch_size):
                    batch = self.encode(prompts[i : i + batch_size])
                    generated = self.backbone.generate(**batch, **kwargs)  # type: ignore[operator]  # decoders have it
                    new = generated[:, batch["input_ids"].shape[1] :]
                    texts += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        finally:
            self.tokenizer.padding_side = side
        return texts

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the trainable part (adapter + head) and the spec to ``path``; see ``artifacts/format.py``.
        A folder that holds an artifact is replaced only with ``overwrite=True`` (then only its own files)."""
        return save_artifact(self, path, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        verify: bool = True,
    ) -> AdaptedModel:
        """Rebuild a saved adapted model: same base, quantization, adapter and head, trained weights.

        ``base`` overrides where the base model is read from (default: the name stored at save
        time); ``device``/``dtype``/``attn_implementation`` as in ``adapt``; ``trust_remote_code`` must be
        given again for a base with custom code (it is recorded, never trusted from a file). Files are checked
        (present, readable, names and
        shapes that fit, the same base weights) and a misfit raises a ``CheckpointError`` saying which.
        ``verify``: every file against the sha256 its manifest records (a damaged file raises a
        ``CheckpointError`` naming it); ``False`` for a folder whose files you edited on purpose.
        """
        artifact = open_artifact(path, verify)  # everything that needs no model is checked first
        spec = artifact.spec
        location = artifact.base_location(base)
        if spec.load_options.get("trust_remote_code") and not trust_remote_code:
            raise ConfigError(
                f"{path} was trained on a base with custom code; loading it runs that code: pass "
                f"trust_remote_code=True if you trust {spec.base.name!r}"
            )
        model = adapt(
            location,
            adapter=artifact.adapter,
            head=artifact.head,
            quantization=spec.quantization,
            dtype=dtype or spec.dtype,
            device=device,
            max_length=spec.max_length,
            padding_side=spec.padding_side,
            seed=None,
            trust_remote_code=trust_remote_code,
            revision=spec.load_options.get("revision") if base is None else None,
            attn_implementation=attn_implementation or spec.load_options.get("attn_implementation"),
            _start=False,
        )
        artifact.check_base(model.backbone, model.base.location)
        if artifact.adapter is not None:
            artifact.adapter.load(model, artifact.path)
            model.adapter_started = True  # trained weights: a further train must not restart them from data
        model.load_head(artifact.head_tensors, artifact.path)
        model.eval()
        return model

    def load_head(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """The head's trained tensors (read from artifact ``path``), checked against this head."""
        check_state(tensors, self.head.state_dict(), Path(path) / HEAD_FILE)
        self.head.load_state_dict({k: v.to(self.device) for k, v in tensors.items()})


def adapt(
    model: str,
    adapter: AdapterSpec | None = None,
    head: HeadSpec | None = None,
    quantization: str | None = "nf4",
    dtype: str | None = None,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    padding_side: str | None = None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    seed: int | None = 0,
    attn_implementation: str | None = None,
    revision: str | None = None,
    fsdp: bool = False,
    *,
    _start: bool = True,
) -> AdaptedModel:
    """Load ``model`` frozen (and quantized), add ``adapter`` and a new ``head``.

    ``model``: a packaged name (``"smollm2-135m"``, ``"minilm-l6"``), a local HF folder or a hub id.
    ``adapter``: ``LoRA(...)``, ``Bottleneck(...)``, or ``None`` to train the head only.
    ``quantization``: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``None``; ``dtype`` overrides the compute
    dtype (default: float32 on CPU, bfloat16 on capable GPUs).
    ``seed`` makes the new adapter and head weights reproducible (without touching global RNG).
    ``attn_implementation`` (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``) and ``revision`` (a hub
    branch, tag or commit) go to ``from_pretrained``; both are recorded in saved artifacts.
    ``fsdp``: under a launched world of N processes (``torchrun``, ``accelerate launch``), each reads, quantizes
    and holds only its 1/N of the frozen base (``sharding/load.py``), and the model comes back sharded for
    ``train(..., TrainConfig(fsdp=True))``; in one process it is the ordinary load.
    ``_start`` (internal): run the adapter's own start from the base (``AdapterSpec.initialize``); ``load``
    turns it off, the saved weights replacing any start.
    """
    head = _check_specs(adapter, head, max_length)
    if adapter is not None:
        adapter.check_load(quantization, fsdp)
    loading = dict(
        dtype=dtype, device=device, double_quant=double_quant, trust_remote_code=trust_remote_code,
        padding_side=padding_side, with_lm_head=head.lm_logits, revision=revision,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    network, base, loader, plan = _load_base(model, quantization, fsdp, head, loading)
    max_length = _max_length(model, network, base, max_length)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        adapted = AdaptedModel(network, base, adapter, head, max_length, dtype_name(dtype))
    if adapter is not None and _start:
        adapter.initialize(adapted)  # once, for a new adapter: a loaded artifact's saved weights need no start
    adapted.head.to(plan.device)
    if adapted.adapter_layers is not None:
        adapted.adapter_layers.to(plan.device)
    if loader is not None:
        adapted.shard_report = shard_loaded(adapted, loader, base.compute_dtype)
    # how the base was read, for the artifact: a reload reads it the same way
    read_as = {"revision": revision, "attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    adapted.load_options = {k: v for k, v in read_as.items() if v}
    return adapted


def _load_base(
    model: str, quantization: str | None, fsdp: bool, head: HeadSpec, loading: dict[str, Any]
) -> tuple[PreTrainedModel, BackboneInfo, ShardedLoad | None, LoadPlan]:
    """The frozen backbone, what it is, the sharded loader (None for the ordinary load) and the load plan."""
    files = _sharded_load(model, fsdp, quantization, loading["trust_remote_code"], loading["revision"])
    plan = plan_load(model, quantization, **loading)
    if files is not None:
        return (*open_sharded(plan, files, head.reads_input_embeddings()), plan)
    return (*load_planned(plan), None, plan)


def _max_length(model: str, network: Any, base: BackboneInfo, asked: int | None) -> int:
    """``asked``, checked against what the model and its tokenizer accept; their limit (at most 512) by default."""
    limit = min(getattr(network.config, "max_position_embeddings", 512) or 512, base.tokenizer.model_max_length or 512)
    if asked is None:
        return min(limit, 512)
    if asked > limit:
        raise ConfigError(f"max_length={asked} exceeds what {model!r} accepts ({limit} tokens)")
    return asked


def _sharded_load(
    model: str, fsdp: bool, quantization: str | None, trust_remote_code: bool, revision: str | None
) -> WeightFiles | None:
    """The weight files ``adapt(fsdp=...)`` reads sharded (checked, before any process group or model), or
    None for the ordinary load: sharded loading is for a launched world of several processes."""
    if not fsdp:
        return None
    check_fsdp(quantization, "no")  # int8 is refused before anything loads
    if launched_world() > 1:
        return weight_files(resolve_source(model, trust_remote_code, revision))
    if _first_time("fsdp-one-process"):
        print(
            "fsdp=True in one process: loading the whole model (launch with torchrun --nproc-per-node N, or "
            "accelerate launch, to shard the load over N processes)",
            file=sys.stderr,
        )
    return None


_SAID: set[str] = set()


def _first_time(key: str) -> bool:
    seen = key in _SAID
    _SAID.add(key)
    return not seen


def _check_specs(adapter: object, head: object, max_length: int | None) -> HeadSpec:
    """The arguments ``adapt`` can check before loading anything."""
    if head is None:
        raise ConfigError("adapt() needs a head, e.g. head=adapters.Classification(labels=['neg', 'pos'])")
    if not isinstance(head, HeadSpec):
        raise ConfigError(f"head must be a head spec such as adapters.Classification, got {type(head).__name__}")
    if adapter is not None and not isinstance(adapter, AdapterSpec):
        names = [cls.__name__ for cls in ADAPTERS.values()]
        raise ConfigError(f"adapter must be one of {names} or None, got {type(adapter).__name__}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length={max_length} must be at least 2 tokens")
    return head


def load(
    path: str | Path,
    base: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    verify: bool = True,
) -> AdaptedModel:
    """``AdaptedModel.from_pretrained``: rebuild a saved adapted model (see there)."""
    return AdaptedModel.from_pretrained(
        path,
        base=base,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        verify=verify,
    )
