"""Load a pretrained backbone: quantization, dtype, device placement, freezing.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) keeps the pretrained weights
frozen in 4-bit NormalFloat (NF4) with double quantization and computes in a 16/32-bit dtype;
LLM.int8() (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339) stores them in 8 bits.
Both come from bitsandbytes through ``transformers``' ``BitsAndBytesConfig``; this module only
chooses the settings:

* compute dtype for the hardware (``precision.py``): bfloat16 on GPUs that support it and on CPUs
  where it is native and measured faster, float16 on older GPUs, float32 elsewhere;
* one device per process (``device_map={"": local_process_index}``), never ``"auto"``,
  which would shard one model over all GPUs and break data parallelism;
* no blanket fp32 upcast of the unquantized weights (peft's ``prepare_model_for_kbit_training``):
  on a GPU activations stay bf16, half the memory and bandwidth of fp32;
* the backbone is loaded *without* any task head (``AutoModel``): our heads are separate
  full-precision modules, so they can never be quantized by accident.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters.backbone import kernels
from adapters.backbone.packaged import PACKAGED_MODELS, resolve_packaged
from adapters.backbone.precision import default_compute_dtype
from adapters.errors import ConfigError, UnknownModelError

QUANTIZATIONS = ("nf4", "fp4", "int8", None)
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass
class BackboneInfo:
    """What the rest of the library needs to know about a loaded, frozen backbone (the network itself
    is ``AdaptedModel.backbone``)."""

    tokenizer: Any
    source: str  # what the user passed: packaged name, folder or hub id
    location: str  # where the weights were actually read from
    quantization: str | None
    compute_dtype: torch.dtype
    is_decoder: bool
    hidden_size: int


def named_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"bfloat16"``... -> ``torch.bfloat16`` (a dtype or None passes through); a typo is a
    ``ConfigError`` listing the names."""
    if not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"``: how dtypes are written in specs, tables and logs."""
    return dtype if dtype is None or isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def resolve_source(name: str, trust_remote_code: bool = False, revision: str | None = None) -> str:
    """Map a packaged name, a local folder or a hub id to something ``from_pretrained`` reads."""
    if name in PACKAGED_MODELS:
        return str(resolve_packaged(name))
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise UnknownModelError(f"folder {name!r} has no config.json: it is not a transformers model folder")
        return name
    from transformers import AutoConfig

    try:  # a hub id: only reachable online (or from the local HF cache)
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise UnknownModelError(
            f"unknown model {name!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), not a local folder, "
            f"and not loadable as a hub id ({type(err).__name__}: {err}). Pass a packaged name, the path of a "
            f"folder saved with save_pretrained, or a hub id while online."
        ) from None
    return name


def quantization_config(quantization: str | None, compute_dtype: torch.dtype, double_quant: bool = True):
    """Our short quantization names -> ``transformers.BitsAndBytesConfig`` (or None)."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization={quantization!r} is not one of {QUANTIZATIONS}")
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # packed bytes; FSDP reinterprets them as its gather dtype when it shards (sharding/fsdp.py)
        bnb_4bit_quant_storage=torch.uint8,
    )


def is_decoder_config(config) -> bool:
    """Decoder-only LLM (pool the last token) vs bidirectional encoder (pool first/mean)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"encoder-decoder models ({config.model_type}) are not supported; use an encoder or a decoder"
        )
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return False
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def cpu_only() -> bool:
    """True when there is no GPU. Accelerate must then be told ``cpu=True``: otherwise, started by
    torchrun on CPUs, it silently trains each process alone (world size 1) instead of with gloo."""
    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def process_state() -> Any:
    """Accelerate's per-process state (rank, world size, device), created the same way everywhere."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def process_device() -> torch.device:
    """This process's device: its own GPU under DDP (``local_process_index``), else the CPU."""
    return process_state().device


