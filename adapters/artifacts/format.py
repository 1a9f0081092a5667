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
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from adapters.artifacts.card import model_card
from adapters.backbone.loading import base_fingerprint, process_state, weights_folder
from adapters.errors import CheckpointError, ConfigError
from adapters.files import atomic_folder, cpu_state, load_tensors, weights_digest
from adapters.registry import ADAPTERS, adapter_from_dict, head_from_dict

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

    return {
        "qadapters": library_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def is_artifact(path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


# what every artifact folder may hold that the library wrote (the spec's "files" says exactly, since v0.2)
# (each adapter kind names its own files)
ARTIFACT_FILES = (
    SPEC_FILE,
    HEAD_FILE,
    "README.md",
    "config.yaml",
    *dict.fromkeys(f for kind in ADAPTERS.values() for f in kind.files),
)


def written_files(path: Path) -> list[str]:
    """The entries of artifact folder ``path`` that the library wrote (what re-saving may replace)."""
    try:
        spec = json.loads((path / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return list(ARTIFACT_FILES)
    files = spec.get("files") if isinstance(spec, dict) else None
    return list(files) if isinstance(files, list) else list(ARTIFACT_FILES)


def base_entry(base, network, artifact: Path) -> dict:
    """What the spec records about the base. A local folder is recorded relative to the artifact (no absolute
    path inside: a copied or moved artifact still finds a base moved along with it), with a digest of its
    tensors that loading and merging check."""
    entry = {
        "name": base.source,
        "model_type": network.config.model_type,
        "hidden_size": base.hidden_size,
        "is_decoder": base.is_decoder,
        **base_fingerprint(network),
    }
    if os.path.isdir(base.source):
        entry["name"] = Path(base.source).resolve().name
        entry["path"] = os.path.relpath(Path(base.source).resolve(), artifact.resolve())
    folder = weights_folder(base.location)
    digest = weights_digest(folder) if folder else None
    if digest:
        entry["weights_digest"] = digest
    return entry


def artifact_spec(model, path: Path, extra: dict | None = None) -> dict:
    """What ``qadapters.json`` records about ``model`` (an ``AdaptedModel``) saved at ``path``."""
    base = model.base
    training = model.training_record
    if training and isinstance(training.get("config", {}).get("output_dir"), str):
        config = dict(training["config"])  # only where logs went: never an absolute path inside
        config["output_dir"] = Path(config["output_dir"]).name
        training = {**training, "config": config}
    columns = (training or {}).get("config", {})
    return {
        "format_version": FORMAT_VERSION,
        "base": base_entry(base, model.backbone, Path(path)),
        "quantization": base.quantization,
        "dtype": model.dtype_arg,
        "max_length": model.max_length,
        "padding_side": base.tokenizer.padding_side,
        "adapter": model.adapter.to_dict() if model.adapter else None,
        "head": model.head_spec.to_dict(),
        # the columns it was trained on: `qadapters eval` reads them by default
        "columns": {"text": columns.get("text_column", "text"), "label": columns.get("label_column", "label")},
        "versions": _versions(),
        "training": training,
        "load_options": getattr(model, "load_options", {}),
        **(extra or {}),
    }


def check_destination(path: Path, overwrite: bool, writes: Iterable[str]) -> list[str]:
    """Refuse a destination whose files we would lose; return the entries a save there replaces.

    An artifact folder: the files the library wrote there are replaced, the user's other files kept.
    Any other non-empty folder: refused, unless ``overwrite``, and then only when none of its entries
    has a name the save writes (they are kept, the artifact is written beside them)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is a file; choose a folder path for the artifact")
    if not path.is_dir() or not any(path.iterdir()):
        return []
    if is_artifact(path):
        return written_files(path)
    if not overwrite:
        raise ConfigError(
            f"{path} is a non-empty folder that is not a qadapters artifact; choose another path, or "
            f"pass overwrite=True to write the artifact beside its files (none of them is deleted)"
        )
    clash = sorted({p.name for p in path.iterdir()} & set(writes))
    if clash:
        raise ConfigError(
            f"{path} already holds {clash}, which are not a qadapters artifact's; the library never "
            f"replaces files it did not write. Move them, or choose another folder"
        )
    return []


def save_artifact(
    model, path, overwrite: bool = False, extra: dict | None = None, text_files: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s trainable tensors and spec to ``path`` atomically (``text_files``: more files to
    write beside them, e.g. the CLI's resolved ``config.yaml``).

    Re-saving into an artifact folder replaces only the files the library wrote there; any other
    non-empty folder is refused unless ``overwrite=True`` (see ``check_destination``), so a typo in the
    path never deletes the user's files. Under several processes only the main one writes.
    """
    from safetensors.torch import save_file

    path = Path(path)
    replaces = check_destination(path, overwrite, ARTIFACT_FILES + tuple(text_files or ()))
    state = process_state()
    if not state.is_main_process:  # under DDP every rank holds the same weights: one writes
        state.wait_for_everyone()
        return path
    spec = artifact_spec(model, path, extra)
    with atomic_folder(path, replaces) as tmp:
        if model.adapter is not None:
            model.adapter.save(model, tmp)
        # the tensors say which base and quantization they were trained on: an edited spec is caught
        metadata = {"quantization": str(spec["quantization"]), "base": spec["base"]["name"]}
        save_file(cpu_state(model.head), str(tmp / HEAD_FILE), metadata=metadata)
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "README.md").write_text(model_card(spec, path.name))
        spec["files"] = sorted([p.name for p in tmp.iterdir()] + [SPEC_FILE])
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, default=str))
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
        raise CheckpointError(
            f"{path} has artifact format {spec.get('format_version')!r}; this qadapters reads format {FORMAT_VERSION}"
        )
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
        raise CheckpointError(
            f"{path / SPEC_FILE} lacks or garbles its {key!r} entry ({err}); the artifact is "
            f"corrupt or was written by a newer qadapters"
        ) from None


def read_head(path: Path) -> dict[str, torch.Tensor]:
    """The head's tensors of artifact ``path``."""
    return load_tensors(Path(path) / HEAD_FILE)


def resolve_base(spec: dict, path: Path, base: str | None = None) -> str:
    """Where to read the base from: ``base`` when given; a merged artifact's own folder; a local base
    recorded relative to the artifact; else the recorded name (a packaged model or a hub id)."""
    if base is not None:
        return str(base)
    entry = spec["base"]
    if entry.get("path") is not None:
        found = (Path(path) / entry["path"]).resolve()
        if not found.is_dir():
            raise CheckpointError(
                f"artifact {path} was trained on the local base {entry['name']!r}, recorded at "
                f"{entry['path']} relative to the artifact, which is not there; pass base= (CLI: "
                f"--base) with the folder of that model"
            )
        return str(found)
    return entry["name"]


def check_base(spec: dict, network, base_location: str, path: Path) -> None:
    """Refuse a base whose weights differ from the one the artifact was trained on: every tensor's digest
    where the artifact recorded them (and the base's files are on this machine), else a sample of the
    input embeddings."""
    saved = spec["base"]
    folder = weights_folder(base_location) if saved.get("weights_digest") else None
    digest = weights_digest(folder) if folder else None
    if digest:
        changed = sorted(
            k for k in set(saved["weights_digest"]) | set(digest) if saved["weights_digest"].get(k) != digest.get(k)
        )
        if changed:
            raise CheckpointError(
                f"artifact {path} was trained on a different base than {base_location!r}: "
                f"{len(changed)} tensor(s) differ, e.g. {changed[:3]}; pass base= (CLI: --base) "
                f"pointing at the original base weights"
            )
        return
    now = base_fingerprint(network)
    same_shape = saved.get("embedding_shape") == now["embedding_shape"]
    close = same_shape and torch.allclose(
        torch.tensor(saved["embedding_sample"]), torch.tensor(now["embedding_sample"]), rtol=1e-2, atol=1e-3
    )
    if not close:
        raise CheckpointError(
            f"artifact {path} was trained on a different base model than {saved['name']!r} "
            f"resolves to now (embedding weights differ); pass base= pointing at the original "
            f"base weights"
        )


def check_quantization(spec: dict, path: Path) -> None:
    """The spec's quantization against the one the saved tensors record (artifacts since v0.2)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / HEAD_FILE), "pt") as f:
            recorded = (f.metadata() or {}).get("quantization")
    except Exception:  # noqa: BLE001 - a damaged head file is reported by read_head
        return
    if recorded is not None and recorded != str(spec["quantization"]):
        raise CheckpointError(
            f"{path / SPEC_FILE} says quantization={spec['quantization']!r} but its tensors were "
            f"trained on a {recorded!r} base; the spec was edited. Restore quantization={recorded!r}"
        )
