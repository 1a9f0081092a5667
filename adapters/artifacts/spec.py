"""``qadapters.json``, typed: ``ArtifactSpec`` (what an artifact holds and how to rebuild its model) and
``BaseRecord`` (the pretrained model it was trained on). Read and written by ``format.py`` only; the model
card (``card.py``) reads it too, which is why it stands apart from the reader and writer."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adapters.backbone.loading import base_fingerprint, weights_folder
from adapters.errors import CheckpointError, ConfigError
from adapters.files import weights_digest
from adapters.heads import HeadSpec
from adapters.methods.spec import AdapterSpec
from adapters.registry import adapter_from_dict, head_from_dict

FORMAT_VERSION = 1
SPEC_FILE = "qadapters.json"


@dataclass
class BaseRecord:
    """What an artifact records about the pretrained model it was trained on (the spec's ``base``)."""

    name: str
    """A packaged name or hub id; for a local folder, its folder name (``path`` says where it is)."""
    model_type: str
    hidden_size: int
    is_decoder: bool
    embedding_shape: list[int]
    embedding_sample: list[float]
    """A sample of the input embeddings (never quantized): identifies the weights at any quantization."""
    path: str | None = None
    """A local base's folder, relative to the artifact (a moved artifact finds a base moved with it)."""
    weights_digest: dict[str, str] | None = None
    """Every tensor's digest, where the base's files were on disk at save time."""

    @classmethod
    def of(cls, info: Any, network: Any, artifact: Path) -> BaseRecord:
        """The record of the backbone ``network`` described by ``info`` (a ``BackboneInfo``), saved at ``artifact``."""
        fingerprint = base_fingerprint(network)
        record = cls(
            info.source,
            network.config.model_type,
            info.hidden_size,
            info.is_decoder,
            fingerprint["embedding_shape"],
            fingerprint["embedding_sample"],
        )
        if os.path.isdir(info.source):
            record.name = Path(info.source).resolve().name
            record.path = os.path.relpath(Path(info.source).resolve(), artifact.resolve())
        folder = weights_folder(info.location)
        record.weights_digest = (weights_digest(folder) if folder else None) or None
        return record

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("path", "weights_digest")}


@dataclass
class ArtifactSpec:
    """``qadapters.json``: what an artifact holds and how to rebuild its model, typed. ``adapter`` and ``head``
    are the settings' dicts as saved (``adapter_spec``/``head_spec`` build them); unknown keys of newer
    writers are kept in ``extra`` and written back."""

    base: BaseRecord
    quantization: str | None
    max_length: int
    head: dict[str, Any]
    adapter: dict[str, Any] | None = None
    dtype: str | None = None
    padding_side: str | None = None
    columns: dict[str, str] = field(default_factory=lambda: {"text": "text", "label": "label"})
    """The columns it was trained on: ``qadapters eval`` reads them by default."""
    versions: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    load_options: dict[str, Any] = field(default_factory=dict)
    """How the base was read (revision, attn_implementation, trust_remote_code): a reload reads it the same way."""
    merged_from: str | None = None
    """For a merged model: the artifact it was merged from."""
    files: list[str] | None = None
    """Every entry the library wrote into the folder (since v0.2; re-saving replaces exactly these)."""
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> ArtifactSpec:
        """The spec of artifact ``path`` from its JSON; a ``CheckpointError`` naming what is missing or wrong."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{path / SPEC_FILE} is not a JSON object; the artifact is corrupt")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has artifact format {data.get('format_version')!r}; this qadapters reads "
                f"format {FORMAT_VERSION}"
            )
        known = {f.name for f in fields(cls)} - {"extra", "base"}
        check_types(cls, data, path, "")
        if isinstance(data.get("base"), dict):
            check_types(BaseRecord, data["base"], path, "base.")
        if isinstance(data.get("max_length"), int) and data["max_length"] < 1:
            raise CheckpointError(f"{path / SPEC_FILE}: max_length={data['max_length']} must be a positive integer")
        try:
            base = BaseRecord(**data["base"])
            kwargs = {k: v for k, v in data.items() if k in known}
            return cls(base=base, **kwargs, extra={k: v for k, v in data.items() if k not in known | {"base"}})
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{path / SPEC_FILE} lacks or garbles an entry ({err}); the artifact is corrupt or was "
                f"written by a newer qadapters"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "base")}
        data = {"format_version": data.pop("format_version"), "base": self.base.to_dict(), **data, **self.extra}
        return {k: v for k, v in data.items() if v is not None or k in ("adapter", "quantization", "dtype")}

    def adapter_spec(self, path: Path) -> AdapterSpec | None:
        """The adapter settings it records (None: head only)."""
        adapter: AdapterSpec | None = _built(self.adapter, adapter_from_dict, "adapter", path)
        return adapter

    def head_spec(self, path: Path) -> HeadSpec:
        """The head settings it records."""
        head: HeadSpec = _built(self.head, head_from_dict, "head", path)
        return head


def check_types(cls: type, data: dict[str, Any], path: Path, prefix: str) -> None:
    """Each field of dataclass ``cls`` present in ``data`` has the type its annotation says; else a
    ``CheckpointError`` naming the field, the value and the type (an edited spec fails here, at open, and not
    as a ``TypeError`` deep inside loading)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name == "base":  # a record of its own, checked field by field
            continue
        if f.name in data and not _of_type(data[f.name], hints[f.name]):
            raise CheckpointError(
                f"{path / SPEC_FILE}: {prefix}{f.name}={data[f.name]!r} is not of type {_type_name(hints[f.name])}; "
                f"the spec was edited or is corrupt. Restore it, or save the artifact again"
            )


def _of_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_of_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(_of_type(k, args[0]) and _of_type(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_of_type(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_args(hint) else getattr(hint, "__name__", str(hint))


def _built(entry: Any, build: Callable[[Any], Any], key: str, path: Path) -> Any:
    try:
        return build(entry)
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(
            f"{path / SPEC_FILE} lacks or garbles its {key!r} entry ({err}); the artifact is corrupt "
            f"or was written by a newer qadapters"
        ) from None
