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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from adapters.errors import CheckpointError, ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share_like_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions a plain ``mkdir``/``open`` would have."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def atomic_folder(path: str | Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; once the block completes it becomes ``path``.

    When a folder is already at ``path``, its entries named in ``replaces`` (what the library wrote there
    before) and those the block wrote anew are replaced; every other entry (the user's notes, reports)
    is carried into the new folder untouched. The old folder is removed only once the new one is in
    place; on an error the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _share_like_umask(tmp)
        if path.exists():
            written, replaced = {p.name for p in tmp.iterdir()}, set(replaces)
            carried = [e.name for e in path.iterdir() if e.name not in written and e.name not in replaced]
            try:
                for name in carried:  # the user's own files move across, untouched (a rename, no copy)
                    os.replace(path / name, tmp / name)
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "previous")
            except OSError:
                for name in carried:  # put back whatever moved before the failure, then give up
                    if (tmp / name).exists():
                        os.replace(tmp / name, path / name)
                raise
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def writable_entries(
    out: Path,
    target: str,
    earlier: Callable[[Path], list[str] | None],
    *,
    overwrite: bool,
    replace_earlier: bool = False,
    foreign: str = "refuse",
    writes: Iterable[str] = (),
    hint: str = "pass overwrite to replace it (only the files it wrote)",
) -> list[str]:
    """The one rule for every folder the library writes (artifacts, merges, exports, training runs): which
    entries of ``out`` writing ``target`` there may replace. The library replaces only what it wrote.

    * ``out`` is a file: refused.
    * missing or empty: nothing to replace.
    * it holds an earlier ``target`` (``earlier(out)`` lists the entries that one wrote): those entries, with
      ``overwrite`` (or always, with ``replace_earlier``); else refused, saying how (``hint``).
    * any other non-empty folder (``foreign``): ``"refuse"``; ``"beside"`` (written beside the user's files);
      ``"beside_with_overwrite"`` (the same, only with ``overwrite``). Beside means none of ``writes`` (the
      names the write creates) may already be there.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; choose a folder for the {target}")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    files = earlier(out)
    if files is not None:
        if overwrite or replace_earlier:
            return files
        raise ConfigError(f"{out} holds an earlier {target}; {hint}")
    if foreign == "refuse" or (foreign == "beside_with_overwrite" and not overwrite):
        beside = ", or pass overwrite to write beside its files (none of them is deleted)"
        raise ConfigError(
            f"{out} is a non-empty folder that is not a qadapters {target}; choose another folder"
            + (beside if foreign != "refuse" else "")
        )
    clash = sorted({p.name for p in out.iterdir()} & set(writes))
    if clash:
        raise ConfigError(
            f"{out} already holds {clash}, which are not a qadapters {target}'s; the library never "
            f"replaces files it did not write. Move them, or choose another folder"
        )
    return []


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