@dataclass
class LoadPlan:
    """Everything ``load_backbone`` decides before it reads a weight (cheap: the config only). Sharded
    loading (``sharding/load.py``) follows the same plan with its own reader."""

    name: str
    location: str
    device: torch.device
    compute_dtype: torch.dtype
    config: Any
    decoder: bool
    quantization: str | None
    double_quant: bool
    with_lm_head: bool
    padding_side: str | None
    hub: dict[str, Any]
    options: dict[str, Any]  # for from_pretrained / from_config: attn_implementation and hub settings

    def info(self) -> BackboneInfo:
        """What the loaded backbone is; reads the tokenizer."""
        tokenizer = _load_tokenizer(self.name, self.location, self.hub, self.padding_side, self.decoder)
        return BackboneInfo(
            tokenizer, self.name, self.location, self.quantization, self.compute_dtype, self.decoder,
            self.config.hidden_size,
        )  # fmt: skip


def plan_load(
    name: str,
    quantization: str | None = "nf4",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    padding_side: str | None = None,
    with_lm_head: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> LoadPlan:
    """Check ``load_backbone``'s arguments and read the config: the ``LoadPlan``."""
    from transformers import AutoConfig

    if padding_side not in (None, "left", "right"):
        raise ConfigError(f"padding_side={padding_side!r} must be 'left', 'right' or None (the tokenizer's own)")
    hub = {"trust_remote_code": trust_remote_code, "revision": revision}
    location = resolve_source(name, trust_remote_code, revision)
    device = torch.device(device) if device is not None else process_device()
    if quantization is not None and device.type not in ("cpu", "cuda", "xpu"):
        raise ConfigError(f"bitsandbytes quantization does not run on {device.type}; pass quantization=None")
    dtype = named_dtype(dtype)
    config = AutoConfig.from_pretrained(location, **hub)
    quantization = _saved_quantization(config, quantization, location)
    decoder = is_decoder_config(config)
    if with_lm_head and not decoder:
        raise ConfigError(f"{name!r} is an encoder ({config.model_type}): a causal LM head needs a decoder")
    attention: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return LoadPlan(
        name, location, device, dtype or default_compute_dtype(device), config, decoder, quantization, double_quant,
        with_lm_head, padding_side, hub, {**hub, **attention},
    )  # fmt: skip


def prequantized(config: Any) -> dict[str, Any] | None:
    """The 4-bit settings a pre-quantized base records in its config (``qadapters quantize`` writes them;
    transformers' ``save_pretrained`` of a 4-bit model too); None for a plain base."""
    settings = getattr(config, "quantization_config", None)
    if settings is None:
        return None
    settings = settings if isinstance(settings, dict) else settings.to_dict()
    if not settings.get("load_in_4bit"):
        raise ConfigError(
            f"this base is pre-quantized with {settings.get('quant_method', 'an unknown method')} "
            f"({'8-bit' if settings.get('load_in_8bit') else 'not bitsandbytes 4-bit'}): qadapters reads "
            f"bitsandbytes 4-bit pre-quantized bases; load the unquantized base (quantization='int8' quantizes at load)"
        )
    return settings


def _saved_quantization(config: Any, asked: str | None, location: str) -> str | None:
    """The quantization a base will be loaded in: what was asked, or what a pre-quantized base holds."""
    saved = prequantized(config)
    if saved is None:
        return asked
    kind = saved.get("bnb_4bit_quant_type", "fp4")
    if asked not in (None, kind):
        raise ConfigError(
            f"{location} is pre-quantized in {kind}; it cannot be loaded as {asked!r}. Pass quantization={kind!r} "
            f"(or None), or quantize the unquantized base again"
        )
    return kind


def load_backbone(name: str, quantization: str | None = "nf4", **settings: Any) -> tuple[PreTrainedModel, BackboneInfo]:
    """Load ``name`` frozen, quantized as asked, on this process's device; with its LM head
    (``AutoModelForCausalLM``) when ``with_lm_head``, else headless (``AutoModel``). Returns the
    network and what it is. ``settings`` are ``plan_load``'s: ``dtype``, ``device``, ``double_quant``,
    ``trust_remote_code``, ``padding_side``, ``with_lm_head``, ``revision`` (a hub branch, tag or commit) and
    ``attn_implementation`` (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...), the last two for
    ``from_pretrained``."""
    return load_planned(plan_load(name, quantization, **settings))


def load_planned(plan: LoadPlan) -> tuple[PreTrainedModel, BackboneInfo]:
    """``load_backbone`` for a plan made already."""
    return _load_frozen(plan), plan.info()


def _load_frozen(plan: LoadPlan) -> PreTrainedModel:
    from transformers import AutoModel, AutoModelForCausalLM

    device = plan.device
    saved = prequantized(plan.config)  # its quantization_config is read from its config (None would unset it)
    quantize = (
        {}
        if saved
        else {"quantization_config": quantization_config(plan.quantization, plan.compute_dtype, plan.double_quant)}
    )
    model = (AutoModelForCausalLM if plan.with_lm_head else AutoModel).from_pretrained(
        plan.location,
        **quantize,
        dtype=plan.compute_dtype,
        device_map={"": device.index if device.type == "cuda" and device.index is not None else str(device)},
        **plan.options,
    )
    if saved:  # compute as asked, not in the dtype recorded when it was quantized
        for module in model.modules():
            if hasattr(module, "compute_dtype") and hasattr(module, "quant_state"):
                module.compute_dtype = plan.compute_dtype
    freeze(model, plan.decoder)
    return model


def freeze(model: Any, decoder: bool) -> None:
    """Make a loaded network what the rest of the library expects: frozen, without a pooler, one 4-bit layout."""
    # BERT-style encoders carry a pooler that our heads never use. Left in place it would be
    # quantized, targeted by "all-linear" LoRA, and leave DDP with parameters that get no grad.
    if not decoder and isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights on first CPU inference (bf16 absmax) when the CPU has
        # AVX512-BF16: eval would then compute differently from training and mutate the frozen
        # weights in place. Keep one layout and one numeric path for train and eval.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    # Frozen, and left in the compute dtype. peft's prepare_model_for_kbit_training would upcast every
    # unquantized weight (embeddings, norms) to fp32, so on a GPU the whole residual stream and every
    # saved activation would flow in fp32 (Unsloth PR #1186: 37.2 -> 28.7 GB without it). Norms
    # already compute their statistics in fp32 inside; trainable adapters and heads keep fp32 master
    # weights. With an fp32 compute dtype (most CPUs) nothing changes here.
    for param in model.parameters():
        param.requires_grad_(False)
    kernels.use_fused_kernels(model)  # RMSNorm and rotary embeddings in fewer passes, where they match


def _load_tokenizer(name, location, hub: dict, padding_side, decoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, **hub)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ConfigError(f"tokenizer of {name!r} has no pad, eos or unk token to pad batches with")
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if not decoder and tokenizer.padding_side == "left":
        # absolute position embeddings (BERT) would see every token shifted by the padding
        raise ConfigError(
            f"{name!r} is an encoder: it must be padded on the right (padding_side='right'); "
            f"left padding shifts its absolute positions"
        )
    return tokenizer


def weights_folder(location: str) -> str | None:
    """The local folder holding a base's weights: ``location`` itself, or a hub model's cached snapshot
    (None when neither is on this machine)."""
    if os.path.isdir(location):
        return location
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(location, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, not a repo id: nothing to digest
        return None


def base_fingerprint(model: PreTrainedModel) -> dict:
    """A few numbers that identify the base weights, to refuse an adapter saved on another base.

    Input embeddings are never quantized, so a sample of them identifies the checkpoint
    whatever the quantization; values are compared with a tolerance (bf16 vs fp32 loads). The base is
    frozen, so the numbers are kept on the network once read: FSDP reads them before it shards the
    embeddings (after, only a collective could).
    """
    known = getattr(model, "_qadapters_fingerprint", None)
    if known is not None:
        return dict(known)
    emb = cast(nn.Embedding, model.get_input_embeddings()).weight
    flat = emb.detach().flatten()
    idx = (torch.arange(16) * (flat.numel() // 16)).to(flat.device)
    found = {"embedding_shape": list(emb.shape), "embedding_sample": [float(v) for v in flat[idx].float().cpu()]}
    vars(model)["_qadapters_fingerprint"] = found
    return dict(found)


def enable_checkpointing(network: PreTrainedModel) -> None:
    """Activation checkpointing in every block of ``network`` (non-reentrant: works with frozen inputs).
    transformers renamed the switch (``gradient_checkpointing_enable`` warns since 5.x): the new name
    where it exists, the old one on earlier 5.x releases."""
    if hasattr(network, "activation_checkpointing_enable"):
        network.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        network.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
