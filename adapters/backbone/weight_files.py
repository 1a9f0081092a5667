"""A base's safetensors files, read one slice at a time.

Sharded loading (``sharding/load.py``) never reads a whole model: each rank reads only its own rows of each
weight. safetensors memory-maps a file and ``safe_open(...).get_slice(name)[a:b]`` copies just the bytes of
those rows (a weight is stored row-major, so a row range is one contiguous range of the file), so a rank's
resident memory is its shard, never the checkpoint.

Before any tensor is read, every file's header is checked against the file's size: a mapped page past the
end of a truncated file is not an exception but a ``SIGBUS`` that kills the process, so a short or damaged
file must be named before it is touched.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from adapters.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _header(path: Path) -> dict[str, Any]:
    """The JSON header of safetensors file ``path``, checked against the file's size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}): it is damaged or was not fully copied; "
            f"copy or download it again"
        ) from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + length + end:,} bytes, the file has {size:,}; "
            f"copy or download it again"
        )
    return header


class WeightFiles:
    """The tensors of a model folder's safetensors checkpoint (one file or an indexed set), by name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = self._files()
        self.entries: dict[str, tuple[Path, dict[str, Any]]] = {}
        for path in sorted(set(self.files)):
            for name, entry in _header(path).items():
                if name != "__metadata__":
                    self.entries[name] = (path, entry)
        self._open: dict[Path, Any] = {}

    def _files(self) -> list[Path]:
        index = self.folder / INDEX
        if index.exists():
            try:
                names = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{index} is not a safetensors index ({err}); copy it again") from None
            missing = sorted(n for n in names if not (self.folder / n).exists())
            if missing:
                raise CheckpointError(f"{index} lists {missing}, which are not in {self.folder}")
            return [self.folder / n for n in sorted(names)]
        if (self.folder / SINGLE).exists():
            return [self.folder / SINGLE]
        found = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
        raise CheckpointError(
            f"{self.folder} has no safetensors weights ({INDEX} or {SINGLE})"
            + (f", only {found}" if found else "")
            + ": sharded loading reads slices of safetensors files. Convert it once: load it with transformers "
            "and save_pretrained(folder) (safetensors is the default), or `qadapters quantize` it"
        )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.entries[name][0]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def whole(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dimension 0) of tensor ``name``, a copy of just those bytes."""
        return self._handle(name).get_slice(name)[start:stop]

    def elements(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``name`` flattened (row-major), reading only the rows they span."""
        shape = self.shape(name)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // row, -(-stop // row)
        flat = self.rows(name, first, last).reshape(-1)
        return flat[start - first * row : stop - first * row]

    def close(self) -> None:
        self._open.clear()  # safe_open handles unmap when released
