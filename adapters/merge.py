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
import shutil
from pathlib import Path

from .artifact import HEAD_FILE, SPEC_FILE, adapter_spec_of, head_spec_of, read_spec
from .base import dtype_name, load_backbone
from .card import model_card
from .errors import ConfigError
from .packaged import drop_quantizer_marks


def merge_artifact(artifact, out, overwrite: bool = False, log=print) -> Path:
    """Write the merged model of LoRA ``artifact`` to ``out``; return ``out``."""
    artifact, out = Path(artifact), Path(out)
    spec = read_spec(artifact)
    adapter = adapter_spec_of(spec, artifact)
    if adapter is None:
        raise ConfigError(f"{artifact} has no adapter (head only): there is nothing to merge into the base weights; "
                          f"use the artifact as it is with adapters.load")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass overwrite")
    refusal = adapter.merge_refusal()
    if refusal:  # before loading anything
        raise ConfigError(f"{artifact} has {adapter.describe()} adapters, which cannot be merged into the base "
                          f"weights: {refusal}. Use the artifact as it is with adapters.load")
    network, base = load_backbone(spec["base"]["name"], spec["quantization"], spec.get("dtype"), "cpu",
                                  padding_side=spec.get("padding_side"),
                                  with_lm_head=head_spec_of(spec, artifact).lm_logits)
    if spec["quantization"] is not None:
        log(f"dequantizing the {spec['quantization']} base to {dtype_name(base.compute_dtype)} "
            f"before merging (the adapter was trained on the quantized weights)")
        network = network.dequantize(dtype=base.compute_dtype)
        drop_quantizer_marks(network)
    merged = adapter.merge(network, artifact)
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    shutil.copy(artifact / HEAD_FILE, out / HEAD_FILE)
    merged_spec = dict(spec, adapter=None, quantization=None, merged_from=str(artifact),
                       base=dict(spec["base"], name=str(out.resolve())))
    merged_spec["dtype"] = dtype_name(base.compute_dtype)
    (out / SPEC_FILE).write_text(json.dumps(merged_spec, indent=2, default=str))
    (out / "README.md").write_text(model_card(merged_spec, out.name))
    log(f"merged model written to {out}: load it with transformers.AutoModel.from_pretrained or adapters.load")
    return out
