"""Sharded loading: each of N ranks reads, quantizes and holds only its own 1/N of the frozen base.

FSDP-QLoRA (Answer.AI, 2024) trains a model no single device holds, but the usual loaders still give every
rank, or rank 0, the whole model first (Answer.AI's low-memory mode and Accelerate's
``cpu_ram_efficient_loading`` keep one whole copy on rank 0; torchtune loads a full state dict and then
``distribute_tensor``). Here no rank ever holds it:

1. the backbone is built as a skeleton of placeholders (``backbone/skeleton.py``);
2. ``adapt`` adds the adapter and the head as usual (they are small and trained, and start the same as in one
   process), then ``fully_shard`` splits every parameter along its first dimension, and the input embeddings
   are split by vocabulary rows (``sharding/fsdp.py``): each rank allocates its chunks only;
3. each rank fills its chunks from the safetensors files, reading only those rows
   (``backbone/weight_files.py``). A 4-bit weight's chunk is a range of its packed bytes: the rank quantizes
   just the blocks that range covers, and the ranks share their blocks' absmax values to build the whole
   quantization state (``backbone/quantize.py``), so every byte equals the same slice of a whole-model
   quantization. A pre-quantized base (``qadapters quantize``) is read as bytes, with no quantization at all.

Replicated on every rank, not sharded: the 4-bit quantization state (absmax and constants, 1/64 byte per
weight with double quantization: ~3% of the packed weight), buffers, and the input embeddings where FSDP keeps
them whole (an embedding module that is not a plain ``nn.Embedding``). A head that starts from rows of the
input embeddings (``label_words``) has the whole table read first, once, before they are split. The trained
adapter and head are sharded by FSDP like any parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters.backbone.loading import (
    BackboneInfo,
    LoadPlan,
    freeze,
    prequantized,
    quantization_config,
    weights_folder,
)
from adapters.backbone.quantize import FourBit, quantize_range, read_state, whole_state
from adapters.backbone.skeleton import build_skeleton, placeholders_to_meta
from adapters.backbone.weight_files import WeightFiles
from adapters.errors import CheckpointError, UnknownModelError
from adapters.methods.targets import own_unit_embeddings
from adapters.sharding.embedding import chunk_rows
from adapters.sharding.fsdp import ShardReport, shard


def launched_world() -> int:
    """How many processes the launcher (torchrun, ``accelerate launch``) started, 1 when none did."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ShardedLoad:
    """Fills a skeleton's frozen parameters from ``files``: whole ones before sharding, chunks after."""

    files: WeightFiles
    prefix: str  # the backbone's name prefix in the checkpoint ("model" when a *ForCausalLM was saved)
    four_bit: dict[str, Any] | None  # the base's quantization: {"quant_type", "double_quant"}
    packed: bool  # the files hold 4-bit bytes (a pre-quantized base)
    device: torch.device
    dtype: torch.dtype  # the compute dtype: from_pretrained casts a weight to it, then quantizes it

    def name(self, parameter: str) -> str:
        """The checkpoint's name for backbone parameter ``parameter``."""
        bare = parameter.replace(".base_layer.", ".")  # peft wraps adapted layers
        for candidate in (bare, f"{self.prefix}.{bare}", bare.removeprefix(f"{self.prefix}.")):
            if candidate in self.files:
                return candidate
        raise CheckpointError(
            f"{self.files.folder} has no tensor for {parameter!r} (looked for {bare!r} and "
            f"{self.prefix + '.' + bare!r}): sharded loading reads tensors by the model's own names; this "
            f"checkpoint renames them at load. Load it without fsdp and save_pretrained it once"
        )

    def check_names(self, backbone: nn.Module) -> None:
        """Every frozen parameter has its tensor in the files (checked on every rank before any collective, so
        a misfit raises everywhere instead of leaving the other ranks waiting)."""
        for name, param in backbone.named_parameters():
            if not param.requires_grad:
                self.name(name)

    def fill_replicated(self, backbone: nn.Module, head_reads_them: bool) -> None:
        """Read the untied input embeddings whole before sharding, where they are needed whole: a head that
        starts from their rows, or an embedding module FSDP keeps whole (not a plain ``nn.Embedding``).
        Otherwise each rank reads its vocabulary rows after sharding, like any shard."""
        embeddings = own_unit_embeddings(backbone)
        if embeddings is None or (type(embeddings) is nn.Embedding and not head_reads_them):
            return
        for name, param in embeddings.named_parameters(prefix=_name_of(backbone, embeddings)):
            param.data = self.files.whole(self.name(name)).to(self.device, param.dtype)

    def fingerprint(self, backbone: nn.Module) -> dict[str, Any]:
        """``base_fingerprint``'s numbers, read from the file (16 values of the input embeddings)."""
        embeddings: Any = cast(Any, backbone).get_input_embeddings()
        name = self.name(f"{_name_of(backbone, embeddings)}.weight")
        step, dtype = self.files.numel(name) // 16, embeddings.weight.dtype
        picks = torch.cat([self.files.elements(name, i * step, i * step + 1) for i in range(16)])
        return {"embedding_shape": list(self.files.shape(name)), "embedding_sample": picks.to(dtype).float().tolist()}

    def fill_shards(self, backbone: nn.Module, rank: int, world: int, progress: bool) -> None:
        """Give every sharded frozen parameter (a meta DTensor after ``fully_shard``) this rank's chunk, read
        from the files (a collective for 4-bit weights: call it on every rank, in the same order)."""
        import bitsandbytes as bnb
        from tqdm.auto import tqdm

        done: dict[int, nn.Parameter] = {}
        modules = list(backbone.named_modules())
        for module_name, module in tqdm(modules, desc="load shards", unit="module", disable=not progress):
            for pname, param in list(module._parameters.items()):
                if param is None or param.requires_grad or not hasattr(param, "to_local"):
                    continue
                if id(param) not in done:
                    name = self.name(f"{module_name}.{pname}" if module_name else pname)
                    local = torch.empty(param.to_local().shape, dtype=param.dtype, device=self.device)
                    with torch.no_grad():
                        if isinstance(module, bnb.nn.Linear4bit) and pname == "weight":
                            self._fill_4bit(module, local, param.shape, name, rank, world)
                        else:
                            start, stop = chunk_rows(param.shape[0], rank, world)
                            local.copy_(self.files.rows(name, start, stop))
                    done[id(param)] = _with_local(param, local)
                module._parameters[pname] = done[id(param)]
        self.files.close()

    def _fill_4bit(
        self, layer: nn.Module, local: torch.Tensor, shape: torch.Size, name: str, rank: int, world: int
    ) -> None:
        import torch.distributed as dist

        size = local.element_size()
        first, last = chunk_rows(shape[0], rank, world)
        byte_start, byte_stop = first * size, last * size
        if self.packed:  # a pre-quantized base: this rank's bytes, and the state as it was saved
            raw = self.files.rows(name, byte_start, byte_stop).reshape(-1)
            local.view(torch.uint8).reshape(-1).copy_(raw)
            layer.quant_state = read_state(self.files, name, self.device)
            return
        assert self.four_bit is not None
        if not self.files.dtype(name).is_floating_point:
            raise CheckpointError(f"{self.files.folder}: {name!r} is not a float weight; it cannot be quantized")
        settings = FourBit(self.four_bit["quant_type"], self.four_bit["double_quant"], self.dtype)
        whole = self.files.shape(name)
        device = self.device

        def read(start: int, stop: int) -> torch.Tensor:
            return self.files.elements(name, start, stop).to(device)

        packed, absmax = quantize_range(read, whole, byte_start, byte_stop, settings)
        local.view(torch.uint8).reshape(-1).copy_(packed)
        absmax = absmax.to(device)
        if world > 1:
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
        layer.quant_state = whole_state(absmax, whole, settings)


