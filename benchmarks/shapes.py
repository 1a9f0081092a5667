"""Random-weight models of real shapes, for measuring memory and speed at scale without downloading weights.

A preset is the architecture of a released model (its ``config.json`` values, copied from the model's hub
page): the same parameter count, layer shapes and dtype, so memory, load time and step time are those of
the real model. The weights are random (normal, std 0.02; norms 1), so **accuracy numbers mean nothing on
them**: every number measured on one says "random weights" beside it. The tokenizer is the packaged
SmolLM2 tokenizer (its ids fit every preset's vocabulary).

    python benchmarks/shapes.py llama-3.2-1b                 # writes ~/.cache/qadapters/shapes/llama-3.2-1b
    python benchmarks/shapes.py llama-3.1-8b --out /big/disk
    python benchmarks/shapes.py --list                      # presets, with parameter counts

The checkpoint is written as transformers writes one (bf16 safetensors in shards of at most 2 GB, with
``model.safetensors.index.json``), one shard at a time: writing an 8B model needs about one shard of
memory, not 16 GB. It is written once; a complete folder is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARD_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Shape:
    """A released model's architecture: its config values and its published parameter count."""

    model_type: str
    parameters: int  # of the released checkpoint (tied embeddings counted once)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, Shape] = {
    "llama-3.2-1b": Shape(
        "llama",
        1_235_814_400,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        "meta-llama/Llama-3.2-1B",
    ),
    "llama-3.1-8b": Shape(
        "llama",
        8_030_261_248,
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        "meta-llama/Llama-3.1-8B",
    ),
    "llama-3.1-70b": Shape(
        "llama",
        70_553_706_496,
        dict(
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        "meta-llama/Llama-3.1-70B",
    ),
    "qwen2.5-7b": Shape(
        "qwen2",
        7_615_616_512,
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=131072,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        "Qwen/Qwen2.5-7B",
    ),
    "qwen2.5-32b": Shape(
        "qwen2",
        32_763_876_352,
        dict(
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=27648,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        "Qwen/Qwen2.5-32B",
    ),
    "mistral-7b": Shape(
        "mistral",
        7_248_023_552,
        dict(
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        "mistralai/Mistral-7B-v0.3",
    ),
}


def config_for(name: str, **overrides: Any):
    """The preset's transformers config (bf16), with ``overrides`` (e.g. fewer layers for a dry run)."""
    from transformers import AutoConfig

    shape = PRESETS[name]
    settings = {"torch_dtype": "bfloat16", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return AutoConfig.for_model(shape.model_type, **{**settings, **shape.config, **overrides})


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint holds, by name, from a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # stored once, as the embeddings
    return shapes


def parameter_count(name: str, **overrides: Any) -> int:
    """Parameters of the preset as built (tied embeddings counted once)."""
    return sum(math.prod(s) for s in tensor_shapes(config_for(name, **overrides)).values())


def _random(name: str, shape: tuple[int, ...]):
    """A tensor's random bf16 values, the same on every machine (seeded by the tensor's name)."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write(name: str, out: Path | None = None, progress: bool = True, **overrides: Any) -> Path:
    """Write preset ``name`` (random bf16 weights, sharded safetensors, packaged tokenizer) into ``out``
    (default ``~/.cache/qadapters/shapes/<name>``); a complete folder is reused as is."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from adapters.backbone.packaged import resolve_packaged

    suffix = "-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) if overrides else ""
    out = Path(out or Path.home() / ".cache" / "qadapters" / "shapes" / f"{name}{suffix}")
    index_file = out / "model.safetensors.index.json"
    if index_file.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = config_for(name, **overrides)
    shapes = tensor_shapes(config)
    groups: list[list[str]] = [[]]
    size = 0
    for tensor, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(tqdm(groups, desc=f"writing {name}", disable=not progress)):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {t: _random(t, shapes[t]) for t in group}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(v.numel() * 2 for v in tensors.values())
        weight_map.update(dict.fromkeys(group, file))
        del tensors
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_packaged("smollm2-135m")).save_pretrained(out)
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"Random weights in the shape of {PRESETS[name].source} (benchmarks/shapes.py): for memory and speed only.\n"
    )
    # the index last: its presence marks a complete folder
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def write_quantized(name: str, quantization: str = "nf4", out: Path | None = None, progress: bool = True) -> Path:
    """Write preset ``name`` directly in 4-bit (``qadapters quantize``'s layout): each weight is drawn, quantized
    and written one at a time, so the model never exists whole in bf16, in memory or on disk (a 32B shape needs
    ~19 GB of disk instead of 65). Random weights, as ``write``'s; a complete folder is reused."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from adapters.backbone.loading import quantization_config
    from adapters.backbone.packaged import resolve_packaged
    from adapters.backbone.prequantize import quantized_layers
    from adapters.backbone.prequantize import write_quantized as write_4bit
    from adapters.backbone.quantize import FourBit

    out = Path(out or Path.home() / ".cache" / "qadapters" / "shapes" / f"{name}-{quantization}")
    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = config_for(name)
    shapes = tensor_shapes(config)
    bnb_config = quantization_config(quantization, torch.bfloat16)
    layers = quantized_layers(config, bnb_config)
    bar = tqdm(total=sum(math.prod(v) for v in shapes.values()), desc=f"writing {name} in {quantization}",
               unit="param", unit_scale=True, disable=not progress)  # fmt: skip

    def drawn():
        for tensor, shape in shapes.items():
            yield tensor, _random(tensor, shape)
            bar.update(math.prod(shape))

    config.quantization_config = bnb_config.to_dict()
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_packaged("smollm2-135m")).save_pretrained(out)
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"Random weights in the shape of {PRESETS[name].source}, written in {quantization} (benchmarks/shapes.py): "
        "for memory and speed only.\n"
    )
    write_4bit(out, drawn(), layers, FourBit(quantization, True, torch.bfloat16))
    bar.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    p.add_argument("--out", help="folder to write (default ~/.cache/qadapters/shapes/<preset>)")
    p.add_argument("--list", action="store_true", help="list the presets with their parameter counts")
    p.add_argument("--quantized", choices=["nf4", "fp4"], help="write it directly in 4-bit (never whole in bf16)")
    args = p.parse_args(argv)
    if args.list or not args.preset:
        for name, shape in PRESETS.items():
            built = parameter_count(name)
            print(
                f"{name:14s} {built / 1e9:6.3f} B parameters (released: {shape.parameters / 1e9:.3f} B; {shape.source})"
            )
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out) if args.out else None
    print(write_quantized(args.preset, args.quantized, out) if args.quantized else write(args.preset, out))


if __name__ == "__main__":
    main()
