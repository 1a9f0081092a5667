"""Merge a LoRA artifact into its base: a standalone model folder, no peft needed.

The adapter was trained against the *quantized* base, so the merge starts from the quantized
weights dequantized to the compute dtype (``transformers``' ``dequantize``), not from the
original full-precision checkpoint: the merged model then computes what the adapted model
computed, up to float rounding. ``W' = W + (alpha/r) B A`` is peft's ``merge_and_unload``.
The result is a normal ``transformers`` folder (``AutoModel.from_pretrained`` reads it) plus
our head and spec, so ``adapters.load`` reads it too, unquantized and adapter-free.

Bottleneck adapters add a non-linear module after a projection; no weight matrix can absorb
them, so they cannot be merged.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from adapters.artifacts.card import model_card
from adapters.artifacts.format import (
    HEAD_FILE,
    SPEC_FILE,
    adapter_spec_of,
    check_base,
    check_quantization,
    head_spec_of,
    is_artifact,
    read_head,
    read_spec,
    resolve_base,
)
from adapters.backbone.loading import dtype_name, load_backbone
from adapters.backbone.packaged import drop_quantizer_marks
from adapters.errors import ConfigError
from adapters.files import atomic_folder, check_state, earlier_output, weights_digest


def merge_artifact(artifact, out, overwrite: bool = False, log=print) -> Path:
    """Write the merged model of LoRA ``artifact`` to ``out``; return ``out``.

    Everything ``load`` checks is checked first (spec, head tensors against the head, quantization, the
    base's weights), and ``out`` must be new, empty, or (with ``overwrite``) an earlier merge, whose own
    files are the only ones replaced."""
    artifact, out = Path(artifact), Path(out)
    spec = read_spec(artifact)
    adapter, head = adapter_spec_of(spec, artifact), head_spec_of(spec, artifact)
    if adapter is None:
        raise ConfigError(
            f"{artifact} has no adapter (head only): there is nothing to merge into the base weights; "
            f"use the artifact as it is with adapters.load"
        )
    refusal = adapter.merge_refusal()
    if refusal:  # before loading anything
        raise ConfigError(
            f"{artifact} has {adapter.describe()} adapters, which cannot be merged into the base "
            f"weights: {refusal}. Use the artifact as it is with adapters.load"
        )
    head_tensors = _checked_head(spec, head, artifact)
    check_quantization(spec, artifact)
    replaces = earlier_output(out, overwrite, "a merge", "the merged model", _merged_files)
    location = resolve_base(spec, artifact)
    network, base = load_backbone(
        location,
        spec["quantization"],
        spec.get("dtype"),
        "cpu",
        padding_side=spec.get("padding_side"),
        with_lm_head=head.lm_logits,
    )
    check_base(spec, network, base.location, artifact)
    if spec["quantization"] is not None:
        log(
            f"dequantizing the {spec['quantization']} base to {dtype_name(base.compute_dtype)} "
            f"before merging (the adapter was trained on the quantized weights)"
        )
        network = network.dequantize(dtype=base.compute_dtype)
        drop_quantizer_marks(network)
    merged = adapter.merge(network, artifact)
    with atomic_folder(out, replaces) as tmp:
        merged.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        # the head, recorded as trained for this unquantized base (its metadata is checked at load)
        save_file(head_tensors, str(tmp / HEAD_FILE), metadata={"quantization": "None", "base": out.name})
        # the merged weights are their own base, in the artifact's own folder: it travels as one piece
        own = {"name": out.name, "path": ".", "weights_digest": weights_digest(tmp)}
        merged_spec = dict(
            spec,
            adapter=None,
            quantization=None,
            merged_from=artifact.name,
            base={**spec["base"], **own},
            dtype=dtype_name(base.compute_dtype),
        )
        (tmp / "README.md").write_text(model_card(merged_spec, out.name))
        merged_spec["files"] = sorted([p.name for p in tmp.iterdir()] + [SPEC_FILE])
        (tmp / SPEC_FILE).write_text(json.dumps(merged_spec, indent=2, default=str))
    log(f"merged model written to {out}: load it with transformers.AutoModel.from_pretrained or adapters.load")
    return out


def _checked_head(spec: dict, head, artifact: Path) -> dict:
    """The head tensors, checked against the head the spec describes (a mismatch would only fail at the next
    load)."""
    module = head.build(spec["base"]["hidden_size"], spec["base"]["is_decoder"])
    tensors = read_head(artifact)
    check_state(tensors, module.state_dict(), artifact / HEAD_FILE)
    return tensors


def _merged_files(out: Path) -> list[str] | None:
    """The files an earlier merge at ``out`` wrote (None: ``out`` is not a merge)."""
    spec = read_spec(out) if is_artifact(out) else {}
    return spec["files"] if spec.get("merged_from") and isinstance(spec.get("files"), list) else None
