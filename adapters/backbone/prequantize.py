"""Write a base once in 4-bit, so that every later load -- whole or sharded -- reads bytes instead of
quantizing.

Quantizing at load costs time on every run and every rank, and needs the unquantized weights (twice the
4-bit size in bf16, four times in fp32) on disk and in the page cache. ``quantize_base`` reads the base one
tensor at a time, quantizes exactly the layers transformers' ``from_pretrained`` would (its own quantizer
picks them, ``backbone/skeleton.py``) and writes them in the layout transformers' ``save_pretrained`` gives a
bitsandbytes 4-bit model: the packed bytes under the weight's name, the quantization state beside it, and a
``quantization_config`` in ``config.json``. So the folder is also an ordinary pre-quantized checkpoint for
``AutoModel.from_pretrained``. It never holds more than one weight and one output file in memory.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from adapters.backbone.loading import (
    is_decoder_config,
    named_dtype,
    quantization_config,
    resolve_source,
    weights_folder,
)
from adapters.backbone.precision import default_compute_dtype
from adapters.backbone.quantize import FourBit, quantized_entries
from adapters.backbone.skeleton import meta_network
from adapters.backbone.weight_files import INDEX, WeightFiles
from adapters.errors import ConfigError, UnknownModelError
from adapters.files import destination_lock, durable_folder, probe_writable, read_manifest, writable_entries

SHARD_BYTES = 2 * 10**9  # transformers' default max_shard_size ("2GB" since 4.x... then 5GB; either reads)
HOLDS = "quantized base"


def quantized_layers(config: Any, bnb_config: Any) -> set[str]:
    """The names of the linear layers ``from_pretrained`` quantizes in ``config``'s model, as its checkpoint
    names them (a causal LM's full model for decoders, the bare model for encoders)."""
    import bitsandbytes as bnb

    model = meta_network(config, is_decoder_config(config), torch.float32, bnb_config, {})
    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


class ShardWriter:
    """Safetensors files of at most ``SHARD_BYTES`` each, named and indexed as transformers names them."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and sum(t.numel() * t.element_size() for t in self.pending.values()) + size > self.shard_bytes:
            self._flush()
        self.pending.update(tensors)
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self.pending.items()}, str(self.folder / name), {"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending = {}

    def finish(self) -> None:
        """Write what is pending, give the files their final names and write the index."""
        if self.pending:
            self._flush()
        weight_map = {}
        for i, (name, tensors) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))


def write_quantized(
    folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], layers: set[str], settings: FourBit
) -> None:
    """Write ``tensors`` (name, value) into ``folder``, each weight of a layer in ``layers`` in 4-bit."""
    writer = ShardWriter(folder)
    for name, value in tensors:
        stem = name.removesuffix(".weight")
        if name.endswith(".weight") and stem in layers:
            writer.add(quantized_entries(name, value, settings))
        else:
            writer.add({name: value})
    writer.finish()


def quantize_base(
    base: str,
    out: str | Path,
    quantization: str = "nf4",
    double_quant: bool = True,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``base`` (a packaged name, a local folder or a cached hub id) into folder ``out`` with its linear
    layers in 4-bit (``quantization``: ``"nf4"`` or ``"fp4"``; ``double_quant`` as in ``adapt``); ``adapt`` and
    ``load`` read ``out`` as a base without quantizing again, sharded too (``adapt(..., fsdp=True)``).
    ``dtype``: what the weights are cast to before quantizing, as ``adapt`` casts them to its compute dtype (the
    default: this machine's); bf16 checkpoints quantize to the same bytes either way."""
    if quantization not in ("nf4", "fp4"):
        raise ConfigError(
            f"quantization={quantization!r}: a base is pre-quantized in 4-bit ('nf4' or 'fp4'); LLM.int8 weights "
            f"are quantized at load (adapt(..., quantization='int8'))"
        )
    compute = _dtype(dtype)
    files, config, source = _source(base)
    out = Path(out)
    replaces = writable_entries(out, HOLDS, _quantized_files, overwrite=overwrite)
    probe_writable(out, "quantized base destination")
    bnb_config = quantization_config(quantization, compute, double_quant)
    layers = quantized_layers(config, bnb_config)
    settings = FourBit(quantization, double_quant, compute)
    with destination_lock(out, HOLDS), durable_folder(out, HOLDS, replaces, files_bytes(files) // 3) as tmp:
        write_quantized(tmp, _read_all(files, progress), layers, settings)
        config.quantization_config = bnb_config.to_dict()
        config.save_pretrained(tmp)
        _copy_tokenizer(source, tmp)
    return out


def files_bytes(files: WeightFiles) -> int:
    return sum(p.stat().st_size for p in set(files.files))


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    return named_dtype(dtype) or default_compute_dtype(torch.device("cpu"))


def _source(base: str) -> tuple[WeightFiles, Any, Path]:
    """The base's weight files (checked), its config, and its folder."""
    from transformers import AutoConfig

    location = resolve_source(base)
    folder = weights_folder(location)
    if folder is None:
        raise UnknownModelError(f"{base!r} is not on this machine; download it first (huggingface-cli download)")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        raise ConfigError(f"{base!r} is quantized already ({folder}); quantize the unquantized base")
    return WeightFiles(folder), config, Path(folder)


def _read_all(files: WeightFiles, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from tqdm.auto import tqdm

    names = sorted(files.entries)
    total = sum(files.numel(n) for n in names)
    with tqdm(total=total, desc="quantize", unit="param", unit_scale=True, disable=not progress) as bar:
        for name in names:
            yield name, files.whole(name)
            bar.update(math.prod(files.shape(name)))
    files.close()


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer's and generation config's files, as they are (not weights, config or the library's own)."""
    skip = ("config.json", INDEX, "qadapters-manifest.json")
    for path in source.iterdir():
        weights = path.name.endswith((".safetensors", ".bin", ".pt"))
        if path.is_file() and not path.name.startswith(".") and not weights and path.name not in skip:
            shutil.copy2(path, target / path.name)


def _quantized_files(out: Path) -> list[str] | None:
    """The files an earlier ``quantize_base`` wrote at ``out`` (None: ``out`` is not one)."""
    manifest = read_manifest(out)
    return list(manifest.files) if manifest is not None and manifest.holds == HOLDS else None
