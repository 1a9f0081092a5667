"""Tensor files read back with typed errors: safetensors loaded (a ``CheckpointError`` naming a missing or
corrupt file), checked against the model's names and shapes, and a base model's weights digested cheaply."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.errors import CheckpointError


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors ``file``; a ``CheckpointError`` naming it when missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"artifact file {file} is missing; the artifact is incomplete, save it again")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is corrupt or not a safetensors file ({err})") from None


def check_state(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse ``loaded`` tensors whose names or shapes differ from the model's ``expected`` ones."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in expected.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{file}: tensor {key} has shape {tuple(loaded[key].shape)}, the model expects "
                f"{tuple(tensor.shape)}; the artifact was saved from a different configuration"
            )


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as contiguous CPU tensors, ready for ``safetensors``."""
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


SAMPLE_BYTES = 64  # read at the start, middle and end of every tensor


def weights_digest(folder: str | Path) -> dict[str, str] | None:
    """A short digest of every tensor in the safetensors files of a model ``folder`` (None when it has none).

    Reads each file's header and 3 x 64 bytes of each tensor (start, middle, end), not the weights: a
    135M model digests in milliseconds, a 70B one in well under a second, yet any retrained or swapped
    layer changes its tensor's digest (a fine-tune moves every value)."""
    import hashlib
    import json
    import struct

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    digests = {}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            start = 8 + size
            for name, entry in sorted(header.items()):
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                sample = hashlib.sha256(f"{entry['dtype']}{entry['shape']}".encode())
                for at in (begin, (begin + end) // 2, max(begin, end - SAMPLE_BYTES)):
                    f.seek(start + at)
                    sample.update(f.read(min(SAMPLE_BYTES, end - at)))
                digests[name] = sample.hexdigest()[:12]
    return digests
