"""Save and load an adapted model: only what was trained, never pickle.

Layout of an artifact folder::

    qadapters.json          base (name + fingerprint), quantization, adapter, head spec, labels, versions,
                            training metrics
    README.md               the model card
    adapter/                LoRA: a standard peft adapter folder (adapter_config.json,
                            adapter_model.safetensors) - ``PeftModel.from_pretrained`` reads it
    bottleneck.safetensors  bottleneck adapters: their weights (their config is in qadapters.json)
    head.safetensors        the task head's weights

``load`` rebuilds the model with ``adapt`` from the stored spec (same quantization, adapter
and head), then loads the trained tensors after checking names and shapes, so a folder that
is incomplete, corrupt or from another base fails with a ``CheckpointError`` saying which.
Saving writes to a temporary sibling folder and renames it into place, so a crash never
leaves a half-written artifact where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .base import base_fingerprint, process_state
from .card import model_card
from .errors import CheckpointError, ConfigError
from .bottleneck import Bottleneck
from .heads import head_from_dict
from .lora import LoRA

FORMAT_VERSION = 1
SPEC_FILE = "qadapters.json"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"  # LoRA: a peft adapter folder
BOTTLENECK_FILE = "bottleneck.safetensors"


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


def _adapter_from_dict(data: dict | None):
    if data is None:
        return None
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == "lora":
        return LoRA(**data)
    if kind == "bottleneck":
        return Bottleneck(**data)
    raise CheckpointError(f"artifact names an unknown adapter kind {kind!r}; was it saved by a newer qadapters?")


def is_artifact(path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


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
    info = model.backbone_info
    spec = {
        "format_version": FORMAT_VERSION,
        "base": {"name": info.source, "model_type": model.base_model.config.model_type,
                 "hidden_size": info.hidden_size, "is_decoder": info.is_decoder,
                 **base_fingerprint(model.base_model)},
        "quantization": info.quantization,
        "dtype": model.dtype_arg,
        "max_length": model.max_length,
        "padding_side": info.tokenizer.padding_side,
        "adapter": model.adapter.to_dict() if model.adapter else None,
        "head": model.head_spec.to_dict(),
        "versions": _versions(),
        "training": model.training_record,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if isinstance(model.adapter, LoRA):
            model.body.save_pretrained(tmp / ADAPTER_DIR)
        elif isinstance(model.adapter, Bottleneck):
            save_file(_cpu_state(model.bottleneck), str(tmp / BOTTLENECK_FILE))
        save_file(_cpu_state(model.head), str(tmp / HEAD_FILE))
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, default=str))
        (tmp / "README.md").write_text(model_card(spec, path.name))
        if path.exists():  # swap: the old artifact is removed only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "artifact")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    state.wait_for_everyone()
    return path


def _cpu_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


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


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"artifact file {file} is missing; the artifact is incomplete, save it again")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is corrupt or not a safetensors file ({err})") from None


def _check_state(loaded: dict, expected: dict, file: Path) -> None:
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in expected.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{file}: tensor {key} has shape {tuple(loaded[key].shape)}, the model expects "
                                  f"{tuple(tensor.shape)}; the artifact was saved from a different configuration")


def _check_fingerprint(spec: dict, model, path: Path) -> None:
    saved = spec["base"]
    now = base_fingerprint(model.base_model)
    same_shape = saved.get("embedding_shape") == now["embedding_shape"]
    close = same_shape and torch.allclose(torch.tensor(saved["embedding_sample"]),
                                          torch.tensor(now["embedding_sample"]), rtol=1e-2, atol=1e-3)
    if not close:
        raise CheckpointError(f"artifact {path} was trained on a different base model than {saved['name']!r} "
                              f"resolves to now (embedding weights differ); pass base= pointing at the original "
                              f"base weights")


def load(path, base: str | None = None, device: str | torch.device | None = None, dtype: str | None = None):
    """Rebuild a saved adapted model: same base, quantization, adapter and head, trained weights.

    ``base`` overrides where the base model is read from (default: the name stored at save
    time); ``device``/``dtype`` as in ``adapt``.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from .model import adapt

    path = Path(path)
    spec = read_spec(path)
    try:
        adapter = _adapter_from_dict(spec["adapter"])
        head = head_from_dict(spec["head"])
        base_name = base or spec["base"]["name"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path / SPEC_FILE} lacks or garbles an entry ({err}); the artifact is corrupt") from None
    head_tensors = _load_tensors(path / HEAD_FILE)
    adapter_file = path / (BOTTLENECK_FILE if isinstance(adapter, Bottleneck) else f"{ADAPTER_DIR}/adapter_model.safetensors")
    adapter_tensors = _load_tensors(adapter_file) if adapter is not None else None

    model = adapt(base_name, adapter=adapter, head=head, quantization=spec["quantization"],
                  dtype=dtype or spec.get("dtype"), device=device, max_length=spec["max_length"],
                  padding_side=spec.get("padding_side"), seed=None)
    _check_fingerprint(spec, model, path)
    if isinstance(adapter, LoRA):
        # peft saves keys without the adapter name; compare against its own export of this model
        _check_state(adapter_tensors, get_peft_model_state_dict(model.body), adapter_file)
        set_peft_model_state_dict(model.body, adapter_tensors)
    elif isinstance(adapter, Bottleneck):
        _check_state(adapter_tensors, model.bottleneck.state_dict(), adapter_file)
        model.bottleneck.load_state_dict({k: v.to(model.device) for k, v in adapter_tensors.items()})
    _check_state(head_tensors, model.head.state_dict(), path / HEAD_FILE)
    model.head.load_state_dict({k: v.to(model.device) for k, v in head_tensors.items()})
    model.eval()
    return model
