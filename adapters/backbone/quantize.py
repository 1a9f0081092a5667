"""4-bit quantization of a weight one slice at a time, equal to bitsandbytes' quantization of the whole.

bitsandbytes' NF4/FP4 (Dettmers et al. 2023, QLoRA, arXiv:2305.14314) splits the *flattened* weight into
blocks of 64 values; each block is scaled by its own absolute maximum and every value becomes a 4-bit code,
two per byte. A block's bytes depend on that block alone, so a rank that quantizes the blocks covering its
range of the flattened weight gets exactly the bytes a whole-weight quantization puts there. Two things are
not local: the absmax of every block is needed whole (a gathered weight is dequantized whole), and double
quantization re-quantizes those absmax values in blocks of 256 after subtracting their *mean*. Each rank
therefore computes the absmax of its own blocks, the ranks combine them with one ``all_reduce(MAX)`` (a
block's absmax is the same wherever it is computed; ranks that lack it contribute 0), and every rank then
builds the whole quantization state exactly as ``bitsandbytes.functional.quantize_4bit`` does.

The same functions write a base once in 4-bit (``quantized_entries``): the tensors under the names
transformers' own ``save_pretrained`` gives a 4-bit model, so ``from_pretrained`` reads the folder too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights, as transformers' BitsAndBytesConfig uses it


@dataclass(frozen=True)
class FourBit:
    """How a base is quantized: bitsandbytes' 4-bit settings."""

    quant_type: str  # "nf4" or "fp4"
    double_quant: bool
    dtype: torch.dtype  # of the values quantized (the state records it; dequantization returns it)
    blocksize: int = BLOCKSIZE


def whole_state(absmax: torch.Tensor, shape: tuple[int, ...], settings: FourBit) -> Any:
    """The ``QuantState`` of a whole weight of ``shape`` from its blocks' absmax (fp32), as
    ``bitsandbytes.functional.quantize_4bit`` builds it."""
    import bitsandbytes.functional as F

    code = F.get_4bit_type(settings.quant_type, device=absmax.device)
    common = dict(
        shape=torch.Size(shape), dtype=settings.dtype, blocksize=settings.blocksize, code=code,
        quant_type=settings.quant_type,
    )  # fmt: skip
    if not settings.double_quant:
        return F.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return F.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def quantize_range(
    read: Any, shape: tuple[int, ...], byte_start: int, byte_stop: int, settings: FourBit
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed bytes ``byte_start:byte_stop`` of the 4-bit quantization of a weight of ``shape``, and the
    absmax of every block (0 where this range does not reach), reading only the blocks the range covers:
    ``read(start, stop)`` returns elements ``start:stop`` of the flattened weight."""
    import bitsandbytes.functional as F

    numel = 1
    for size in shape:
        numel *= size
    blocks = -(-numel // settings.blocksize)
    if byte_stop <= byte_start:
        return torch.empty(0, dtype=torch.uint8), torch.zeros(blocks, dtype=torch.float32)
    first = 2 * byte_start // settings.blocksize
    last = -(-2 * byte_stop // settings.blocksize)
    start = first * settings.blocksize
    values = read(start, min(last * settings.blocksize, numel)).to(settings.dtype)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=values.device)  # where the values are (a GPU's)
    packed, state = F.quantize_4bit(
        values, blocksize=settings.blocksize, compress_statistics=False, quant_type=settings.quant_type
    )
    absmax[first:last] = state.absmax.float()
    skip = byte_start - start // 2
    return packed.reshape(-1)[skip : skip + byte_stop - byte_start].clone(), absmax


def quantized_entries(name: str, weight: torch.Tensor, settings: FourBit) -> dict[str, torch.Tensor]:
    """The tensors a 4-bit checkpoint holds for weight ``name`` (``"...q_proj.weight"``): the packed bytes under
    ``name`` and the quantization state beside it, named as transformers' ``save_pretrained`` names them."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight.to(settings.dtype),
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
    )
    entries = {name: packed}
    entries.update({f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()})
    return entries


def read_state(files: Any, name: str, device: torch.device | str = "cpu") -> Any:
    """The ``QuantState`` that pre-quantized checkpoint ``files`` holds beside weight ``name``."""
    import bitsandbytes.functional as F

    prefix = f"{name}."
    found = {key[len(prefix) :]: files.whole(key) for key in files.entries if key.startswith(prefix)}
    return F.QuantState.from_dict(found, device=torch.device(device))
