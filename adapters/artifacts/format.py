"""Save and load an adapted model: only what was trained, never pickle.

Layout of an artifact folder::

    qadapters.json          base (name + fingerprint), quantization, adapter, head spec, labels, versions,
                            training metrics
    qadapters-manifest.json every file above with its size and sha256 (written last; verified on open)
    README.md               the model card
    adapter/                LoRA: a standard peft adapter folder (adapter_config.json,
                            adapter_model.safetensors) - ``PeftModel.from_pretrained`` reads it
    bottleneck.safetensors  bottleneck adapters: their weights (their config is in qadapters.json)
    head.safetensors        the task head's weights

This module is the format only: what is written where, and reading it back with checks. The spec is a
typed ``ArtifactSpec`` (with the base as a ``BaseRecord``), read and written here only; ``open_artifact``
is the one reader that load, serve, merge and export start from: it checks everything that needs no
model (the spec, the adapter and head settings, the head's tensors against the head, the quantization the
tensors were trained on) before any of them loads a base. Each adapter kind writes and reads its own
files (``AdapterSpec.save``/``load``; ``AdapterSpec.files`` names them).
``AdaptedModel.from_pretrained`` (``adapters.load``) rebuilds the model with ``adapt`` from the
stored spec (same quantization, adapter and head), then loads the trained tensors after checking
names and shapes, so a folder that is incomplete, corrupt or from another base fails with a
``CheckpointError`` saying which. Saving writes to a temporary sibling folder and renames it into
place with a manifest of every file's sha256 (``files.durable``), so a crash never leaves a half-written
artifact where a good one was, and a damaged file is found when the artifact is opened.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.artifacts.card import model_card
from adapters.artifacts.spec import SPEC_FILE, ArtifactSpec, BaseRecord
from adapters.backbone.loading import base_fingerprint, process_state, weights_folder
from adapters.backbone.sharded import whole_trainables
from adapters.errors import CheckpointError
from adapters.files import (
    check_state,
    cpu_state,
    destination_lock,
    durable_folder,
    load_tensors,
    read_manifest,
    recover,
    verify,
    weights_digest,
    writable_entries,
)
from adapters.heads import HeadSpec
from adapters.methods.spec import AdapterSpec
from adapters.registry import ADAPTERS

HEAD_FILE = "head.safetensors"
logger = logging.getLogger(__name__)


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qadapters")
    except PackageNotFoundError:
        return "0+unknown"


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "qadapters": library_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def is_artifact(path: str | Path) -> bool:
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


def written_files(path: Path) -> list[str] | None:
    """The files of folder ``path`` that the library wrote, if it is an artifact (what re-saving with
    ``overwrite`` replaces): its manifest's; for an artifact written before manifests, the entries its spec
    lists, folders expanded to their files. None for any other folder."""
    manifest = read_manifest(path) if is_artifact(path) else None
    if manifest is not None:
        return list(manifest.files)
    if not is_artifact(path):
        return None
    try:
        names = json.loads((path / SPEC_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        names = None
    names = names if isinstance(names, list) else list(ARTIFACT_FILES)
    files = []
    for name in names:
        entry = path / str(name)
        found = [p for p in entry.rglob("*") if p.is_file()] if entry.is_dir() else [entry]
        files += [p.relative_to(path).as_posix() for p in found]
    return files


def artifact_spec(model: Any, path: Path, extra: dict[str, Any] | None = None) -> ArtifactSpec:
    """What ``qadapters.json`` records about ``model`` (an ``AdaptedModel``) saved at ``path``."""
    training = model.training_record
    if training and isinstance(training.get("config", {}).get("output_dir"), str):
        config = dict(training["config"])  # only where logs went: never an absolute path inside
        config["output_dir"] = Path(config["output_dir"]).name
        training = {**training, "config": config}
    columns = (training or {}).get("config", {})
    return ArtifactSpec(
        base=BaseRecord.of(model.base, model.backbone, Path(path)),
        quantization=model.base.quantization,
        dtype=model.dtype_arg,
        max_length=model.max_length,
        padding_side=model.base.tokenizer.padding_side,
        adapter=model.adapter.as_saved().to_dict() if model.adapter else None,
        head=model.head_spec.to_dict(),
        columns={"text": columns.get("text_column", "text"), "label": columns.get("label_column", "label")},
        versions=_versions(),
        training=training,
        load_options=getattr(model, "load_options", {}),
        extra=dict(extra or {}),
    )


def check_destination(path: Path, overwrite: bool, writes: Iterable[str] = ARTIFACT_FILES) -> list[str]:
    """The files a save at ``path`` replaces (``files.writable_entries``): an earlier artifact's own files, only
    with ``overwrite`` (an artifact is never replaced silently; the user's other files are kept); into any other
    non-empty folder only with ``overwrite``, beside its files, when none of them has a name the save writes."""
    return writable_entries(
        path,
        "artifact",
        written_files,
        overwrite=overwrite,
        foreign="beside_with_overwrite",
        writes=writes,
        hint="pass overwrite=True (CLI: --overwrite) to replace it (only the files the library wrote there)",
    )


def save_artifact(
    model: Any,
    path: str | Path,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    text_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s trainable tensors and spec to ``path`` atomically (``text_files``: more files to
    write beside them, e.g. the CLI's resolved ``config.yaml``).

    A folder holding an artifact is replaced only with ``overwrite=True``, and then only the files the
    library wrote there (its manifest's); any other non-empty folder is refused unless ``overwrite=True``
    (see ``check_destination``), so a typo in the path never deletes the user's files. The write is atomic and
    durable (``files.durable``). Under several processes only the main one writes.
    """
    path = Path(path)
    check_destination(path, overwrite, ARTIFACT_FILES + tuple(text_files or ()))
    with whole_trainables(model):  # under FSDP, gathered on every rank (a collective); else as they are
        _write_artifact(model, path, overwrite, extra, text_files)
    return path


def _write_artifact(
    model: Any, path: Path, overwrite: bool, extra: dict[str, Any] | None, text_files: dict[str, str] | None
) -> None:
    state = process_state()
    if not state.is_main_process:  # under DDP every rank holds the same weights: one writes
        state.wait_for_everyone()
        return
    spec = artifact_spec(model, path, extra)
    needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with destination_lock(path, "artifact"):
        replaces = check_destination(path, overwrite, ARTIFACT_FILES + tuple(text_files or ()))  # under the lock
        _write_files(model, path, spec, replaces, needed, text_files)
    state.wait_for_everyone()


def _write_files(
    model: Any, path: Path, spec: ArtifactSpec, replaces: list[str], needed: int, text_files: dict[str, str] | None
) -> None:
    with durable_folder(path, "artifact", replaces, needed) as tmp:
        if model.adapter is not None:
            model.adapter.save(model, tmp)
        write_head(cpu_state(model.head), tmp, spec)
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text)
        write_spec(spec, tmp, path.name)


