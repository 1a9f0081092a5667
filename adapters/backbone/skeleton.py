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
    placed: dict[int, nn.Parameter] = {}  # tied weights (an LM head sharing the embeddings) stay one parameter
    for module in model.modules():
        _place(module, storage, device, placed)
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            _owner(model, name).register_buffer(name.rsplit(".", 1)[-1], buffer.to(device), persistent=False)
    return model


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _place(module: nn.Module, storage: torch.dtype, device: torch.device, placed: dict[int, nn.Parameter]) -> None:
    """Replace ``module``'s own meta parameters by placeholders (4-bit weights: packed, in ``storage``)."""
    import bitsandbytes as bnb

    for name, found in list(module._parameters.items()):
        param: Any = found  # transformers' quantizer made 4-bit weights bitsandbytes' Params4bit
        if param is None or param.device.type != "meta":
            continue
        if id(param) in placed:
            module._parameters[name] = placed[id(param)]
            continue
        if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
            packed = param.numel() // 2
            if packed % storage.itemsize:
                raise ConfigError(
                    f"a 4-bit weight of {packed} bytes cannot be stored as {storage} for FSDP; "
                    f"load this model with dtype='float32' (compute in fp32) or without fsdp"
                )
            data = placeholder((packed // storage.itemsize, 1), storage, device)
            module.weight = bnb.nn.Params4bit(
                data,
                requires_grad=False,
                blocksize=param.blocksize,
                compress_statistics=param.compress_statistics,
                quant_type=param.quant_type,
                quant_storage=storage,
                module=module,
                bnb_quantized=True,
            )
            module.quant_storage = storage
            module.support_avx512bf16_for_cpu = False  # a sharded weight keeps bitsandbytes' plain layout
        else:
            module._parameters[name] = nn.Parameter(placeholder(tuple(param.shape), param.dtype, device), False)
        placed[id(param)] = getattr(module, name)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """True for a ``placeholder``: more than one element, all of them one."""
    return tensor.numel() > 1 and tensor.device.type != "meta" and all(s == 0 for s in tensor.stride())


def placeholders_to_meta(model: nn.Module) -> int:
    """Move every frozen placeholder of ``model`` to the meta device (FSDP2 shards meta parameters without
    allocating them; it refuses a placeholder's zero strides); returns how many it moved."""
    import bitsandbytes as bnb

    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad or not (id(param) in moved or is_placeholder(param)):
                continue
            if id(param) not in moved:
                empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
                if isinstance(param, bnb.nn.Params4bit):
                    moved[id(param)] = bnb.nn.Params4bit(
                        empty, False, blocksize=param.blocksize, compress_statistics=param.compress_statistics,
                        quant_type=param.quant_type, quant_storage=param.quant_storage, module=cast(Any, module),
                        bnb_quantized=True,
                    )  # fmt: skip
                else:
                    moved[id(param)] = nn.Parameter(empty, requires_grad=False)
            module._parameters[name] = moved[id(param)]
    return len(moved)
