"""Folders written so that a crash, a kill or a full disk never loses what was there, nor moves a user's file.

The protocol is the one git and SQLite use (write aside, flush, rename, flush the folder), with a roll-forward
journal for folders that already hold something:

* **A new folder** (``path`` missing or empty) is written into a hidden sibling ``.NAME.tmp-XXXX``, its files
  and folders flushed (``fsync``), then renamed to ``path`` in one step, and the parent flushed.
* **A folder that holds an earlier write, or the user's files** (the caller decided, by the manifest, what may
  be replaced): the new files are written into ``path/.qadapters-staging`` and flushed with their manifest;
  then a ``COMMIT`` file (the list of earlier files to remove) is flushed aside and renamed into place, and from
  that moment the write is decided: each new file is renamed over its old one, the earlier files not written
  again are removed, the manifest is renamed last and the staging folder removed. Only the library's own files
  are ever renamed or removed; every other entry of ``path`` stays where it is.

A kill before ``COMMIT`` leaves the old folder as it was (the staging folder is removed by the next write);
a kill after it leaves a decided write that any reader or writer finishes (``recover``) before it looks at the
folder. So at every kill point the folder holds the old write or the new one, never a mix that loads.
``KILL_POINT``, when set, is called before every step that changes the disk: the fault tests kill the process
there, step by step (``tests/faults/``).

A full disk (``ENOSPC``, also as torch's and safetensors' own errors) is a ``StorageError`` naming the folder,
the space the write needed and the space free; the partial files are removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.errors import CheckpointError, StorageError
from adapters.files.destinations import nearest_existing
from adapters.files.manifest import MANIFEST, read_manifest, write_manifest

STAGING = ".qadapters-staging"
COMMIT = "COMMIT"
WRITING = ".qadapters-writing"  # marks a temporary sibling as the library's (orphans are removed by name and mark)

KILL_POINT: Callable[[str], None] | None = None
"""Called with a step's name before every change to the disk (set by fault-injection tests only)."""


def _step(name: str) -> None:
    if KILL_POINT is not None:
        KILL_POINT(name)


def fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the renames into it) to disk; a no-op where the OS cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the files themselves were flushed
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then every folder, deepest first."""
    folders = [folder]
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root, name))
        folders += [Path(root, d) for d in dirs]
    for sub in sorted(folders, key=lambda p: -len(p.parts)):
        fsync_dir(sub)


def share_like_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions a plain ``mkdir``/``open`` would have
    (``mkdtemp`` makes it private, 0700), so colleagues on a shared machine read what was written."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def is_disk_full(err: BaseException) -> bool:
    """``ENOSPC``, also as torch's zip writer and safetensors report it (without an errno)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(
        sign in text
        for sign in (
            "No space left on device",
            "file write failed",
            "PytorchStreamWriter failed",
            "Disk quota exceeded",
        )
    )


def disk_full_error(folder: Path, needed: int | None, written: int) -> StorageError:
    free = shutil.disk_usage(nearest_existing(folder)).free
    need = f"about {needed / 2**20:.1f} MB" if needed else f"more than the {written / 2**20:.1f} MB written"
    return StorageError(
        f"no space left on the device of {folder}: the write needs {need}, {free / 2**20:.1f} MB are free; "
        f"what it wrote was removed and what was there is intact. Free space there or choose another folder"
    )


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder`` (0 when it is not there)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def remove_orphans(path: Path) -> None:
    """Remove what a dead writer left at ``path``: its marked temporary siblings and an undecided staging
    folder; finish a decided one (``recover``). Only the library's own work folders, by name and mark."""
    for orphan in path.parent.glob(f".{path.name}.tmp-*"):
        if (orphan / WRITING).is_file() or (orphan / MANIFEST).is_file():
            shutil.rmtree(orphan, ignore_errors=True)
    if (path / STAGING).is_dir() and not (path / STAGING / COMMIT).is_file():
        shutil.rmtree(path / STAGING, ignore_errors=True)
    recover(path)


def recover(path: Path) -> None:
    """Finish a decided write into ``path`` that a crash interrupted (see the module docstring); nothing when
    there is none. A reader calls it too, as SQLite's readers roll back a hot journal."""
    staging = Path(path) / STAGING
    if not (staging / COMMIT).is_file():
        return
    try:
        _roll_forward(Path(path), staging)
    except OSError as err:
        raise CheckpointError(
            f"{path} holds a save that was interrupted after it was decided, and it cannot be finished here "
            f"({err}); open the folder once where it is writable to finish it"
        ) from None


def _roll_forward(path: Path, staging: Path) -> None:
    remove = json.loads((staging / COMMIT).read_text())["remove"]
    new = read_manifest(staging)
    if new is not None:  # else the manifest was already moved: only the staging folder is left to remove
        for rel in new.files:
            if (staging / rel).exists():
                (path / rel).parent.mkdir(parents=True, exist_ok=True)
                _step(f"rename {rel}")
                os.replace(staging / rel, path / rel)
        for rel in remove:
            if rel not in new.files:
                _step(f"remove {rel}")
                (path / rel).unlink(missing_ok=True)
        for rel in sorted({str(Path(r).parent) for r in remove} - {"."}, key=lambda p: -p.count("/")):
            try:
                (path / rel).rmdir()
            except OSError:  # not empty: a new file or one of the user's
                pass
        for sub in {str(Path(r).parent) for r in new.files} - {"."}:
            fsync_dir(path / sub)
        _step("rename manifest")
        os.replace(staging / MANIFEST, path / MANIFEST)
        fsync_dir(path)
    _step("remove staging")
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def durable_folder(
    path: str | Path, holds: str, replaces: Iterable[str] = (), needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a folder to write into; once the block completes, it becomes ``path`` (module docstring).

    ``replaces``: the files (paths inside ``path``) of an earlier write there that the new one replaces: those
    not written again are removed. Nothing else in ``path`` is touched. ``holds`` (what it is) goes into the manifest;
    ``needed_bytes`` (what the write needs) into the message of a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fresh = not path.exists() or (path.is_dir() and not any(path.iterdir()))
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) if fresh else path / STAGING
    work.mkdir(exist_ok=True)
    (work / WRITING).touch()
    try:
        yield work
        share_like_umask(work)
        _step("write manifest")
        write_manifest(work, holds)  # hidden work files (the mark) are not listed
        _step("flush")
        fsync_tree(work)
        (work / WRITING).unlink()  # from here the manifest marks it as the library's
        _commit(path, work, fresh, replaces)
    except BaseException as err:
        if (work / COMMIT).is_file():  # decided: the next reader or writer finishes it (recover)
            raise
        written = folder_bytes(work)
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(path, needed_bytes, written) from err
        raise


def _commit(path: Path, work: Path, fresh: bool, replaces: Iterable[str]) -> None:
    if fresh:
        _step("rename folder")
        os.replace(work, path)
        fsync_dir(path.parent)
        return
    # the decision is the rename of a flushed COMMIT: written in place, a kill between creating the file and
    # filling it left an empty COMMIT, a decided write whose list no reader could read (a real kill found it)
    _step("write commit")
    pending = work / f"{COMMIT}.tmp"
    with open(pending, "w") as f:
        json.dump({"remove": sorted(set(replaces) - {MANIFEST})}, f)
        f.flush()
        os.fsync(f.fileno())
    _step("rename commit")
    os.replace(pending, work / COMMIT)
    fsync_dir(work)
    _roll_forward(path, work)
