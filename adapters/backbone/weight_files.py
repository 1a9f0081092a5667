"""A base's safetensors files, read one slice at a time.

Sharded loading (``sharding/load.py``) never reads a whole model: each rank reads only its own rows of each
weight. A safetensors file is a JSON header (each tensor's dtype, shape and byte range) followed by the raw
tensors, row-major, so a range of rows is one contiguous range of bytes: it is read with one positioned read
(``os.pread``) into a new tensor. Not through safetensors' memory map (``safe_open(...).get_slice``), which
reads the same bytes but leaves every page it touched mapped, and counted in the process's resident memory,
until the file is closed: a rank's resident memory is then its shard plus a growing share of the checkpoint.

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
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
SINGLE = "model.safetensors"


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of safetensors file ``path``, checked against the file's size, and where its data
    starts."""
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
    return header, 8 + length


class WeightFiles:
    """The tensors of a model folder's safetensors checkpoint (one file or an indexed set), by name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = self._files()
        self.entries: dict[str, tuple[Path, dict[str, Any]]] = {}
        self.data_start: dict[Path, int] = {}
        for path in sorted(set(self.files)):
            header, self.data_start[path] = _header(path)
            for name, entry in header.items():
                if name != "__metadata__":
                    self.entries[name] = (path, entry)
        self._open: dict[Path, int] = {}  # file descriptors, opened at the first read

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

    def dtype(self, name: str) -> torch.dtype:
        stored = self.entries[name][1]["dtype"]
        if stored not in DTYPES:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is stored as {stored}, which qadapters cannot read")
        return DTYPES[stored]

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Bytes ``start:stop`` of tensor ``name``'s data, as a new uint8 tensor."""
        path, entry = self.entries[name]
        if path not in self._open:
            self._open[path] = os.open(path, os.O_RDONLY)
        fd = self._open[path]
        buffer = bytearray(stop - start)
        view, offset = memoryview(buffer), self.data_start[path] + int(entry["data_offsets"][0]) + start
        while view:  # pread may return fewer bytes than asked
            count = os.preadv(fd, [view], offset)
            if count == 0:
                raise CheckpointError(f"{path} ended early while reading {name!r}; copy or download it again")
            view, offset = view[count:], offset + count
        return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)

    def whole(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0] if self.shape(name) else 1)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dimension 0) of tensor ``name``: a new tensor holding just those bytes."""
        shape, dtype = self.shape(name), self.dtype(name)
        if not shape:  # a scalar
            return self._read(name, 0, dtype.itemsize).view(dtype).reshape(())
        row = math.prod(shape[1:]) * dtype.itemsize
        stop = min(stop, shape[0])
        start = min(start, stop)
        return self._read(name, start * row, stop * row).view(dtype).reshape(stop - start, *shape[1:])

    def elements(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``name`` flattened (row-major), reading only the rows they span."""
        shape = self.shape(name)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // row, -(-stop // row)
        flat = self.rows(name, first, last).reshape(-1)
        return flat[start - first * row : stop - first * row]

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
