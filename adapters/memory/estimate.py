"""Will it fit? Training memory per device, from the model's config alone.

The model is built on PyTorch's ``meta`` device (shapes, no storage: a 70B config builds in about
a second and reads no weight), the adapter and head are added exactly as ``adapt`` adds them, and
the estimate is the sum of

* **base weights**: each linear layer that bitsandbytes quantizes costs its packed values plus its
  quantization constants (NF4/FP4 (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): half
  a byte per weight, one absmax per block of 64 weights, 4 bytes, or 1 byte plus a second-level
  fp32 absmax per 256 blocks with double quantization; LLM.int8 (Dettmers et al. 2022): one byte
  per weight plus an fp32 scale per output row); everything else (embeddings, norms, biases, an
  LM head) stays unquantized, in the compute dtype (``backbone/loading.py`` does not upcast it to fp32);
* **trainable parameters** (adapter + head, fp32), their **gradients** and the **optimizer
  states** (AdamW: 8 bytes per parameter; bitsandbytes 8-bit AdamW: 2 bytes for tensors of at
  least 4,096 values, 8 below that);
* **activations**: not a formula. The adapted meta model runs one forward pass of the requested
  batch under ``torch.autograd.graph.saved_tensors_hooks`` and every tensor autograd keeps for
  backward is counted once (views and shared tensors deduplicated, frozen weights excluded), per
  transformer block; so frozen layers cost only what their backward really needs (the input of
  a frozen linear is not saved, a LoRA dropout mask is). Two kernels differ on meta from what
  really runs and are counted as the real ones: fused attention (flash / memory-efficient: its
  inputs, output and logsumexp, not the length x length probabilities; the math path with its
  dropout masks when attention dropout is on, as for BERT) and bitsandbytes' int8 matmul (it
  keeps its input). With gradient checkpointing each block keeps only its input and one block's
  tensors are recomputed at a time (Chen et al. 2016, https://arxiv.org/abs/1604.06174);
* **transient buffers** at the peak: the larger of the gradients flowing through the widest
  saved activation (four of its size: in a gated feed-forward layer the incoming gradient and
  the gradients of the gate and up products and of their input are alive together) and the
  forward pass's working set in one block (four feed-forward-wide tensors), plus one dequantized
  weight matrix (4-bit and 8-bit layers compute in the compute dtype);
* **framework overhead**, reported apart: the CUDA context and cuBLAS workspace, which
  ``torch.cuda.max_memory_allocated`` does not see but ``nvidia-smi`` does.

Under DDP every device holds everything plus a second copy of the gradients (the buckets
all-reduce reads from); under FSDP the base weights, trainable parameters, gradients and optimizer
states are divided by the number of processes, except the input embeddings, kept whole on every rank;
during a step the root's parameters (final norm, head, tied embeddings) are gathered whole for the forward
and backward, with two blocks at a time (the one running and the next one, prefetched): measured per rank on
2 CPU processes,
``benchmarks/results/memory_accuracy-fsdp.md``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from adapters.backbone.loading import (
    DTYPES,
    QUANTIZATIONS,
    BackboneInfo,
    dtype_name,
    is_decoder_config,
    resolve_source,
)
from adapters.backbone.precision import default_compute_dtype, resolve_mixed_precision
from adapters.config.training import MIXED_PRECISION, OPTIMIZERS
from adapters.errors import ConfigError
from adapters.heads import Classification, HeadSpec
from adapters.methods.spec import AdapterSpec
from adapters.methods.targets import find_block_stack, linear_module_names, own_unit_embeddings
from adapters.model import AdaptedModel

OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for smaller tensors (min_8bit_size)
BLOCKSIZE_4BIT = 64
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace on recent GPUs, outside the allocator
# A CPU process's own memory, measured (2-core AMD EPYC, Python 3.11, torch 2.13, transformers 5.25, glibc with
# MALLOC_MMAP_THRESHOLD_=65536) after one training step of a tiny model: the interpreter's and the libraries'
# heap (anonymous), and the libraries' code mapped from their files (resident, not anonymous).
CPU_PROCESS_BYTES = 360 * 2**20
CPU_LIBRARY_BYTES = 160 * 2**20
GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per device, by part; ``total`` adds them up, ``tensors`` leaves out ``framework``."""

    base_quantized: int
    """Linear weights stored by bitsandbytes (packed values + quantization constants)."""
    base_unquantized: int
    """Embeddings, norms, biases, an LM head: the base weights bitsandbytes leaves alone."""
    trainable: int
    """Adapter and head parameters (fp32)."""
    gradients: int
    optimizer: int
    activations: int
    """What autograd keeps from the forward pass for backward (for the given batch and length)."""
    transient: int
    """Short-lived buffers at the peak: activation gradients, a dequantized weight."""
    framework: int
    """Memory the allocator does not count: the CUDA context and workspace on a GPU; on CPU the process's own
    (the interpreter's and libraries' heap)."""
    trainable_params: int
    total_params: int
    settings: dict[str, Any] = field(default_factory=dict)
    load: int = 0
    """Tensor bytes at the load's peak (``adapt``): the base as it is read and quantized, before training."""
    mapped: int = 0
    """Base weights that stay mapped from the checkpoint file (CPU, a whole load whose file holds them in the
    compute dtype: transformers keeps views of safetensors' memory map). Resident, but not anonymous."""
    libraries: int = 0
    """The libraries' code mapped from their files (CPU): resident, not anonymous."""
    init: int = 0
    """Tensor bytes at the adapter's start's peak, where it reads the base (LoRA's LoftQ: the adapted model and
    one weight's fp32 copies and SVD); 0 when the start holds nothing beyond the model."""

    PARTS = (
        "base_quantized",
        "base_unquantized",
        "trainable",
        "gradients",
        "optimizer",
        "activations",
        "transient",
        "framework",
    )

    @property
    def tensors(self) -> int:
        """Everything but the framework overhead: compare with ``torch.cuda.max_memory_allocated``."""
        return self.total - self.framework

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in self.PARTS)

    @property
    def peak(self) -> int:
        """The largest of the load's, the adapter start's and training's peak, with the framework's memory."""
        return max(self.tensors, self.load, self.init) + self.framework

    @property
    def peak_rss(self) -> int:
        """Peak resident memory of the process (CPU; on a GPU: device memory, as ``peak``)."""
        return self.peak + self.libraries

    @property
    def peak_anonymous(self) -> int:
        """Peak anonymous memory of the process (CPU: what it allocated, not mapped from files)."""
        return self.peak - self.mapped

    def to_dict(self) -> dict[str, Any]:
        found = {**asdict(self), "tensors": self.tensors, "total": self.total, "peak": self.peak}
        return {**found, "peak_rss": self.peak_rss, "peak_anonymous": self.peak_anonymous}

    def table(self) -> str:
        s = self.settings
        lines = [
            f"memory estimate per device: {s.get('model')} | {s.get('quantization') or 'no quantization'} | "
            f"{s.get('adapter')} | batch {s.get('batch_size')} x {s.get('seq_len')} tokens"
            f"{' | checkpointing' if s.get('gradient_checkpointing') else ''} | {s.get('optimizer')}"
            + (f" | {s['processes']} processes" if s.get("processes", 1) > 1 else "")
            + (" (FSDP)" if s.get("fsdp") else "")
        ]
        lines.append(
            f"trainable parameters {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%)"
        )
        width = max(len(p) for p in self.PARTS)
        for part in self.PARTS:
            lines.append(f"  {part.replace('_', ' '):<{width}}  {_human(getattr(self, part)):>10}")
        lines.append(f"  {'total':<{width}}  {_human(self.total):>10}")
        lines.append(f"  {'load peak':<{width}}  {_human(self.load):>10}  (tensors while adapt() loads the base)")
        if self.init:
            lines.append(f"  {'init peak':<{width}}  {_human(self.init):>10}  (tensors while the adapter starts)")
        if self.settings.get("device") == "cpu":
            lines.append(
                f"  peak resident {_human(self.peak_rss)}, peak anonymous {_human(self.peak_anonymous)} per process "
                f"(with the process's own {_human(self.framework)} and {_human(self.libraries)} of library code)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def quantized_linear_bytes(out_features: int, in_features: int, quantization: str, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one ``out x in`` weight."""
    n = out_features * in_features
    if quantization == "int8":
        return n + 4 * out_features  # int8 values + one fp32 scale per output row (SCB)
    blocks = math.ceil(n / BLOCKSIZE_4BIT)
    packed = math.ceil(n / 2)
    if double_quant:  # uint8 absmax per block, fp32 absmax per 256 blocks, 256-entry fp32 code, offset
        constants = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
    else:
        constants = 4 * blocks
    return packed + constants + 4 * 16  # + the 16-value NF4/FP4 code


def _config_of(model: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, type(model).__name__
    if isinstance(model, dict):
        from transformers import CONFIG_MAPPING

        kind = model.get("model_type")
        if kind not in CONFIG_MAPPING:
            raise ConfigError(f"config dict needs a known model_type, got {kind!r}")
        return CONFIG_MAPPING[str(kind)](**{k: v for k, v in model.items() if k != "model_type"}), kind
    return AutoConfig.from_pretrained(
        resolve_source(model, trust_remote_code), trust_remote_code=trust_remote_code
    ), model


@contextmanager
def _meta_init() -> Any:
    """Build modules on the meta device, without transformers' random weight init (slow, useless)."""
    from transformers import modeling_utils

    no_init = getattr(modeling_utils, "no_init_weights", None)
    with torch.device("meta"):
        if no_init is not None:
            with no_init():
                yield
        else:
            yield


def _meta_model(
    config: Any, name: str, head: Any, adapter: Any, activation_dtype: torch.dtype, trust_remote_code: bool
) -> Any:
    """The adapted model on the meta device, built by the same code paths as ``adapt``."""
    from transformers import AutoModel, AutoModelForCausalLM

    decoder = is_decoder_config(config)
    cls = AutoModelForCausalLM if head.lm_logits else AutoModel
    with _meta_init():
        net = cls.from_config(  # type: ignore[no-untyped-call]
            config, dtype=activation_dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
        )
        if not decoder and isinstance(getattr(net, "pooler", None), nn.Module):
            net.pooler = None  # as load_backbone: never used, never quantized or adapted
        for p in net.parameters():
            p.requires_grad_(False)
        quantizable = _quantizable_linears(net)
        net.name_or_path = name  # what peft records as the base (it warns when it is missing)
        base = BackboneInfo(None, "meta", name, None, activation_dtype, decoder, config.hidden_size)
        model = AdaptedModel(net, base, adapter, head, max_length=0, dtype_arg=None)
    return model, quantizable


def _quantizable_linears(net: nn.Module) -> dict[int, tuple[int, int, nn.Module]]:
    """id(weight) -> (out, in, module) of the linear layers bitsandbytes would quantize (all but an LM head)."""
    modules = dict(net.named_modules())
    found = {}
    for name in linear_module_names(net):
        weight = modules[name].weight
        found[id(weight)] = (weight.shape[0], weight.shape[1], modules[name])
    return found


class SavedTensorCounter:
    """Counts, per transformer block, the bytes autograd saves for backward during one meta forward pass.

    Every saved tensor is counted once (views and shared tensors deduplicated; frozen weights and
    buffers left out). Two kernels that differ on meta from what really runs are counted as the real
    ones: fused attention (``fused_attention``) and bitsandbytes' int8 matmul (``saves_input``, for the
    modules whose real, quantized version keeps its input for backward).

    bitsandbytes' int8 matmul keeps that input as a plain attribute of its autograd context, not as a
    saved tensor, so gradient checkpointing cannot drop it: ``held_per_block`` counts those bytes
    separately (seen on an H200: an int8 + checkpointing run kept 816 MiB more than the checkpointed
    estimate, the inputs of every int8 linear of all 30 blocks).
    """

    def __init__(self, model: Any, padded: bool = True, saves_input: tuple[Any, ...] = ()):
        self.model, self.padded, self.saves_input = model, padded, saves_input
        self.frozen = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        _, self.blocks = find_block_stack(model.backbone)
        self.current: int | None = None  # the block running now
        self.per_block = [0] * len(self.blocks)
        self.held_per_block = [0] * len(self.blocks)  # int8 matmul inputs, kept even under checkpointing
        self.held: dict[int, torch.Tensor] = {}  # id -> tensor, held so that ids are not reused
        self.outside = self.block_input = self.largest = 0
        self.seen: dict[int, torch.Tensor] = {}  # id -> tensor, held so that ids are not reused

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """The saved-tensors hook: count ``t``'s storage once."""
        base = t._base if t._base is not None else t
        if id(base) in self.frozen or id(base) in self.seen:
            return t
        self.seen[id(base)] = base
        nbytes = base.untyped_storage().nbytes()
        self.largest = max(self.largest, nbytes)
        if self.current is None:
            self.outside += nbytes
        else:
            self.per_block[self.current] += nbytes
        return t

    def hold(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage once as kept outside autograd's saved tensors (an int8 matmul input)."""
        base = t._base if t._base is not None else t
        if id(base) in self.held:
            return
        self.held[id(base)] = base
        if self.current is not None:  # outside the blocks everything is kept anyway
            self.held_per_block[self.current] += base.untyped_storage().nbytes()

    @staticmethod
    def _unmasked(module: Any, args: Any, kwargs: Any) -> Any:
        # transformers inspects the mask's values to pick a causal-attention shortcut, which meta
        # tensors do not have; without it the model builds the causal mask itself (what a padded
        # batch's mask costs is counted in fused_attention)
        kwargs["attention_mask"] = None
        # with no mask and no KV cache, transformers would look for packed rows in the position ids'
        # values: give it a cache (it holds the keys and values that backward keeps anyway)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = True
        return args, kwargs

    def fused_attention(self, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        """Stands in for SDPA. On meta tensors SDPA falls back to its decomposed math form, which saves
        the full (batch, heads, length, length) probabilities; the fused kernels that really run (flash
        on CPU and GPU, memory-efficient) save their inputs, the output and one logsumexp per row.
        With attention dropout (BERT) the math form is what runs on CPU: count it as it is."""
        dropout = kwargs.get("dropout_p", args[1] if len(args) > 1 else 0.0)
        if (dropout and self.model.training) or not any(t.requires_grad for t in (query, key, value)):
            return self.sdpa(query, key, value, *args, **kwargs)  # (frozen, nothing to backpropagate: saves nothing)
        for t in (query, key, value):
            self.pack(t)
        out_shape = (*query.shape[:-1], value.shape[-1])
        self.pack(torch.empty(out_shape, dtype=query.dtype, device="meta"))
        self.pack(torch.empty(query.shape[:-1], dtype=torch.float32, device="meta"))
        if self.padded:  # a padded batch's mask, converted to the query's dtype, is kept per layer
            self.pack(
                torch.empty((query.shape[0], 1, query.shape[-2], key.shape[-2]), dtype=query.dtype, device="meta")
            )
        # an output of the right shape that stays in the autograd graph and saves nothing itself
        return query.narrow(-1, 0, 1).expand(out_shape)

    def _hooks(self) -> list[Any]:
        handles = [self.model.backbone.register_forward_pre_hook(self._unmasked, with_kwargs=True)]
        for i, block in enumerate(self.blocks):

            def enter(module: Any, args: Any, kwargs: Any, i: Any = i) -> None:
                self.current = i
                hidden = args[0] if args else next(iter(kwargs.values()))
                self.block_input = max(self.block_input, hidden.numel() * hidden.element_size())

            def leave(module: Any, args: Any, output: Any) -> None:
                self.current = None

            handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(block.register_forward_hook(leave))
        for module in self.saves_input:
            # bitsandbytes' int8 matmul keeps its input for backward when that input needs a gradient
            def keep_input(module: Any, args: Any) -> None:
                if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                    self.hold(args[0])
                    self.pack(args[0])

            handles.append(module.register_forward_pre_hook(keep_input))
        return handles

    def run(self, inputs: dict[str, Any]) -> SavedTensorCounter:
        handles = self._hooks()
        self.model.train()
        self.sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self.fused_attention
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                self.model(**inputs)
        finally:
            torch.nn.functional.scaled_dot_product_attention = self.sdpa
            for h in handles:
                h.remove()
        return self


def estimate_memory(
    model: Any,
    adapter: AdapterSpec | None = None,
    head: HeadSpec | None = None,
    quantization: str | None = "nf4",
    batch_size: int = 8,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    mixed_precision: str = "auto",
    processes: int = 1,
    fsdp: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    world_size: int | None = None,
) -> MemoryEstimate:
    """Training memory per device for ``model`` (a packaged name, folder, hub id, a
    ``transformers`` config or a config dict, or an ``AdaptedModel`` whose settings are reused)
    with ``adapter`` and ``head``, quantized as asked, for ``batch_size`` sequences of ``seq_len``
    tokens per device. ``device`` ("cuda"/"cpu", default: this machine's) sets the compute dtype
    as ``adapt`` would (bf16 on GPUs and on CPUs where it is native and faster, else fp32) and
    whether the CUDA context counts. ``world_size`` (or ``processes``): the processes of a data-parallel run;
    with ``fsdp``, per rank of ``adapt(..., fsdp=True)``'s sharded load and FSDP training. The peak includes the
    load (``load``); on CPU ``peak_rss`` and ``peak_anonymous`` predict the process's resident and anonymous
    memory. No weight is read: only the config."""
    processes = _world(processes, world_size)
    model, source, adapter, head, quantization, dtype, device = _settings_of(
        model, adapter, head, quantization, dtype, device
    )
    head = head or Classification(labels=["0", "1"])
    _check_arguments(head, quantization, batch_size, seq_len, optimizer, mixed_precision, processes, dtype, device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = _compute_dtype(dtype, device)
    config, name = _config_of(model, trust_remote_code)
    # activations flow in the compute dtype (the base is not upcast: see base.py) unless autocast
    mixed_precision = resolve_mixed_precision(mixed_precision, device)
    activation_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, compute_dtype)
    meta, quantizable = _meta_model(config, source or name, head, adapter, activation_dtype, trust_remote_code)
    weights = _weight_bytes(meta, quantizable, quantization, double_quant, compute_dtype, optimizer)
    activations, transient, blocks = _activation_bytes(
        meta, quantizable, config, head, quantization, batch_size, seq_len, gradient_checkpointing,
        mixed_precision, activation_dtype,
    )  # fmt: skip
    widest = weights.pop("widest_weight")
    transient += widest
    sharded = fsdp and processes > 1
    transient += _parallel_bytes(weights, meta, compute_dtype, blocks, processes, sharded)
    settings = {
        "model": source or name, "quantization": quantization,
        "adapter": adapter.describe() if adapter is not None else "head only", "head": head.kind,
        "batch_size": batch_size, "seq_len": seq_len, "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer, "mixed_precision": mixed_precision, "processes": processes, "fsdp": fsdp,
        "device": device, "compute_dtype": dtype_name(compute_dtype),
    }  # fmt: skip
    estimate = _assemble(weights, activations, transient, widest, compute_dtype, config, sharded, processes, settings)
    return _with_init(estimate, adapter, quantizable)


def _parallel_bytes(
    weights: dict[str, Any], meta: Any, compute_dtype: torch.dtype, blocks: Any, processes: int, sharded: bool
) -> int:
    """The transient bytes a multi-process run adds (FSDP's gathered block), with ``weights`` made per rank:
    FSDP shards them, DDP's all-reduce buckets hold a copy of the gradients."""
    if sharded:
        return _fsdp_sharded(weights, *_root_and_kept_bytes(meta, compute_dtype), blocks, processes)
    if processes > 1:
        weights["gradients"] *= 2
    return 0


def _with_init(estimate: MemoryEstimate, adapter: AdapterSpec | None, quantizable: dict[str, Any]) -> MemoryEstimate:
    """``estimate`` with the adapter's start counted (``init``): LoftQ, PiSSA and friends hold the adapted model
    and one weight's decomposition at once, before training allocates anything."""
    starting = adapter.initialize_bytes([(o, i) for o, i, _ in quantizable.values()]) if adapter is not None else 0
    if starting:
        estimate.init = estimate.base_quantized + estimate.base_unquantized + estimate.trainable + starting
    return estimate


def _world(processes: int, world_size: int | None) -> int:
    """The number of processes, given as ``processes`` or ``world_size`` (the same thing: not both, differing)."""
    if world_size is None:
        return processes
    if processes not in (1, world_size):
        raise ConfigError(f"processes={processes} and world_size={world_size} differ: give one of them")
    return world_size


def _settings_of(
    model: Any, adapter: Any, head: Any, quantization: Any, dtype: Any, device: Any
) -> tuple[Any, str | None, Any, Any, Any, Any, Any]:
    """For an ``AdaptedModel``: its config, source, adapter, head, quantization, dtype and device (those given
    win for dtype and device); anything else passes through."""
    if not isinstance(model, AdaptedModel):
        return model, None, adapter, head, quantization, dtype, device
    dtype, device = dtype or dtype_name(model.base.compute_dtype), device or model.device.type
    return (
        model.backbone.config, model.base.source, model.adapter, model.head_spec, model.base.quantization, dtype,
        device,
    )  # fmt: skip


def _assemble(
    weights: dict[str, Any], activations: int, transient: int, widest: int, compute_dtype: torch.dtype,
    config: Any, sharded: bool, processes: int, settings: dict[str, Any],
) -> MemoryEstimate:  # fmt: skip
    """The ``MemoryEstimate`` from the parts, with the load's peak and, on CPU, the process's own memory."""
    counts, constants = weights.pop("params"), weights.pop("constants")
    cpu = settings["device"] == "cpu"
    elements = widest // compute_dtype.itemsize
    if sharded:  # a rank's rows of the widest weight as stored, cast, and every block's absmax (fp32)
        reading = elements // processes * (_stored_dtype(config).itemsize + compute_dtype.itemsize) + elements // 16
    else:  # transformers casts a whole weight to the compute dtype, then quantizes it
        reading = widest + elements // 2
    held = weights["base_quantized"] + weights["base_unquantized"] + weights["trainable"]
    # a whole CPU load keeps views of safetensors' memory map for the weights it does not cast or quantize
    mapped = weights["base_unquantized"] if cpu and not sharded and _stored_dtype(config) == compute_dtype else 0
    return MemoryEstimate(
        **weights, activations=activations, transient=transient,
        framework=CPU_PROCESS_BYTES if cpu else CUDA_CONTEXT_BYTES, trainable_params=counts[0],
        total_params=counts[1], settings={**settings, "quantization_constants": constants}, load=held + reading,
        mapped=mapped, libraries=CPU_LIBRARY_BYTES if cpu else 0,
    )  # fmt: skip


def _stored_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint stores its weights in, as its config says (fp32 when it does not)."""
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return DTYPES.get(found, torch.float32) if isinstance(found, str) else found


def _compute_dtype(dtype: str | None, device: str) -> torch.dtype:
    """The dtype asked for, else the one ``adapt`` would choose. Not ``default_compute_dtype`` for a GPU: an
    estimate for one may run on a machine without one, so a GPU is assumed bf16-capable; a CPU follows this
    CPU's policy (``backbone/precision.py``)."""
    if dtype:
        return DTYPES[dtype]
    return torch.bfloat16 if device == "cuda" else default_compute_dtype(torch.device("cpu"))


def _fsdp_sharded(weights: dict[str, Any], root: int, kept: int, split: int, blocks: int, processes: int) -> int:
    """Divide ``weights`` by the processes, as FSDP2 per block shards them (``sharding/fsdp.py``), and return
    the bytes it holds on top during a step: the root's parameters (``root`` bytes: final norm, head, tied
    embeddings), gathered for the whole forward and backward, and two blocks (the one running and the
    next, prefetched). The input embeddings are split by vocabulary rows like a shard (``split`` bytes), unless
    they are kept whole on every rank (``kept`` bytes: not a plain ``nn.Embedding``); the 4-bit quantization
    constants are whole on every rank."""
    block = (weights["base_quantized"] + weights["base_unquantized"] - root - kept - split) / max(blocks, 1)
    for part in ("trainable", "gradients", "optimizer"):
        weights[part] = math.ceil(weights[part] / processes)
    constants = weights["constants"]
    weights["base_quantized"] = constants + math.ceil((weights["base_quantized"] - constants) / processes)
    weights["base_unquantized"] = kept + math.ceil((weights["base_unquantized"] - kept) / processes)
    return int(2 * block) + root - math.ceil(root / processes)


def _root_and_kept_bytes(meta: Any, compute_dtype: torch.dtype) -> tuple[int, int, int]:
    """Bytes of the frozen parameters in FSDP2's root unit (outside the transformer blocks and the input
    embeddings FSDP leaves out: ``own_unit_embeddings``), and of those input embeddings when they are kept
    whole on every rank (not a plain ``nn.Embedding``), or split by vocabulary rows (a plain one): (root, kept,
    split)."""
    _, stack = find_block_stack(meta.backbone)
    inside = {id(p) for p in stack.parameters()}
    embeddings = own_unit_embeddings(meta.backbone)
    outside = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    frozen = [p for p in meta.parameters() if not p.requires_grad and id(p) not in inside]

    def size(params: list[nn.Parameter]) -> int:
        return sum(p.numel() * compute_dtype.itemsize for p in params)

    root = size([p for p in frozen if id(p) not in outside])
    embedded = size([p for p in frozen if id(p) in outside])
    return (root, 0, embedded) if type(embeddings) is nn.Embedding else (root, embedded, 0)


def _check_arguments(
    head: Any,
    quantization: Any,
    batch_size: Any,
    seq_len: Any,
    optimizer: Any,
    mixed_precision: Any,
    processes: Any,
    dtype: Any,
    device: Any,
) -> None:
    checks = [
        (
            isinstance(head, HeadSpec),
            f"head must be a head spec such as adapters.Classification, got {type(head).__name__}",
        ),
        (quantization in QUANTIZATIONS, f"quantization={quantization!r} is not one of {QUANTIZATIONS}"),
        (isinstance(batch_size, int) and batch_size >= 1, f"batch_size={batch_size!r} must be a positive integer"),
        (isinstance(seq_len, int) and seq_len >= 1, f"seq_len={seq_len!r} must be a positive integer"),
        (optimizer in OPTIMIZERS, f"optimizer={optimizer!r} must be one of {OPTIMIZERS}"),
        (mixed_precision in MIXED_PRECISION, f"mixed_precision={mixed_precision!r} must be one of {MIXED_PRECISION}"),
        (isinstance(processes, int) and processes >= 1, f"processes={processes!r} must be a positive integer"),
        (dtype is None or dtype in DTYPES, f"dtype={dtype!r} is not one of {sorted(DTYPES)}"),
        (device in (None, "cpu", "cuda"), f"device={device!r} must be 'cpu' or 'cuda'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _weight_bytes(
    meta: Any, quantizable: Any, quantization: Any, double_quant: Any, compute_dtype: Any, optimizer: Any
) -> dict[str, Any]:
    """Bytes of the base weights (quantized or not), the trainable parameters (fp32), their gradients and
    optimizer states; the widest dequantized weight; the parameter counts."""
    base_q = base_u = trainable = total_params = optimizer_bytes = widest_weight = constants = 0
    for p in meta.parameters():
        total_params += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            small = optimizer == "adamw" or p.numel() < BNB_8BIT_MIN_SIZE
            optimizer_bytes += (8 if small else OPTIMIZER_BYTES[optimizer]) * p.numel()
        elif quantization and id(p) in quantizable:
            out_f, in_f, _ = quantizable[id(p)]
            stored = quantized_linear_bytes(out_f, in_f, quantization, double_quant)
            base_q += stored
            constants += stored - (out_f * in_f if quantization == "int8" else math.ceil(out_f * in_f / 2))
            widest_weight = max(widest_weight, p.numel() * compute_dtype.itemsize)
        else:
            base_u += p.numel() * compute_dtype.itemsize
    return {
        "base_quantized": base_q,
        "base_unquantized": base_u,
        "trainable": 4 * trainable,
        "gradients": 4 * trainable,
        "optimizer": optimizer_bytes,
        "widest_weight": widest_weight,
        "params": (trainable, total_params),
        "constants": constants,
    }


def _activation_bytes(
    meta: Any,
    quantizable: Any,
    config: Any,
    head: Any,
    quantization: Any,
    batch_size: Any,
    seq_len: Any,
    gradient_checkpointing: Any,
    mixed_precision: Any,
    activation_dtype: Any,
) -> tuple[int, int, int]:
    """(bytes autograd keeps for backward, transient bytes at the peak, number of blocks) for one batch."""
    with torch.device("meta"):
        inputs = head.example_batch(batch_size, seq_len)
    saves_input = tuple(m for _, _, m in quantizable.values()) if quantization == "int8" else ()
    if mixed_precision != "no":
        # under autocast the adapter's and head's matmuls run in the autocast dtype, so what they save
        # for backward is in that dtype; meta tensors do not autocast, so cast those weights instead
        for p in meta.parameters():
            if p.requires_grad:
                p.data = p.data.to(activation_dtype)
    counter = SavedTensorCounter(meta, padded=True, saves_input=saves_input).run(inputs)
    outside, per_block, block_input, largest = counter.outside, counter.per_block, counter.block_input, counter.largest
    # the forward pass's working set inside one block (feed-forward products), alive even when
    # nothing is saved (a frozen base under a head-only run)
    widest = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    working_set = 4 * inputs["input_ids"].numel() * max(widest, config.hidden_size) * activation_dtype.itemsize
    if gradient_checkpointing:
        # each block keeps its input (and, for int8, its matmuls' inputs); one block is recomputed at a time
        activations = outside + len(per_block) * block_input + sum(counter.held_per_block) + max(per_block, default=0)
    else:
        activations = outside + sum(per_block)
    return activations, max(4 * largest, working_set), len(per_block)
