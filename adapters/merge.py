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

from .artifact import ADAPTER_DIR, HEAD_FILE, SPEC_FILE, read_spec
from .card import model_card
from .errors import ConfigError


def merge_artifact(artifact, out, overwrite: bool = False, log=print) -> Path:
    """Write the merged model of LoRA ``artifact`` to ``out``; return ``out``."""
    from peft import PeftModel

    from .base import load_backbone

    artifact, out = Path(artifact), Path(out)
    spec = read_spec(artifact)
    adapter = spec["adapter"]
    if adapter is None or adapter["kind"] != "lora":
        kind = "no adapter (head only)" if adapter is None else f"{adapter['kind']} adapters"
        raise ConfigError(f"{artifact} has {kind}: only LoRA can be merged into the base weights. Bottleneck adapters "
                          f"are extra non-linear modules (down, activation, up) that no weight matrix can absorb; use "
                          f"the artifact as it is with adapters.load")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass overwrite")
    backbone = load_backbone(spec["base"]["name"], spec["quantization"], spec.get("dtype"), "cpu",
                             padding_side=spec.get("padding_side"), with_lm_head=spec["head"]["kind"] == "causal_lm")
    model = backbone.model
    if spec["quantization"] is not None:
        log(f"dequantizing the {spec['quantization']} base to {str(backbone.compute_dtype).replace('torch.', '')} "
            f"before merging (the adapter was trained on the quantized weights)")
        model = model.dequantize(dtype=backbone.compute_dtype)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    merged = PeftModel.from_pretrained(model, str(artifact / ADAPTER_DIR)).merge_and_unload()
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(out)
    backbone.tokenizer.save_pretrained(out)
    shutil.copy(artifact / HEAD_FILE, out / HEAD_FILE)
    merged_spec = dict(spec, adapter=None, quantization=None, merged_from=str(artifact),
                       base=dict(spec["base"], name=str(out.resolve())))
    merged_spec["dtype"] = str(backbone.compute_dtype).replace("torch.", "")
    (out / SPEC_FILE).write_text(json.dumps(merged_spec, indent=2, default=str))
    (out / "README.md").write_text(model_card(merged_spec, out.name))
    log(f"merged model written to {out}: load it with transformers.AutoModel.from_pretrained or adapters.load")
    return out
