"""Bottleneck adapters (Houlsby and Pfeiffer) on any architecture, quantized or not.

A bottleneck adapter is a small residual MLP inserted after a sublayer of each transformer
block (Houlsby et al. 2019, *Parameter-Efficient Transfer Learning for NLP*,
arXiv:1902.00751)::

    h ──> down (d -> d/reduction) ──> activation ──> dropout ──> up (d/reduction -> d) ──> x scaling ──> (+) ──> h'
    └──────────────────────────────────────────────────────────────────────────────────────────────────┘

``up`` starts at zero, so the adapted model equals the base until training moves it.

Placements:

* ``"houlsby"``: two adapters per block, after the attention output projection and after the
  feed-forward output projection (Houlsby et al. 2019);
* ``"pfeiffer"``: one adapter per block, after the feed-forward output projection only (Pfeiffer
  et al. 2021, *AdapterFusion*, arXiv:2005.00247), half the parameters for about the same quality.

Insertion copies no model's forward and keeps no per-architecture table: a structural rule
finds the block stack (the ``ModuleList`` of identical blocks holding the most linear layers)
and, in each block, the *output projections*: the last-registered linear layer that maps back
to the hidden size inside the attention child (``o_proj``, ``attention.output.dense``,
``attn.c_proj``, ``out_proj``, ``out_lin``, ``dense``) and outside it (``down_proj``,
``output.dense``, ``mlp.c_proj``, ``dense_4h_to_h``, ``fc2``, ``lin2``). A forward hook on that
projection replaces its output ``h`` with ``h + adapter(h)``. The projection's weights (4-bit,
8-bit or not) are untouched; the adapter runs in float32 and casts back to the output's dtype.
Where the rule finds nothing, ``targets=`` names the modules by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from adapters.errors import ConfigError, TargetModulesError
from adapters.files import check_state, cpu_state, load_tensors
from adapters.methods.spec import AdapterSpec
from adapters.methods.targets import block_indices, find_block_stack, is_linear, linear_module_names, matches

PLACEMENTS = ("pfeiffer", "houlsby")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
BOTTLENECK_FILE = "bottleneck.safetensors"  # in an artifact: the adapters' weights (settings in qadapters.json)


@dataclass
class Bottleneck(AdapterSpec):
    """Bottleneck adapter settings."""

    placement: str = "pfeiffer"
    """``"pfeiffer"`` (after the feed-forward block) or ``"houlsby"`` (after attention and feed-forward)."""
    reduction: int = 16
    """Bottleneck width = hidden size / reduction."""
    bottleneck_dim: int | None = None
    """Explicit bottleneck width (overrides ``reduction``)."""
    activation: str = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    """Multiplies the adapter's output before the residual sum."""
    layers: list[int] | None = None
    """Block indices that get adapters (negative counts from the top: ``[-2, -1]``); None = all."""
    targets: str | list[str] | None = None
    """Escape hatch: module names (matched on their last components) or one regex over full names, whose
    outputs get an adapter instead of those the placement rule finds."""
    kind: str = field(default="bottleneck", init=False)
    files: ClassVar[tuple[str, ...]] = (BOTTLENECK_FILE,)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement={self.placement!r} must be one of {PLACEMENTS}")
        if not isinstance(self.reduction, int) or self.reduction < 1:
            raise ConfigError(f"reduction={self.reduction!r} must be a positive integer (typical: 8-64)")
        if self.bottleneck_dim is not None and (not isinstance(self.bottleneck_dim, int) or self.bottleneck_dim < 1):
            raise ConfigError(f"bottleneck_dim={self.bottleneck_dim!r} must be a positive integer")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
            if not self.layers:
                raise ConfigError("layers=[] selects no block; pass None for all blocks")
        if isinstance(self.targets, (list, tuple)):
            self.targets = list(self.targets)
            if not self.targets:
                raise ConfigError("targets=[] names no module; pass None to use the placement rule")

    def width(self, hidden: int) -> int:
        return self.bottleneck_dim or max(1, hidden // self.reduction)

    def attach(self, model: Any) -> None:
        """New adapter modules (``model.adapter_layers``), hooked onto the backbone's output projections."""
        model.adapter_layers = BottleneckLayers(model.backbone, self, model.base.hidden_size)

    def trained_state(self, model: Any) -> dict[str, Any]:
        return model.adapter_layers.state_dict()

    def save(self, model: Any, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(cpu_state(model.adapter_layers), str(folder / BOTTLENECK_FILE))

    def load(self, model: Any, folder: Path) -> None:
        file = folder / BOTTLENECK_FILE
        tensors = load_tensors(file)
        check_state(tensors, self.trained_state(model), file)
        model.adapter_layers.load_state_dict({k: v.to(model.device) for k, v in tensors.items()})

    def module_path(self, parameter_name: str) -> str:
        # BottleneckLayers' ModuleDict keys spell the hooked module's path with "__" (keys cannot hold dots)
        return parameter_name.replace("__", ".")

    def describe(self) -> str:
        return f"Bottleneck {self.placement}"

    def handle(self, model: Any) -> Any:
        return model.adapter_layers

    def can_join(self, model: Any) -> bool:
        return True  # more adapter layers hooked onto the same projections, one set on at a time

    def join(self, model: Any, folder: Path, name: str) -> Any:
        layers = BottleneckLayers(model.backbone, self, model.base.hidden_size).eval()
        file = folder / BOTTLENECK_FILE
        tensors = load_tensors(file)
        check_state(tensors, layers.state_dict(), file)
        layers.load_state_dict({k: v.to(model.device) for k, v in tensors.items()})
        layers.enabled = False
        return layers

    def switch(self, model: Any, handle: Any, on: bool) -> None:
        handle.enabled = on

    def leave(self, model: Any, handle: Any) -> None:
        handle.remove()  # its hooks come off the backbone; the layers go with the last reference

    @contextmanager
    def route(self, model: Any, rows: list[tuple[Any, torch.Tensor]]) -> Iterator[None]:
        """Each set of adapter layers applied to its own rows only (``BottleneckLayers.rows``)."""
        for layers, mask in rows:  # a set that serves every row needs no mask
            layers.enabled, layers.rows = bool(mask.any()), None if bool(mask.all()) else mask
        try:
            yield
        finally:
            for layers, _ in rows:
                layers.enabled, layers.rows = False, None

    def merge_refusal(self) -> str | None:
        return "they are extra non-linear modules (down, activation, up) that no weight matrix can absorb"


class BottleneckAdapter(nn.Module):
    """``h + scaling * up(dropout(act(down(h))))`` in float32, ``up`` zero at start."""

    def __init__(self, hidden: int, width: int, activation: str, dropout: float, scaling: float):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, hidden)
        self.scaling = scaling
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)
        return (x + self.scaling * self.up(self.dropout(self.act(self.down(x))))).to(hidden.dtype)


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2): weight is (in, out)
        return int(module.nf)  # type: ignore[arg-type]
    return None


