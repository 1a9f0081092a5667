"""Training checkpoints that survive crashes: atomic, prunable, resumable exactly.

A checkpoint is ``<output_dir>/checkpoints/step-000120/``, written by Accelerate's
``save_state`` (adapter and head weights as safetensors, optimizer, scheduler, gradient scaler,
sampler and per-process RNG states; all read back with ``torch.load(weights_only=True)``) plus
our ``trainer_state.json``: the loop's ``TrainState`` (step, epoch, position in the epoch, running
loss, early-stopping state). Only
trainable tensors are kept: a pre-save hook drops the frozen base from the model state.

Atomicity and integrity: everything is written to ``checkpoints/.tmp-step-000120`` with a manifest of every
file's sha256 (``files/manifest.py``), flushed to disk, and renamed into place once complete; a kill mid-save
leaves the previous checkpoints intact and a ``.tmp-`` folder that resuming ignores (and the next save
clears). Resuming verifies the manifest: a damaged checkpoint (flipped bytes, a garbage RNG state) is refused
and ``resume="auto"`` falls back to the newest one that verifies, saying so. A full disk is a
``StorageError`` naming the folder and the space needed, the partial folder removed.

The run folder (``output_dir``) gets ``qadapters-run.json``, the entries the run created there; ``overwrite``
removes exactly those (and in ``checkpoints/`` only the checkpoints the run wrote) and refuses a folder
without it: a user's ``metrics.jsonl`` or ``checkpoints/`` is never taken for an earlier run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adapters.backbone.sharded import full_trainable_state, load_trainable_state
from adapters.errors import CheckpointError, ConfigError
from adapters.files import read_manifest, remove_listed, verify, writable_entries
from adapters.files.durable import disk_full_error, folder_bytes, fsync_dir, fsync_tree, is_disk_full
from adapters.files.manifest import write_manifest

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"  # Accelerate's name for the model's tensors
LOCK_FILE = ".qadapters-train.lock"  # held by the run writing into an output_dir
_NAME = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read back (damaged, truncated), as opposed to one that is
    whole but does not fit the model."""


@dataclass
class TrainState:
    """Everything the loop knows that is not a tensor: saved with each checkpoint, restored on resume."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epochs finished."""
    batch_in_epoch: int = 0
    """Batches of the current epoch done: a resumed run skips them, in the same order."""
    running: float = 0.0
    """Sum of the losses since the last log line (and their count below)."""
    running_count: int = 0
    last_loss: float | None = None
    """The mean training loss of the last log interval."""
    best: float | None = None
    """The best value of the early-stopping metric so far, at ``best_step``, saved in ``best_checkpoint``."""
    best_step: int | None = None
    best_checkpoint: str | None = None
    bad_evals: int = 0
    """Evaluations in a row without improvement."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss (``skip_nonfinite``)."""
    stopped_early: bool = False
    metrics: dict = field(default_factory=dict)
    """The last evaluation's metrics, computed after step ``metrics_step``."""
    metrics_step: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """Read a saved state; keys this version does not know are ignored, missing ones keep their default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (partial ``.tmp-`` folders skipped)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name)[1]))  # type: ignore[index]  # matched above


def keep_trainable_only(model_getter):
    """An Accelerate save-state pre-hook: replace each model's full state with its trainable part."""

    def hook(models, weights, output_dir):
        for i, model in enumerate(models):
            trainable = {n for n, p in model_getter(model).named_parameters() if p.requires_grad}
            prefix = "module." if any(k.startswith("module.") for k in weights[i]) else ""
            weights[i] = {k: v for k, v in weights[i].items() if k[len(prefix) :] in trainable}

    return hook


def step_checkpoint(output_dir, step: int) -> Path:
    """The folder of the checkpoint saved after ``step``."""
    return checkpoint_dir(output_dir) / f"step-{step:06d}"


