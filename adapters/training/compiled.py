"""Regional compilation: ``torch.compile`` each transformer block, not the whole model.

Compiling a whole LLM traces every layer, takes minutes, and starts again for every new batch shape.
The blocks of a decoder are one class repeated, so PyTorch's regional-compilation recipe
(https://docs.pytorch.org/tutorials/recipes/regional_compilation.html) compiles the block: since torch
2.5 dynamo treats a module's parameters as inputs of the graph, so, as the recipe describes, the first
block's compiled code serves the others (one compile, not N; we did not count recompilations), while the
embeddings, the head, the loss and the loop stay eager. Inductor fuses the memory-bound work between the
matmuls (norms, rotary embeddings, the gated activation, residual adds). What dynamo cannot trace
(bitsandbytes' 4-bit matmul, the lean LoRA forward's per-group slot) ends a graph there and runs eagerly,
so the result is the eager one up to floating-point reassociation (tested: logits and a training step
against the eager model). ``dynamic=None`` is torch's default: a second batch shape recompiles once with
dynamic shapes, not once per length.

``TrainConfig(compile=True)`` compiles before the first step (after FSDP's sharding, as the FSDP2 docs
ask); the blocks stay compiled afterwards, for ``evaluate`` and ``predict`` too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from adapters.methods.targets import find_block_stack


@dataclass
class CompiledBlocks:
    """What ``compile_blocks`` did: how many blocks, of which class, and how long the wrapping took (the
    compilation itself happens at the first forward, and shows in the first step's time)."""

    blocks: int
    block_class: str
    seconds: float

    def summary(self) -> str:
        return (
            f"compile: {self.blocks} {self.block_class} blocks wrapped by torch.compile (regional); "
            "the first step compiles them"
        )


def compile_blocks(network: nn.Module, dynamic: bool | None = None) -> CompiledBlocks:
    """Compile every block of ``network``'s block stack in place (``nn.Module.compile``); idempotent."""
    started = time.perf_counter()
    _, stack = find_block_stack(network)
    for block in stack:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=dynamic)
    return CompiledBlocks(len(stack), type(stack[0]).__name__, time.perf_counter() - started)
