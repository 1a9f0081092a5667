"""Files the library writes and reads back: folders written atomically, safetensors read with typed errors.

A folder (an artifact, a converted model) is written into a temporary sibling and renamed into
place once complete, so a crash never leaves a half-written folder where a good one was. The
temporary folder is created private (``mkdtemp``: 0700); it gets the permissions of the user's
umask before it is renamed, so colleagues on a shared machine can read what was written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share_like_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions a plain ``mkdir``/``open`` would have."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def atomic_folder(path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; once the block completes it becomes ``path``.

    A folder already at ``path`` is swapped out and removed only after the new one is in place; on an
    error the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _share_like_umask(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def check_state(loaded: dict, expected: dict, file: Path) -> None:
    """Refuse ``loaded`` tensors whose names or shapes differ from the model's ``expected`` ones."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in expected.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{file}: tensor {key} has shape {tuple(loaded[key].shape)}, the model expects "
                                  f"{tuple(tensor.shape)}; the artifact was saved from a different configuration")


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as contiguous CPU tensors, ready for ``safetensors``."""
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