def output_projections(block: nn.Module, hidden: int) -> dict[str, str | None]:
    """Names (relative to ``block``) of its attention and feed-forward output projections."""
    found: dict[str, str | None] = {"attention": None, "feed_forward": None}
    for name, module in block.named_modules():  # registration order: the last match wins
        # a layer wrapped by peft (LoRA served beside bottleneck adapters on one base) is the projection
        # itself; its own parts (base_layer, lora_A, lora_B) are not
        base_layer = getattr(module, "base_layer", None)
        if base_layer is not None and is_linear(base_layer):
            module = base_layer
        elif ".lora_" in f".{name}" or name.endswith("base_layer") or ".base_layer." in name:
            continue
        if not is_linear(module) or _out_features(module) != hidden:
            continue
        part = "attention" if _ATTENTION_NAME.search(name) else "feed_forward"
        found[part] = name
    return found


def placement_targets(model: nn.Module, spec: Bottleneck, hidden: int) -> list[str]:
    """Full names of the modules whose outputs get an adapter."""
    if spec.targets is not None:
        names = [n for n, _ in model.named_modules() if n and matches(spec.targets, n)]
        if not names:
            raise TargetModulesError(
                f"Bottleneck targets {spec.targets} match no module; linear layers are named "
                f"like {linear_module_names(model)[:6]}"
            )
        return names
    stack_name, stack = find_block_stack(model)
    indices: Sequence[int] = range(len(stack))
    if spec.layers is not None:
        indices = block_indices(spec.layers, len(stack), "Bottleneck")
    parts = ("attention", "feed_forward") if spec.placement == "houlsby" else ("feed_forward",)
    targets = []
    for i in indices:
        found = output_projections(stack[i], hidden)
        for part in parts:
            if found[part] is None:
                raise TargetModulesError(
                    f"block {stack_name}.{i} ({type(stack[i]).__name__}) has no {part.replace('_', '-')} output "
                    f"projection: looked for the last linear layer mapping to the hidden size ({hidden}) "
                    f"{'inside' if part == 'attention' else 'outside'} a child named like 'attn'/'attention'. "
                    f"Name the modules with Bottleneck(targets=[...])"
                )
            targets.append(f"{stack_name}.{i}.{found[part]}")
    return targets


class BottleneckLayers(nn.Module):
    """The adapters of one model and the hooks that apply them; saved as a plain state dict."""

    def __init__(self, model: nn.Module, spec: Bottleneck, hidden: int):
        super().__init__()
        self.targets = placement_targets(model, spec, hidden)
        modules = dict(model.named_modules())
        self.adapters = nn.ModuleDict()
        self.enabled = True  # off: the hooks pass outputs through (several sets served on one base)
        self.rows: torch.Tensor | None = None  # a batch mixing artifacts: the rows these adapters apply to
        self._handles = []
        device = next(model.parameters()).device
        for name in self.targets:
            size = _out_features(modules[name]) or hidden
            adapter = BottleneckAdapter(size, spec.width(size), spec.activation, spec.dropout, spec.scaling).to(device)
            self.adapters[name.replace(".", "__")] = adapter  # ModuleDict keys cannot hold dots
            self._handles.append(modules[name].register_forward_hook(self._hook(adapter)))

    def _hook(self, adapter: BottleneckAdapter) -> Any:
        def apply(module: Any, args: Any, output: Any) -> Any:
            if not self.enabled:
                return output
            if self.rows is None:
                return adapter(output)
            rows = self.rows.to(output.device).view(-1, *([1] * (output.dim() - 1)))
            return torch.where(rows, adapter(output), output)

        return apply

    def remove(self) -> None:
        """Detach the hooks: the base model computes as if never adapted."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
