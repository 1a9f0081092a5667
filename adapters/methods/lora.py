"""LoRA through ``peft``: our small config -> ``peft.LoraConfig``, with target checking.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a weight ``W`` and learns a
low-rank update ``W + (alpha / r) * B @ A`` with ``A: r x in``, ``B: out x r``, ``B = 0`` at
start, so the adapted model equals the base until training moves it::

    x ──> W (frozen, maybe 4-bit) ──────────────┐
    └──> dropout ─> A (r x in) ─> B (out x r) ─> (+) ──> y      scale = alpha / r

rsLoRA (Kalajdzievski 2023) scales by ``alpha / sqrt(r)``; DoRA (Liu et al. 2024) splits the
weight into magnitude and direction. All of it, including the 4-bit/8-bit layer variants and
the adapter file format, is peft's; we only validate the config and the target patterns, so a
pattern that matches nothing fails with the names that do exist.

One change to peft's training path, for memory: **one dropped-out input per group of LoRA layers
that read the same tensor** (q/k/v read one normed hidden state, gate/up another). peft draws a
dropout mask per layer, so autograd keeps a dropped-out copy of the input (and its mask) for each
of them; ``lora_fused.SharedInputDropout`` draws one mask per input tensor and hands the same dropped-out
tensor to every layer of the group, so it is kept once (the idea of Unsloth's fused LoRA kernels,
without replacing peft's layers). Semantics: layers that share an input share their dropout mask;
with ``dropout=0`` nothing changes at all. ``LoRA(shared_dropout=False)`` restores peft's own.
The adapter weights, their file format and merging are untouched. The forward of every LoRA layer
is ``lora_fused.py``'s: one stacked ``A`` matmul per input group and one ``addmm`` for the update.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters.errors import ConfigError
from adapters.files import check_state, load_tensors
from adapters.methods.lora_fused import ROW_SEGMENTS, fuse_lora, share_dropout
from adapters.methods.lora_init import (
    PEFT_INIT,
    check_init,
    decomposition_bytes,
    eva,
    eva_config,
    loftq,
    rewrites_the_base,
)
from adapters.methods.lora_init import check_load as check_lora_init_load
from adapters.methods.spec import AdapterSpec
from adapters.methods.targets import BLOCK_INDEX, block_indices, check_targets

ADAPTER_DIR = "adapter"  # in an artifact: a standard peft adapter folder


@dataclass
class LoRA(AdapterSpec):
    """LoRA settings.

    ``targets``: ``"all-linear"`` (every linear layer of the backbone), a list of module names
    (matched on the name's last components, as in peft: ``["q_proj", "v_proj"]``), or one
    regular expression matched against the full module name.
    """

    r: int = 8
    """Rank of the update."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    targets: str | list[str] = "all-linear"
    rslora: bool = False
    """Rank-stabilised scaling (Kalajdzievski 2023)."""
    dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024)."""
    layers: list[int] | None = None
    """Adapt only these transformer blocks (0 = the first, -1 = the last, as ``Bottleneck(layers=)``),
    e.g. ``list(range(-20, 0))`` for the top 20. Nothing below the lowest adapted block requires a
    gradient, so backward stops there and autograd keeps no activation below it: the classic "freeze
    the early layers", cheaper in time and memory. None: every block."""
    shared_dropout: bool = True
    """Layers that read the same input (q/k/v, gate/up) share one dropout mask, so autograd keeps one
    dropped-out copy of the input instead of one per layer (see the module docstring)."""
    init: str = "default"
    """Where ``A`` and ``B`` start (``lora_init.py``): ``"default"`` (peft's: ``B = 0``), ``"gaussian"``, ``"eva"``
    (``A`` from the first training rows' layer inputs, at ``train``), ``"loftq"`` on an NF4/FP4 base (``B A``
    starts as the best rank-``r`` correction of the quantization error), or ``"pissa"`` / ``"olora"`` on an
    unquantized base (``B A`` starts as the principal part of ``W``, the frozen weight its residual; saved as
    a rank-``2r`` LoRA of the unchanged base)."""
    fused: bool = True
    """The lean forward of ``lora_fused.py`` (one stacked ``A`` matmul per group of layers that read one
    input, the update by one ``addmm``; outputs and gradients equal peft's). False: peft's own forward."""
    kind: str = field(default="lora", init=False)
    files: ClassVar[tuple[str, ...]] = (ADAPTER_DIR,)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA r={self.r!r} must be a positive integer (typical: 4-64)")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha={self.alpha!r} must be > 0 (typical: 2 * r)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.targets, (list, tuple)):
            if not self.targets:
                raise ConfigError("LoRA targets is an empty list: name modules or use 'all-linear'")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str):
            raise ConfigError(f"LoRA targets={self.targets!r} must be 'all-linear', a list of names or a regex")
        check_init(self.init)
        for name in ("shared_dropout", "fused", "rslora", "dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LoRA {name}={getattr(self, name)!r} must be True or False")
        if self.layers is not None:
            if (
                not isinstance(self.layers, (list, tuple))
                or not self.layers
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
            ):
                raise ConfigError(
                    f"LoRA layers={self.layers!r} must be a non-empty list of block indices (0, 1, ...; "
                    f"-1 the last), e.g. list(range(-15, 0)) for the top 15 blocks, or None for all"
                )
            self.layers = sorted(set(self.layers))

    def attach(self, model: Any) -> None:
        """peft's LoRA layers into ``model.backbone`` (in place); peft's wrapper kept in
        ``model.adapter_state["peft"]``."""
        model.adapter_state["peft"] = apply_lora(model.backbone, self, model.base.location)

    def check_load(self, quantization: str | None, fsdp: bool) -> None:
        check_lora_init_load(self.init, quantization, fsdp)

    def initialize(self, model: Any) -> None:
        if self.init == "loftq":
            loftq(model.adapter_state["peft"], model.base.location)
        if rewrites_the_base(self.init):  # the start, kept for save's conversion to a plain LoRA (see save)
            model.adapter_state["start"] = start = tempfile.TemporaryDirectory(prefix="qadapters-lora-start-")
            model.adapter_state["peft"].save_pretrained(start.name)

    def initialize_bytes(self, linears: list[tuple[int, int]]) -> int:
        return decomposition_bytes(linears) if self.init == "loftq" or rewrites_the_base(self.init) else 0

    def as_saved(self) -> LoRA:
        """PiSSA/OLoRA save their update as a plain LoRA of rank 2r on the unchanged base (peft's conversion:
        ``alpha`` doubled, by sqrt(2) under rsLoRA, so the scale of each half is kept)."""
        if not rewrites_the_base(self.init):
            return self
        alpha = self.alpha * (2**0.5 if self.rslora else 2)
        return replace(self, r=2 * self.r, alpha=alpha, init="default")

    def starts_from_data(self) -> bool:
        return self.init == "eva"

    def initialize_from_data(self, model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
        if self.init == "eva":
            eva(model.adapter_state["peft"], batches)

    def trained_state(self, model: Any) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        # peft's own export: keys without the adapter name, as in its adapter files
        return get_peft_model_state_dict(model.adapter_state["peft"])

    def save(self, model: Any, folder: Path) -> None:
        start = model.adapter_state.get("start")
        # PiSSA/OLoRA: B A - B_0 A_0 as a rank-2r LoRA of the original base, by peft's own conversion
        if start is None:
            model.adapter_state["peft"].save_pretrained(folder / ADAPTER_DIR)
            return
        with warnings.catch_warnings():  # peft loads the start beside the adapter and warns to convert: we do
            warnings.filterwarnings("ignore", message=".*changes the base weights", category=UserWarning)
            model.adapter_state["peft"].save_pretrained(
                folder / ADAPTER_DIR, path_initial_model_for_weight_conversion=start.name
            )
        model.adapter_state["switched"] = "?"  # peft loaded and deleted the start as a second adapter

    def load(self, model: Any, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        file = folder / ADAPTER_DIR / "adapter_model.safetensors"
        tensors = load_tensors(file)
        check_state(tensors, self.trained_state(model), file)
        set_peft_model_state_dict(model.adapter_state["peft"], tensors)

    def describe(self) -> str:
        return f"LoRA r={self.r}" + (" DoRA" if self.dora else "") + (f" {self.init}" if self.init != "default" else "")

    def merge_refusal(self) -> str | None:
        return None

    def handle(self, model: Any) -> Any:
        return model.adapter_state["peft"].active_adapter

    def can_join(self, model: Any) -> bool:
        return model.adapter_state.get("peft") is not None  # another named adapter in the same peft model

    def join(self, model: Any, folder: Path, name: str) -> Any:
        model.adapter_state["peft"].load_adapter(str(folder / ADAPTER_DIR), adapter_name=name, is_trainable=False)
        model.adapter_state["switched"] = "?"  # layers it added may be on or off: the next switch acts
        if self.fused:
            fuse_lora(model.adapter_state["peft"])  # layers the new adapter added, if any
        return name

    def switch(self, model: Any, handle: Any, on: bool) -> None:
        # peft walks every module to switch (milliseconds on a 30-layer model): done only when it changes,
        # which matters when a served batch of one adapter switches before every decoding step
        wanted = handle if on else None
        if model.adapter_state.get("switched", "?") == wanted:
            return
        layers = model.adapter_state["peft"].base_model
        if on:
            layers.enable_adapter_layers()
            model.adapter_state["peft"].set_adapter(handle)
        else:
            layers.disable_adapter_layers()
        model.adapter_state["switched"] = wanted

    def leave(self, model: Any, handle: Any) -> None:
        model.adapter_state["peft"].delete_adapter(handle)
        model.adapter_state["switched"] = "?"  # peft may have made another adapter active

    def _route_whole(self, model: Any, name: str) -> Iterator[None]:
        """Every row through adapter ``name`` (``"__base__"``: none), without peft's per-row hooks, which
        split every layer's input by adapter and keep the lean forward (methods/lora_fused.py) out."""
        self.switch(model, name, name != "__base__")
        yield

    @contextmanager
    def route(self, model: Any, rows: list[tuple[Any, torch.Tensor]]) -> Iterator[None]:
        """peft's mixed-batch forward: every LoRA layer applies, per row, the adapter ``adapter_names`` names
        (``"__base__"``: none), through the hooks of peft's own ``_enable_peft_forward_hooks``."""
        batch = len(rows[0][1])
        names = ["__base__"] * batch
        for handle, mask in rows:
            for i in mask.nonzero().flatten().tolist():
                names[i] = handle
        tuner = model.adapter_state["peft"].base_model
        if len(set(names)) == 1:  # one adapter (or none) for the whole batch: the plain (lean) forward
            yield from self._route_whole(model, names[0])
            return
        runs = _runs(names)
        if len(runs) == len({name for name, _, _ in runs}) and _all_lean(model):
            # rows in one run per adapter (the scheduler sorts them): each run's update on its own rows
            _enable_all(model)
            token = ROW_SEGMENTS.set(tuple(run for run in runs if run[0] != "__base__"))
            try:
                yield
            finally:
                ROW_SEGMENTS.reset(token)
            return
        _enable_all(model)
        # peft refuses adapter_names in training mode; the wrapper is not a submodule of the model, so
        # model.eval() leaves its own flag as get_peft_model set it (the layers themselves are in eval)
        training, tuner.training = tuner.training, False
        try:
            with tuner._enable_peft_forward_hooks(adapter_names=names):
                yield
        finally:
            tuner.training = training

    def merge(self, network: PreTrainedModel, folder: Path) -> PreTrainedModel:
        """``W' = W + (alpha/r) B A`` for every adapted layer: peft's ``merge_and_unload``."""
        from peft import PeftModel

        return PeftModel.from_pretrained(network, str(folder / ADAPTER_DIR)).merge_and_unload()


def _enable_all(model: Any) -> None:
    """Every LoRA layer on, for a forward whose rows choose their adapter (once: peft walks every module)."""
    if model.adapter_state.get("switched") != "*":
        model.adapter_state["peft"].base_model.enable_adapter_layers()
        model.adapter_state["switched"] = "*"  # any adapter's switch acts again


def _runs(names: list[str]) -> list[tuple[str, int, int]]:
    """``names`` as runs of equal names: ``(name, first, end)``."""
    runs: list[tuple[str, int, int]] = []
    for i, name in enumerate(names):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], i + 1)
        else:
            runs.append((name, i, i + 1))
    return runs


