"""A backbone with every module in place and almost no memory: the first step of sharded loading.

``sharding/load.py`` needs the whole network (to add adapters and heads, and to shard it) before any weight
is read, and no rank may ever hold the whole. The network is built from its config with its parameters on
the meta device (Accelerate's ``init_empty_weights``; buffers such as rotary frequencies are computed as
usual), its linear layers replaced by bitsandbytes' 4-bit ones by transformers' own quantizer (the same
``modules_to_not_convert`` as ``from_pretrained``), and then each parameter becomes a *placeholder*: a
single zero expanded to the parameter's shape (stride 0), on this process's device. A placeholder is a real
tensor -- peft, heads and FSDP treat it like any weight -- yet it holds one element. ``fully_shard`` then
copies each rank's chunk of it into new memory of exactly the shard's size, which the loader fills from the
checkpoint. A 4-bit weight's placeholder has the packed shape and the storage dtype FSDP gathers in
(``sharding/fsdp.py``), so nothing is reinterpreted after sharding.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters.errors import ConfigError


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` that holds one zero (every element is the same one)."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def meta_network(config: Any, with_lm_head: bool, dtype: torch.dtype, bnb_config: Any, options: dict[str, Any]) -> Any:
    """The network of ``config`` with every parameter on the meta device (no memory), its linear layers made
    4-bit by transformers' own quantizer when ``bnb_config`` is given (the layers ``from_pretrained`` converts)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = (AutoModelForCausalLM if with_lm_head else AutoModel).from_config(config, dtype=dtype, **options)
    model.tie_weights()  # from_pretrained ties an LM head to the embeddings after loading; from_config does not
    if bnb_config is not None:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": "cpu"})
    return model


def build_skeleton(
    config: Any,
    with_lm_head: bool,
    compute_dtype: torch.dtype,
    bnb_config: Any,
    storage: torch.dtype,
    device: torch.device,
    options: dict[str, Any],
) -> PreTrainedModel:
    """The network of ``config`` with placeholder weights: 4-bit linear layers (``bnb_config``, packed bytes
    stored as ``storage``) and the rest in ``compute_dtype``; ``options`` go to ``from_config``."""
    model = meta_network(config, with_lm_head, compute_dtype, bnb_config, options)
    _replace_parameters(model, lambda module, name, param: _placed(module, name, param, storage, device))
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            _owner(model, name).register_buffer(name.rsplit(".", 1)[-1], buffer.to(device), persistent=False)
    return model


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _replace_parameters(model: nn.Module, replace: Any) -> int:
    """Swap in ``replace(module, name, param)`` for each parameter it returns one for (None: kept), once per
    parameter object, so tied weights (an LM head sharing the embeddings) stay one parameter; returns how many."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                new = replace(module, name, param)
                if new is None:
                    continue
                done[id(param)] = new
            module._parameters[name] = done[id(param)]
    return len(done)


def _params4bit(data: torch.Tensor, like: Any, module: nn.Module, storage: torch.dtype) -> nn.Parameter:
    """A frozen, already quantized bitsandbytes 4-bit weight holding ``data``, with ``like``'s settings."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        data, False, blocksize=like.blocksize, compress_statistics=like.compress_statistics,
        quant_type=like.quant_type, quant_storage=storage, module=cast(Any, module), bnb_quantized=True,
    )  # fmt: skip


def _placed(
    module: nn.Module, name: str, param: Any, storage: torch.dtype, device: torch.device
) -> nn.Parameter | None:
    """The placeholder for a meta parameter (a 4-bit weight: packed, in ``storage``); None for any other."""
    import bitsandbytes as bnb

    if param.device.type != "meta":
        return None
    if not (isinstance(module, bnb.nn.Linear4bit) and name == "weight"):
        return nn.Parameter(placeholder(tuple(param.shape), param.dtype, device), False)
    packed = param.numel() // 2
    if packed % storage.itemsize:
        raise ConfigError(
            f"a 4-bit weight of {packed} bytes cannot be stored as {storage} for FSDP; "
            f"load this model with dtype='float32' (compute in fp32) or without fsdp"
        )
    module.quant_storage = storage
    module.support_avx512bf16_for_cpu = False  # a sharded weight keeps bitsandbytes' plain layout
    return _params4bit(placeholder((packed // storage.itemsize, 1), storage, device), param, module, storage)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """True for a ``placeholder``: more than one element, all of them one."""
    return tensor.numel() > 1 and tensor.device.type != "meta" and all(s == 0 for s in tensor.stride())


def placeholders_to_meta(model: nn.Module) -> int:
    """Move every frozen placeholder of ``model`` to the meta device (FSDP2 shards meta parameters without
    allocating them; it refuses a placeholder's zero strides); returns how many it moved."""
    import bitsandbytes as bnb

    def to_meta(module: nn.Module, name: str, param: Any) -> nn.Parameter | None:
        if param.requires_grad or not is_placeholder(param):
            return None
        empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
        if isinstance(param, bnb.nn.Params4bit):
            return _params4bit(empty, param, module, param.quant_storage)
        return nn.Parameter(empty, requires_grad=False)

    return _replace_parameters(model, to_meta)
