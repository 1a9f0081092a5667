"""The loop's data loaders: encoded rows -> batches, in the order that wastes the least compute.

Training batches are packed (no padding at all) where the model and head allow it, else
length-grouped or plainly shuffled and padded per batch; evaluation batches are sorted by length,
by token budget on one process and of a fixed row count under several (``data/batching.py``).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from adapters.config.training import TrainConfig
from adapters.data.batching import LengthGroupedSampler, by_length, inference_batches, packable, row_length
from adapters.data.encoding import Collator, encode_dataset
from adapters.errors import ConfigError


def eval_rows(head_spec, rows: int | None, train_batch_size: int, processes: int) -> int | None:
    """Rows per evaluation batch: ``rows`` when given; else None (by token budget) on one process, and
    4 x the training batch under several (fixed-size shards) or for heads with vocabulary-wide logits."""
    if rows is None and (processes > 1 or head_spec.lm_logits):
        return 4 * train_batch_size
    return rows


def eval_loader(
    model, data, text_column: str, label_column: str, rows: int | None = None, processes: int = 1
) -> DataLoader:
    """Evaluation batches of ``data`` for ``model`` (unprepared): encoded, sorted by length (metrics do
    not depend on the order), padded per batch; by token budget (``rows=None``) on one process, and of
    ``rows`` rows under several, whose shards must be of one size."""
    encoded = encode_dataset(
        data, model.tokenizer, model.head_spec, text_column, label_column, model.max_length, "eval dataset"
    )
    return inference_loader(model, encoded, rows, processes)


def inference_loader(model, encoded, rows: int | None = None, processes: int = 1) -> DataLoader:
    """Batches of already encoded rows for a pass without gradients (evaluation, the linear probe)."""
    lengths = [row_length(ids) for ids in encoded["input_ids"]]
    collate = Collator(model.tokenizer, model.head_spec, pack=packable(model.head_spec, model.base.is_decoder))
    if processes > 1:  # Accelerate shards a sampler with a fixed batch size evenly across processes
        return DataLoader(encoded, batch_size=rows, sampler=by_length(lengths), collate_fn=collate)
    return DataLoader(encoded, batch_sampler=inference_batches(lengths, rows), collate_fn=collate)


def train_loader(model, encoded, config: TrainConfig, processes: int = 1) -> DataLoader:
    """Training batches: packed (no padding) where the model and head allow it and ``packing`` is not
    False; else length-grouped (``group_by_length``) or plainly shuffled, padded per batch."""
    is_decoder = model.base.is_decoder
    allowed = packable(model.head_spec, is_decoder)
    if config.packing and not allowed:
        raise ConfigError(
            f"packing=True needs a decoder and a classification, multi-label or regression head on "
            f"plain rows; this is a {'decoder' if is_decoder else 'encoder'} with a "
            f"{model.head_spec.kind} head. Pass packing=None (automatic) or False"
        )
    packed = allowed if config.packing is None else config.packing
    collate = Collator(model.tokenizer, model.head_spec, pack=packed)
    if config.group_by_length and not packed:
        # grouped in units of the global batch: Accelerate hands consecutive batches to the processes,
        # so N processes see the same rows per step as one process with an N times larger batch
        sampler = LengthGroupedSampler(
            [row_length(ids) for ids in encoded["input_ids"]], config.batch_size * processes, config.seed
        )
        return DataLoader(encoded, batch_size=config.batch_size, sampler=sampler, collate_fn=collate)
    return DataLoader(encoded, batch_size=config.batch_size, shuffle=True, collate_fn=collate)
