"""Training checkpoints that survive crashes: atomic, prunable, resumable exactly.

A checkpoint is ``<output_dir>/checkpoints/step-000120/``, written by Accelerate's
``save_state`` (adapter and head weights as safetensors, optimizer, scheduler, gradient scaler,
sampler and per-process RNG states; all read back with ``torch.load(weights_only=True)``) plus
our ``trainer_state.json`` (step, epoch, position in the epoch, early-stopping state). Only
trainable tensors are kept: a pre-save hook drops the frozen base from the model state.

Atomicity: everything is written to ``checkpoints/.tmp-step-000120`` and renamed into place
once complete; a kill mid-save leaves the previous checkpoints intact and a ``.tmp-`` folder
that resuming ignores (and the next save clears).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import CheckpointError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (partial ``.tmp-`` folders skipped)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def keep_trainable_only(model_getter):
    """An Accelerate save-state pre-hook: replace each model's full state with its trainable part."""

    def hook(models, weights, output_dir):
        for i, model in enumerate(models):
            trainable = {n for n, p in model_getter(model).named_parameters() if p.requires_grad}
            prefix = "module." if any(k.startswith("module.") for k in weights[i]) else ""
            weights[i] = {k: v for k, v in weights[i].items() if k[len(prefix):] in trainable}

    return hook


def save_checkpoint(accelerator, output_dir, state: dict, keep_last: int | None, protect: Path | None = None) -> Path:
    """Save the training state at ``state["step"]`` atomically; prune to ``keep_last`` (never ``protect``)."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last is not None:
            for old in complete_checkpoints(output_dir)[:-keep_last]:
                if protect is None or old.resolve() != protect.resolve():
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume, output_dir) -> Path | None:
    """``"auto"`` -> newest complete checkpoint (or None to start fresh); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir) if output_dir else []
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"cannot resume from {path}: no {STATE_FILE} there (not a complete checkpoint). "
                              f"Complete ones: {[str(p) for p in complete_checkpoints(output_dir)] if output_dir else []}")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text())
        accelerator.load_state(str(path), strict=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or does not fit this model/optimizer ({err})") from None
    return state
