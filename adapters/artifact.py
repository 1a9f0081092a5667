"""Save and load an adapted model: only what was trained, never pickle.

Layout of an artifact folder::

    qadapters.json          base (name + fingerprint), quantization, adapter, head spec, labels, versions,
                            training metrics
    README.md               the model card
    adapter/                LoRA: a standard peft adapter folder (adapter_config.json,
                            adapter_model.safetensors) - ``PeftModel.from_pretrained`` reads it
    bottleneck.safetensors  bottleneck adapters: their weights (their config is in qadapters.json)
    head.safetensors        the task head's weights

This module is the format only: what is written where, and reading it back with checks. Each
adapter kind writes and reads its own files (``AdapterSpec.save``/``load``).
``AdaptedModel.from_pretrained`` (``adapters.load``) rebuilds the model with ``adapt`` from the
stored spec (same quantization, adapter and head), then loads the trained tensors after checking
names and shapes, so a folder that is incomplete, corrupt or from another base fails with a
``CheckpointError`` saying which. Saving writes to a temporary sibling folder and renames it into
place (``files.atomic_folder``), so a crash never leaves a half-written artifact where a good one was.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import base_fingerprint, process_state
from .bottleneck import BOTTLENECK_FILE  # noqa: F401 (part of the format, named here for readers)
from .card import model_card
from .errors import CheckpointError, ConfigError
from .files import atomic_folder, cpu_state, load_tensors
from .lora import ADAPTER_DIR  # noqa: F401
from .registry import adapter_from_dict, head_from_dict

FORMAT_VERSION = 1
SPEC_FILE = "qadapters.json"
HEAD_FILE = "head.safetensors"


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qadapters")
    except PackageNotFoundError:
        return "0+unknown"


def _versions() -> dict:
    import peft
    import transformers

    return {"qadapters": library_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def is_artifact(path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def artifact_spec(model, extra: dict | None = None) -> dict:
    """What ``qadapters.json`` records about ``model`` (an ``AdaptedModel``)."""
    base = model.base
    return {
        "format_version": FORMAT_VERSION,
        "base": {"name": base.source, "model_type": model.backbone.config.model_type,
                 "hidden_size": base.hidden_size, "is_decoder": base.is_decoder,
                 **base_fingerprint(model.backbone)},
        "quantization": base.quantization,
        "dtype": model.dtype_arg,
        "max_length": model.max_length,
        "padding_side": base.tokenizer.padding_side,
        "adapter": model.adapter.to_dict() if model.adapter else None,
        "head": model.head_spec.to_dict(),
        "versions": _versions(),
        "training": model.training_record,
        **(extra or {}),
    }


def save_artifact(model, path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``model``'s trainable tensors and spec to ``path`` atomically.

    An existing artifact at ``path`` is replaced; any other non-empty folder is kept unless
    ``overwrite=True``, so a typo in the path never deletes the user's files. Under several
    processes only the main one writes; the others wait for it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is a file; choose a folder path for the artifact")
    if path.is_dir() and any(path.iterdir()) and not is_artifact(path) and not overwrite:
        raise ConfigError(f"{path} is a non-empty folder that is not a qadapters artifact; choose another "
                          f"path or pass overwrite=True to replace its contents")
    state = process_state()
    if not state.is_main_process:  # under DDP every rank holds the same weights: one writes
        state.wait_for_everyone()
        return path
    spec = artifact_spec(model, extra)
    with atomic_folder(path) as tmp:
        if model.adapter is not None:
            model.adapter.save(model, tmp)
        save_file(cpu_state(model.head), str(tmp / HEAD_FILE))
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, default=str))
        (tmp / "README.md").write_text(model_card(spec, path.name))
    state.wait_for_everyone()
    return path


def read_spec(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder written by save_pretrained")
    if not (path / SPEC_FILE).is_file():
        raise CheckpointError(f"{path} has no {SPEC_FILE}: it is not a qadapters artifact (or it is incomplete)")
    try:
        spec = json.loads((path / SPEC_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / SPEC_FILE} is corrupt ({err})") from None
    if spec.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has artifact format {spec.get('format_version')!r}; this qadapters reads "
                              f"format {FORMAT_VERSION}")
    return spec


def adapter_spec_of(spec: dict, path: Path):
    """The adapter settings an artifact's spec records (None: head only)."""
    return _spec_entry(spec, "adapter", adapter_from_dict, path)


def head_spec_of(spec: dict, path: Path):
    """The head settings an artifact's spec records."""
    return _spec_entry(spec, "head", head_from_dict, path)


def _spec_entry(spec: dict, key: str, build, path: Path):
    try:
        return build(spec[key])
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path / SPEC_FILE} lacks or garbles its {key!r} entry ({err}); the artifact is "
                              f"corrupt or was written by a newer qadapters") from None


def read_head(path: Path) -> dict[str, torch.Tensor]:
    """The head's tensors of artifact ``path``."""
    return load_tensors(Path(path) / HEAD_FILE)


def check_base(spec: dict, network, path: Path) -> None:
    """Refuse a base whose weights differ from the one the artifact was trained on."""
    saved = spec["base"]
    now = base_fingerprint(network)
    same_shape = saved.get("embedding_shape") == now["embedding_shape"]
    close = same_shape and torch.allclose(torch.tensor(saved["embedding_sample"]),
                                          torch.tensor(now["embedding_sample"]), rtol=1e-2, atol=1e-3)
    if not close:
        raise CheckpointError(f"artifact {path} was trained on a different base model than {saved['name']!r} "
                              f"resolves to now (embedding weights differ); pass base= pointing at the original "
                              f"base weights")
