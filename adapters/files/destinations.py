"""Where the library may write, decided before any slow work: the one rule for every folder it writes
(artifacts, merges, exports, training runs), a probe that a destination is writable at all, and a lock so
that two writers never share a destination."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.errors import ConfigError, StorageError


def writable_entries(
    out: Path,
    target: str,
    earlier: Callable[[Path], list[str] | None],
    *,
    overwrite: bool,
    replace_earlier: bool = False,
    foreign: str = "refuse",
    writes: Iterable[str] = (),
    hint: str = "pass overwrite=True (CLI: --overwrite) to replace it (only the files it wrote)",
) -> list[str]:
    """Which files of ``out`` writing ``target`` there may replace. The library replaces only what it wrote.

    * ``out`` is a file: refused.
    * missing or empty: nothing to replace.
    * it holds an earlier ``target`` (``earlier(out)`` lists the files that one wrote, from its manifest):
      those files, with ``overwrite`` (or always, with ``replace_earlier``); else refused, saying how (``hint``).
    * any other non-empty folder (``foreign``): ``"refuse"``; ``"beside"`` (written beside the user's files);
      ``"beside_with_overwrite"`` (the same, only with ``overwrite``). Beside means none of ``writes`` (the
      names the write creates) may already be there: an entry of the user's is never replaced.
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
        beside = ", or pass overwrite=True (CLI: --overwrite) to write beside its files (none is deleted)"
        raise ConfigError(
            f"{out} is a non-empty folder that is not a qadapters {target}; choose another folder"
            + (beside if foreign != "refuse" else "")
        )
    clash = sorted({p.name for p in out.iterdir()} & set(writes))
    if clash:
        raise ConfigError(
            f"{out} already holds {clash}, which are not a qadapters {target}'s (no manifest of the library "
            f"lists them); the library never replaces or deletes files it did not write. Move them, or choose "
            f"another folder"
        )
    return []


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (where a write to ``path`` would land)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_writable(path: str | Path, what: str) -> None:
    """Refuse, before any slow work, a destination that cannot be written: a file where a folder must go, a
    read-only filesystem, no permission. Creates and removes one empty hidden file in the nearest existing
    folder (the only way to know for certain, as permission bits lie under root, ACLs and read-only mounts)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is a file; choose a folder")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be made: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qadapters-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = {errno.EROFS: "the filesystem is read-only", errno.ENOSPC: "the disk is full"}.get(
            err.errno or 0, err.strerror or str(err)
        )
        raise StorageError(
            f"{what} {path} cannot be written ({reason}, at {existing}); choose a folder you can write to"
        ) from None


_HELD: set[tuple[int, str]] = set()


@contextmanager
def destination_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock of destination ``path``: a second writer to the same destination at the same time is
    refused at once (``ConfigError``) instead of racing the first. The lock is ``flock`` on a hidden file
    beside ``path``, removed again on release (git's ``index.lock`` leaves nothing behind either); the inode
    is checked after locking, so a file another process just removed is never taken for the lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file = str(path.parent.resolve() / f".{path.name}.qadapters-lock")
    held = (os.getpid(), file)  # a forked child does not hold its parent's lock
    if held in _HELD:  # this process holds it already (the CLI for a whole run, then the save inside it)
        yield
        return
    fd = _acquire(
        file,
        f"another qadapters process is writing the {what} {path} now; wait for it to end, or "
        "choose another destination",
    )
    _HELD.add(held)
    try:
        yield
    finally:
        _HELD.discard(held)
        try:
            os.unlink(file)  # while still locked: a process that opens it now finds a removed inode and retries
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire(file: str, busy: str) -> int:
    import fcntl

    for _ in range(8):
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(busy) from None
        try:
            if os.fstat(fd).st_ino == os.stat(file).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it between our open and our lock: take the new file
    raise ConfigError(busy)