def _all_lean(model: Any) -> bool:
    """Every LoRA layer has the lean forward, which reads ``ROW_SEGMENTS`` (``lora_fused.fuse_lora``). Found once
    per set of loaded adapters: walking the modules before every decoding step cost milliseconds per step."""
    from peft.tuners.lora import LoraLayer

    peft_model = model.adapter_state["peft"]
    loaded = tuple(sorted(peft_model.peft_config))
    known = model.adapter_state.get("all_lean")
    if known is None or known[0] != loaded:
        modules = peft_model.base_model.modules()
        known = (loaded, all("forward" in vars(m) for m in modules if isinstance(m, LoraLayer)))
        model.adapter_state["all_lean"] = known
    return known[1]


def apply_lora(model: nn.Module, lora: LoRA, base_name: str) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA layers on the selected targets."""
    from peft import LoraConfig, get_peft_model

    targets = check_targets(model, lora.targets)
    target_modules = sorted({n.rsplit(".", 1)[-1] for n in targets}) if lora.targets == "all-linear" else lora.targets
    if lora.layers is not None:
        layers = block_indices(lora.layers, getattr(model.config, "num_hidden_layers", None), "LoRA")
        # the selected modules by full name: peft's layers_to_transform cannot find the blocks of a
        # headless backbone, whose block names ("layers.3...") have no parent prefix
        chosen = [n for n in targets if (m := BLOCK_INDEX.search(n)) and int(m.group(1)) in layers]
        target_modules = "|".join(re.escape(n) for n in chosen)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, takes any number
        lora_dropout=lora.dropout,
        # "all-linear" as the leaf names of every linear layer: peft's own shorthand would also
        # skip a layer it takes for an output head, which a headless backbone does not have
        target_modules=target_modules,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        init_lora_weights=PEFT_INIT[lora.init],
        eva_config=eva_config() if lora.init == "eva" else None,
        bias="none",
        base_model_name_or_path=base_name,
    )
    peft_model = get_peft_model(model, config)
    if lora.shared_dropout:
        share_dropout(peft_model)
    if lora.fused:
        fuse_lora(peft_model)
    return peft_model