def save_checkpoint(
    accelerator,
    output_dir,
    state: TrainState,
    keep_last: int | None,
    protect: Path | None = None,
    sharded: Any = None,
) -> Path:
    """Save the training state at ``state.step`` atomically; prune to ``keep_last`` (never ``protect``).
    ``sharded``: the FSDP model, whose trainable tensors Accelerate does not hold; they are gathered whole
    and written in the same file as Accelerate's, so one checkpoint format serves both."""
    root = checkpoint_dir(output_dir)
    final = step_checkpoint(output_dir, state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(accelerator, tmp, state, sharded)
    except Exception as err:
        if accelerator.is_main_process:
            written = folder_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(err):
                raise disk_full_error(root, _checkpoint_size(root), written) from err
        raise
    if accelerator.is_main_process:
        if final.exists():
            _remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if keep_last is not None:
            for old in complete_checkpoints(output_dir)[:-keep_last]:
                if protect is None or old.resolve() != protect.resolve():
                    _remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(accelerator: Any, tmp: Path, state: TrainState, sharded: Any) -> None:
    """Accelerate's state, the gathered FSDP weights, our state file and the manifest into ``tmp``, flushed."""
    accelerator.save_state(str(tmp), safe_serialization=True)
    if sharded is not None:
        weights = full_trainable_state(sharded)  # a collective: every rank
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(weights, str(tmp / WEIGHTS_FILE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2))
        write_manifest(tmp, "checkpoint")
        fsync_tree(tmp)


def _checkpoint_size(root: Path) -> int | None:
    """The size of the newest complete checkpoint under ``root`` (what the next one needs), if any."""
    found = complete_checkpoints(root.parent)
    return folder_bytes(found[-1]) if found else None


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint the run wrote: its manifest's files (then the folder, if nothing else is in it);
    one written before manifests, or whose manifest is damaged, whole (it is the run's by name and place)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        manifest = None
    if manifest is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    remove_listed(path, manifest)
    try:
        path.rmdir()
    except OSError:
        pass


def resolve_resume(resume, output_dir) -> Path | None:
    """``"auto"`` -> newest complete checkpoint (or None to start fresh); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir) if output_dir else []
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"cannot resume from {path}: no {STATE_FILE} there (not a complete checkpoint). "
            f"Complete ones: {[str(p) for p in complete_checkpoints(output_dir)] if output_dir else []}"
        )
    return path


def load_checkpoint(accelerator, path: Path, trainable: set[str], sharded: Any = None) -> TrainState:
    """Restore the tensors (model, optimizer, scheduler, RNG) into ``accelerator``'s objects; return the state.

    The frozen base is not in a checkpoint, so the model is loaded non-strictly; ``trainable`` (the names
    of the model's trainable tensors) must then match the saved ones exactly, or a resumed run would go on
    silently from fresh adapter weights."""
    from safetensors import SafetensorError

    _verify_checkpoint(path)
    try:
        state = TrainState.from_dict(json.loads((path / STATE_FILE).read_text()))
        saved = set(read_checkpoint_weights(path))
        if saved != trainable:
            raise CheckpointError(
                f"checkpoint {path} holds other trainable tensors than this model (e.g. saved "
                f"{sorted(saved - trainable)[:2]}, expected {sorted(trainable - saved)[:2]}): another "
                f"adapter or head, or a checkpoint of another qadapters version; start afresh "
                f"(overwrite=True)"
            )
        accelerator.load_state(str(path), strict=False)
        if sharded is not None:  # the FSDP model: Accelerate does not hold it (save_checkpoint)
            load_trainable_state(sharded, read_checkpoint_weights(path))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as err:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or does not fit this model/optimizer ({err})") from None
    return state


def _verify_checkpoint(path: Path) -> None:
    """Every file of checkpoint ``path`` as its manifest records it; a ``CorruptCheckpoint`` naming the first
    that differs. A checkpoint written before manifests is read unverified."""
    try:
        manifest = read_manifest(path)
        if manifest is not None:
            verify(path, manifest)
    except CheckpointError as err:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {err}") from None


def load_newest_good(
    accelerator: Any, resume: Any, found: Path, output_dir: Any, trainable: set[str], sharded: Any = None
) -> tuple[TrainState, Path]:
    """Load ``found`` (what ``resolve_resume`` chose); with ``resume="auto"``, a corrupt newest checkpoint
    falls back to the one before it, and so on, each fallback said on the main process. A checkpoint
    that is whole but does not fit the model is not skipped: that is a real mismatch."""
    candidates = [found]
    if resume == "auto":
        candidates = [p for p in reversed(complete_checkpoints(output_dir)) if p.name <= found.name]
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint(accelerator, path, trainable, sharded), path
        except CorruptCheckpoint as err:
            if i == len(candidates) - 1:
                raise
            accelerator.print(f"warning: {err}; resuming from the checkpoint before it, {candidates[i + 1]}")
    raise AssertionError("unreachable: the last candidate raises")


def read_checkpoint_weights(path: Path) -> dict:
    """The trainable tensors saved in checkpoint ``path`` (names as in the unwrapped model)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / WEIGHTS_FILE))
    return {k.removeprefix("module."): v for k, v in weights.items()}


RUN_FILE = "run.json"  # written when a run finishes
LOG_FILE = "metrics.jsonl"
RUN_MANIFEST = "qadapters-run.json"  # the entries a run created in its output_dir: what overwrite may remove
TRACKER_DIR = "qadapters"  # Accelerate's trackers (TensorBoard) log under the project's name
RUN_ENTRIES = (RUN_FILE, LOG_FILE, "checkpoints", TRACKER_DIR)


def check_output_dir(output_dir, resume, overwrite: bool) -> bool:
    """Refuse to silently start over in a folder holding an earlier run; True when there is one to clear
    (``overwrite``). Cheap: callers run it before loading a model. An earlier run is known by its
    ``qadapters-run.json`` only: files that merely have a run's names (``metrics.jsonl``, ``checkpoints/``)
    are the user's, never replaced."""
    if output_dir is None:
        return False
    out = Path(output_dir)
    if resume is not None and complete_checkpoints(out):  # resuming deletes nothing (runs before manifests too)
        return False
    earlier = writable_entries(
        out,
        "run (checkpoints and logs)",
        _run_entries,
        overwrite=overwrite,
        replace_earlier=resume is not None,  # resuming keeps them
        foreign="beside",  # checkpoints and logs go beside the user's files
        writes=(*RUN_ENTRIES[:3], RUN_MANIFEST),
        hint="continue it with resume='auto' (YAML: train.resume=auto) or start afresh with overwrite=True "
        f"(train.overwrite=true), which deletes what that run created (listed in {RUN_MANIFEST}) and nothing else",
    )
    return bool(earlier) and resume is None


def _run_entries(out: Path) -> list[str] | None:
    """The entries an earlier run created in ``out``, from its manifest (None: no run of ours there)."""
    try:
        data = json.loads((out / RUN_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    created = data.get("created") if isinstance(data, dict) else None
    if not isinstance(created, list):
        return None
    return [name for name in created if name in RUN_ENTRIES]


def prepare_output_dir(output_dir, resume, overwrite: bool, is_main: bool) -> None:
    """``check_output_dir``, then on ``overwrite`` delete only what the earlier run created there (its
    manifest's entries; in ``checkpoints/`` only its checkpoints), never the user's other files; then record
    what this run creates."""
    if output_dir is None or not is_main:  # the main process decides (others would race its writes)
        return
    out = Path(output_dir)
    for stale in checkpoint_dir(out).glob(".tmp-step-*"):  # a killed run's partial checkpoint (ours by name)
        shutil.rmtree(stale, ignore_errors=True)
    if check_output_dir(output_dir, resume, overwrite):
        for name in _run_entries(out) or []:
            _clear_entry(out / name)
    if resume is None or not (out / RUN_MANIFEST).is_file():
        created = [name for name in RUN_ENTRIES if not (out / name).exists()]
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MANIFEST).write_text(json.dumps({"writer": "qadapters", "kind": "run", "created": created}))


def write_run_record(output_dir: Any, **fields: Any) -> None:
    """Merge ``fields`` into ``run.json``, written whole or not at all (a temporary file renamed over it). It
    names an artifact only once one is saved (``artifact``: its folder, or None)."""
    file = Path(output_dir) / RUN_FILE
    try:
        record = json.loads(file.read_text()) if file.is_file() else {}
    except ValueError:
        record = {}
    tmp = file.with_name(f".{RUN_FILE}.tmp")
    tmp.write_text(json.dumps({"artifact": None, **record, **fields}, indent=2))
    os.replace(tmp, file)


def _clear_entry(entry: Path) -> None:
    """Remove one entry an earlier run created: a file; its checkpoints folder, checkpoint by checkpoint
    (a file the user put there keeps the folder); its trackers' folder."""
    if entry.is_file():
        entry.unlink()
    elif entry.name == "checkpoints" and entry.is_dir():
        for child in entry.iterdir():
            if child.is_dir() and (_NAME.match(child.name) or child.name.startswith(".tmp-step-")):
                _remove_checkpoint(child) if _NAME.match(child.name) else shutil.rmtree(child, ignore_errors=True)
        try:
            entry.rmdir()
        except OSError:
            pass
    elif entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def output_lock(output_dir: Any, is_main: bool) -> Iterator[None]:
    """Hold ``output_dir``'s lock for a run: a second training into the same folder at the same time is
    refused at once (``ConfigError``), not interleaved with the first. The main process holds it."""
    if output_dir is None or not is_main:
        yield
        return
    from filelock import FileLock, Timeout

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(output_dir) / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"another training is writing into {output_dir} now (it holds {LOCK_FILE}); wait for it to end, "
            f"or choose another output_dir"
        ) from None
    try:
        yield
    finally:
        lock.release()
