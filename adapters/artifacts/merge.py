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

from dataclasses import replace
from pathlib import Path

from adapters.artifacts.format import is_artifact, open_artifact, read_spec, write_head, write_spec
from adapters.backbone.loading import dtype_name, load_backbone
from adapters.backbone.packaged import drop_quantizer_marks
from adapters.errors import ConfigError
from adapters.files import (
    destination_lock,
    durable_folder,
    probe_writable,
    read_manifest,
    weights_digest,
    writable_entries,
)


def merge_artifact(artifact, out, overwrite: bool = False, log=print, verify: bool = True) -> Path:
    """Write the merged model of LoRA ``artifact`` to ``out``; return ``out``.

    Everything ``load`` checks is checked first (spec, head tensors against the head, quantization, the
    base's weights), and ``out`` must be new, empty, or (with ``overwrite``) an earlier merge, whose own
    files are the only ones replaced."""
    opened = open_artifact(artifact, verify)
    spec, adapter, head = opened.spec, opened.adapter, opened.head
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
    out = Path(out)
    writable_entries(out, "merge", _merged_files, overwrite=overwrite)
    probe_writable(out, "merge destination")
    network, base = load_backbone(
        opened.base_location(),
        spec.quantization,
        dtype=spec.dtype,
        device="cpu",
        padding_side=spec.padding_side,
        with_lm_head=head.lm_logits,
    )
    opened.check_base(network, base.location)
    if spec.quantization is not None:
        log(
            f"dequantizing the {spec.quantization} base to {dtype_name(base.compute_dtype)} "
            f"before merging (the adapter was trained on the quantized weights)"
        )
        network = network.dequantize(dtype=base.compute_dtype)
        drop_quantizer_marks(network)
    merged = adapter.merge(network, opened.path)
    # the merged weights are their own base, in the artifact's own folder: it travels as one piece
    merged_spec = replace(
        spec,
        adapter=None,
        quantization=None,
        merged_from=opened.path.name,
        dtype=dtype_name(base.compute_dtype),
        base=replace(spec.base, name=out.name, path="."),
    )
    with (
        destination_lock(out, "merge"),
        durable_folder(out, "merge", writable_entries(out, "merge", _merged_files, overwrite=overwrite)) as tmp,
    ):
        merged.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        # the head, recorded as trained for this unquantized base (its metadata is checked at load)
        write_head(opened.head_tensors, tmp, merged_spec)
        merged_spec.base.weights_digest = weights_digest(tmp)  # every tensor in the folder, the head's too
        write_spec(merged_spec, tmp, out.name)
    log(f"merged model written to {out}: load it with transformers.AutoModel.from_pretrained or adapters.load")
    return out


def _merged_files(out: Path) -> list[str] | None:
    """The files an earlier merge at ``out`` wrote (None: ``out`` is not a merge): its manifest's, or for one
    written before manifests, the files its spec lists."""
    if not is_artifact(out):
        return None
    manifest = read_manifest(out)
    if manifest is not None:
        return list(manifest.files) if manifest.holds == "merge" else None
    spec = read_spec(out)
    return spec.files if spec.merged_from and spec.files is not None else None
