"""Frozen input embeddings split by vocabulary rows over the ranks of a data-parallel run.

FSDP would gather the whole table for every forward: a lookup reads a few rows, so gathering cost more than
sharding saved (at the Llama-3.2-1B shape its 1 GiB fp32 table, gathered, raised the per-rank peak above
DDP's). Keeping it whole on every rank costs the whole table per rank (1 GiB in bf16 at Llama-3's 128K x
4096). Megatron-LM's vocabulary-parallel embedding (Shoeybi et al. 2019, arXiv:1909.08053) does neither: each
rank holds a range of rows, looks up the ids that fall in it (zeros elsewhere), and a sum over the ranks
completes every row -- exactly, since each row comes from one rank. Megatron (and torch's ``RowwiseParallel``)
assume every rank looks up the same ids, as tensor parallelism has it; under data parallelism each rank has
its own batch, so the ranks first all-gather their ids (padded to the longest), each looks up everyone's, and
one all-reduce of the looked-up activations gives each rank its own. The table is frozen: no backward, no
gradient to reduce. Its communication is the batch's activations times the ranks, not the table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def chunk_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows of a ``rows``-long first dimension that ``rank`` holds when it is split as FSDP2 and DTensor's
    ``Shard(0)`` split it (``torch.chunk``: ceil(rows / world) each, the last ones shorter or empty)."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


class VocabularySplitEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose rows are split over ``mesh``; a forward is a collective (every rank)."""

    def __init__(self, embedding: nn.Embedding, mesh: Any):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.mesh = mesh
        # a DTensor sharded on rows, as FSDP's chunks are: the loader, the reports and the checks read it alike
        weight = distribute_tensor(embedding.weight.detach(), mesh, [Shard(0)], src_data_rank=None)  # own copy
        self.weight = nn.Parameter(weight, requires_grad=False)

    def rows(self) -> tuple[int, int]:
        """The first and one-past-last vocabulary row this rank holds."""
        return chunk_rows(self.num_embeddings, self.mesh.get_local_rank(), self.mesh.size())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        group, world = self.mesh.get_group(), self.mesh.size()
        flat = ids.reshape(-1)
        length = torch.tensor([flat.numel()], device=flat.device)
        lengths = [torch.zeros_like(length) for _ in range(world)]
        dist.all_gather(lengths, length, group=group)
        longest = int(max(lengths).item())
        padded = F.pad(flat, (0, longest - flat.numel()))
        everyone = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(everyone, padded, group=group)
        start, stop = self.rows()
        local = torch.stack(everyone) - start
        outside = (local < 0) | (local >= stop - start)
        table: torch.Tensor = self.weight.to_local()  # type: ignore[attr-defined]  # a DTensor's local rows
        if table.shape[0] == 0:  # a rank without rows (more ranks than rows): contributes zeros
            found = torch.zeros(*local.shape, self.embedding_dim, dtype=table.dtype, device=table.device)
        else:
            found = F.embedding(local.masked_fill(outside, 0), table).masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(found, group=group)  # each row from the one rank that holds it: an exact sum
        mine = found[self.mesh.get_local_rank(), : flat.numel()]
        return mine.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, split over {self.mesh.size()} ranks"


def split_vocabulary(backbone: nn.Module, embeddings: nn.Module, mesh: Any) -> nn.Module | None:
    """Replace ``embeddings`` (a plain ``nn.Embedding`` inside ``backbone``) by a ``VocabularySplitEmbedding``
    and return it; None (left whole) for any other embedding module, whose forward may do more than a lookup
    (Gemma's scales it)."""
    if type(embeddings) is not nn.Embedding:
        return None
    split = VocabularySplitEmbedding(embeddings, mesh)
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if child is embeddings:
                setattr(parent, name, split)
    return split