def _name_of(root: nn.Module, module: nn.Module) -> str:
    """``module``'s name inside ``root``."""
    return next(name for name, found in root.named_modules() if found is module)


def _with_local(param: Any, local: torch.Tensor) -> nn.Parameter:
    """A parameter like sharded ``param`` (a DTensor) whose chunk on this rank is ``local``. FSDP2 takes the
    new parameter in place of the old at its lazy initialisation (``FSDPParam.reset_sharded_param``)."""
    from torch.distributed.tensor import DTensor

    whole = DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
    return nn.Parameter(whole, requires_grad=False)


def weight_files(location: str) -> WeightFiles:
    """The safetensors files of base ``location`` (a folder or a cached hub id), each checked against its size."""
    folder = weights_folder(location)
    if folder is None:
        raise UnknownModelError(
            f"{location!r} is not on this machine: sharded loading reads a local folder (or the hub cache); "
            f"download it first (huggingface-cli download {location})"
        )
    return WeightFiles(folder)


def open_sharded(
    plan: LoadPlan, files: WeightFiles, head_reads_embeddings: bool
) -> tuple[PreTrainedModel, BackboneInfo, ShardedLoad]:
    """The skeleton of ``plan``'s backbone with the weights it needs whole read (``fill_replicated``), what it
    is, and the loader that fills its shards (from ``files``) once ``shard_loaded`` has sharded it."""
    saved = prequantized(plan.config)
    quantization = plan.quantization  # plan_load read a pre-quantized base's own
    four_bit = None
    if quantization is not None:
        double = bool(saved["bnb_4bit_use_double_quant"]) if saved else plan.double_quant
        four_bit = {"quant_type": quantization, "double_quant": double}
    storage = torch.bfloat16 if plan.compute_dtype == torch.bfloat16 else torch.uint8  # FSDP's gather dtype
    bnb = quantization_config(quantization, plan.compute_dtype, plan.double_quant) if quantization else None
    options = {k: v for k, v in plan.options.items() if k in ("attn_implementation", "trust_remote_code")}
    network = build_skeleton(plan.config, plan.with_lm_head, plan.compute_dtype, bnb, storage, plan.device, options)
    freeze(network, plan.decoder)
    loader = ShardedLoad(files, network.base_model_prefix, four_bit, saved is not None, plan.device, plan.compute_dtype)
    loader.check_names(network)
    loader.fill_replicated(network, head_reads_embeddings)
    vars(network)["_qadapters_fingerprint"] = loader.fingerprint(network)  # what base_fingerprint reads
    return network, plan.info(), loader


def shard_loaded(model: nn.Module, loader: ShardedLoad, compute_dtype: torch.dtype) -> ShardReport:
    """Shard ``model`` (an ``AdaptedModel`` built on a skeleton) with FSDP2 and fill this rank's chunks."""
    import torch.distributed as dist

    precision = "bf16" if compute_dtype == torch.bfloat16 else "no"
    rank, world = dist.get_rank(), dist.get_world_size()
    placeholders_to_meta(model)
    report = shard(model, precision, world)
    loader.fill_shards(getattr(model, "backbone", model), rank, world, progress=rank == 0)
    return report
