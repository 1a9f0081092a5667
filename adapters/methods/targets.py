"""Which modules of a backbone an adapter may target: its linear layers, named as peft names them.

Shared by LoRA (``lora.py``) and bottleneck adapters (``bottleneck.py``): a list of names matches on a
module name's last components (``["q_proj", "v_proj"]``, as in peft), a string is one regular
expression over full names, and a selection that matches nothing fails with the names that exist.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from adapters.errors import ConfigError, TargetModulesError


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear layer (plain, bitsandbytes 4/8-bit, GPT-2's Conv1D) in ``model``."""
    from transformers.pytorch_utils import Conv1D

    # the output embedding (an LM head) is never an adapter target: it is the frozen next-token head
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output
    ]


BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")


def matches(targets: str | list[str], name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Return the linear modules ``targets`` selects; raise if none."""
    names = linear_module_names(model)
    if targets == "all-linear":
        matched = names
    else:
        matched = [n for n in names if matches(targets, n)]
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise TargetModulesError(
            f"LoRA targets {targets!r} match no linear layer of the base model. Its linear layers are named "
            f"{leaves} (e.g. {names[:3]}); pass some of these names, a regex over full names, or 'all-linear'."
        )
    return matched


def block_indices(layers: list[int], blocks: int | None, owner: str) -> list[int]:
    """An adapter's ``layers`` as sorted block numbers 0..blocks-1, negative ones counted from the top
    (-1 = the last block); ``owner`` names the adapter in the error."""
    if blocks is None:
        if any(i < 0 for i in layers):
            raise ConfigError(
                f"{owner} layers={layers}: counting from the top needs the model's number of blocks, "
                f"which its config does not give (num_hidden_layers); name blocks from 0"
            )
        return sorted(set(layers))
    bad = [i for i in layers if not -blocks <= i < blocks]
    if bad:
        raise ConfigError(
            f"{owner} layers={layers}: {bad} out of range, the model has {blocks} blocks "
            f"(0-{blocks - 1}, or -{blocks} to -1 from the top)"
        )
    return sorted({i % blocks for i in layers})


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of identical transformer blocks (the one holding the most linear layers)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(b) for b in module}) == 1:
            count = sum(is_linear(m) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise TargetModulesError(
            "found no stack of transformer blocks (an nn.ModuleList of identical blocks holding linear layers); "
            "name the modules to adapt with Bottleneck(targets=[...])"
        )
    return best


def is_linear(module: nn.Module) -> bool:
    """A linear layer: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's, weight stored as (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def own_unit_embeddings(backbone: Any) -> nn.Module | None:
    """The input embeddings, when FSDP should leave them out of its units (``sharding/fsdp.py`` splits them by
    vocabulary rows instead): frozen, read a few rows per lookup, and large (1 GiB in fp32 at Llama-3's 128K x
    2048 vocabulary), so gathering the whole table for each forward costs more than its shard saves. Not when
    the LM head shares their weight (tied): that one is used whole, by the head, and stays in FSDP's root."""
    embeddings = backbone.get_input_embeddings()
    output = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is embeddings.weight:
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None