def write_head(tensors: dict[str, torch.Tensor], folder: Path, spec: ArtifactSpec) -> None:
    """The head's tensors, which say which base and quantization they were trained on (an edited spec is
    caught: ``Artifact.check_quantization``)."""
    from safetensors.torch import save_file

    save_file(
        tensors, str(folder / HEAD_FILE), metadata={"quantization": str(spec.quantization), "base": spec.base.name}
    )


def write_spec(spec: ArtifactSpec, folder: Path, name: str) -> None:
    """The model card and ``qadapters.json`` into ``folder`` (last: the spec lists every file written)."""
    (folder / "README.md").write_text(model_card(spec, name))
    spec.files = sorted([p.name for p in folder.iterdir() if not p.name.startswith(".")] + [SPEC_FILE])
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2, default=str))


def read_spec(path: str | Path) -> ArtifactSpec:
    """The spec of artifact folder ``path``; a ``CheckpointError`` when it is missing, corrupt or of
    another format version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder written by save_pretrained")
    if not (path / SPEC_FILE).is_file():
        raise CheckpointError(f"{path} has no {SPEC_FILE}: it is not a qadapters artifact (or it is incomplete)")
    try:
        data = json.loads((path / SPEC_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / SPEC_FILE} is corrupt ({err})") from None
    return ArtifactSpec.from_dict(data, path)


@dataclass
class Artifact:
    """An artifact folder, opened and checked as far as it can be without a model (``open_artifact``)."""

    path: Path
    spec: ArtifactSpec
    adapter: AdapterSpec | None
    head: HeadSpec
    head_tensors: dict[str, torch.Tensor]

    def base_location(self, override: str | None = None) -> str:
        """Where to read the base from: ``override`` when given; a local base recorded relative to the
        artifact (a merged model: its own folder); else the recorded name (a packaged model or a hub id)."""
        if override is not None:
            return str(override)
        record = self.spec.base
        if record.path is not None:
            found = (self.path / record.path).resolve()
            if not found.is_dir():
                raise CheckpointError(
                    f"artifact {self.path} was trained on the local base {record.name!r}, recorded at "
                    f"{record.path} relative to the artifact, which is not there; pass base= (CLI: --base) "
                    f"with the folder of that model"
                )
            return str(found)
        return record.name

    def check_base(self, network: Any, location: str) -> None:
        """Refuse a base whose weights differ from the one the artifact was trained on: every tensor's
        digest where the artifact recorded them (and the base's files are on this machine), else a sample
        of the input embeddings."""
        record = self.spec.base
        folder = weights_folder(location) if record.weights_digest else None
        digest = weights_digest(folder) if folder else None
        if record.weights_digest and digest:
            changed = sorted(
                k for k in set(record.weights_digest) | set(digest) if record.weights_digest.get(k) != digest.get(k)
            )
            if changed:
                raise CheckpointError(
                    f"artifact {self.path} was trained on a different base than {location!r}: "
                    f"{len(changed)} tensor(s) differ, e.g. {changed[:3]}; pass base= (CLI: --base) "
                    f"pointing at the original base weights"
                )
            return
        now = base_fingerprint(network)
        close = record.embedding_shape == now["embedding_shape"] and torch.allclose(
            torch.tensor(record.embedding_sample), torch.tensor(now["embedding_sample"]), rtol=1e-2, atol=1e-3
        )
        if not close:
            raise CheckpointError(
                f"artifact {self.path} was trained on a different base model than {record.name!r} "
                f"resolves to now (embedding weights differ); pass base= pointing at the original "
                f"base weights"
            )


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Artifact folder ``path``, checked before anything slow: a save a crash interrupted after it was
    decided is finished (``files.recover``); every file against the sha256 its manifest records (``verify``);
    its spec (present, readable, this format, each field of its type), the adapter and head settings it
    records, the head's tensors against that head (names and shapes), and the quantization its tensors were
    trained on against the spec's. Load, serve, merge and export all start here, and only here; each then
    loads the base and calls ``Artifact.check_base``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder written by save_pretrained")
    recover(path)
    check_integrity(path, verify)
    spec = read_spec(path)
    adapter, head = spec.adapter_spec(path), spec.head_spec(path)
    tensors = load_tensors(path / HEAD_FILE)
    check_state(tensors, head.build(spec.base.hidden_size, spec.base.is_decoder).state_dict(), path / HEAD_FILE)
    _check_quantization(spec, path)
    return Artifact(path, spec, adapter, head, tensors)


def check_integrity(path: Path, verify_files: bool) -> None:
    """Every file of artifact ``path`` as its manifest says it was written (``verify_files``); an artifact
    written before manifests loads unverified, with a warning."""
    manifest = read_manifest(path)  # a damaged manifest raises, even unverified: it is the library's file
    if manifest is None and is_artifact(path):
        logger.warning("%s has no manifest (saved before qadapters wrote them): its files are not verified", path)
    elif manifest is not None and verify_files:
        verify(path, manifest)


def _check_quantization(spec: ArtifactSpec, path: Path) -> None:
    """The spec's quantization against the one the saved tensors record (artifacts since v0.2)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / HEAD_FILE), "pt") as f:
            recorded = (f.metadata() or {}).get("quantization")
    except Exception:  # noqa: BLE001 - a damaged head file is reported by load_tensors
        return
    if recorded is not None and recorded != str(spec.quantization):
        raise CheckpointError(
            f"{path / SPEC_FILE} says quantization={spec.quantization!r} but its tensors were "
            f"trained on a {recorded!r} base; the spec was edited. Restore quantization={recorded!r}"
        )
