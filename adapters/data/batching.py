"""How encoded rows become batches: length-grouped training order, length-sorted inference, packing.

Dynamic padding pads each batch to its longest row, so a random batch of short texts of mixed
lengths computes mostly padding: on the Rotten Tomatoes snippets (25 tokens on average, 64 at most)
random batches of 16 process 1.85x the real tokens. Three remedies, each exact in what it computes:

* **length-grouped training order** (the bucketing of seq2seq toolkits; transformers'
  ``group_by_length``): each epoch, a seeded shuffle is cut into mega-batches of
  ``MEGA_BATCHES`` batches, each mega-batch is sorted by length and cut into batches, and the
  batches are shuffled, so a batch holds rows of similar length while the loss curve does not
  cycle from short to long. Every row appears exactly once per epoch, the order depends only on
  (seed, epoch), the same on every process, so Accelerate's batch sharding and the exact mid-epoch
  resume keep working. The batch holding the longest row comes first: an out-of-memory error shows
  at step 1, not at the end of the epoch.
* **length-sorted inference**: evaluation and prediction run over rows sorted by length, in batches
  of up to ``inference_tokens()`` padded tokens (many short rows, few long ones), and return results
  in the caller's order. Not too small: a 4-bit layer dequantizes its whole weight at every call,
  whatever the batch. Not too large on CPU: the elementwise passes (norms, residuals, activations)
  are memory-bound and run faster while a batch's activations fit in the caches.
* **padding-free packing** for decoders (padding-free training, transformers PR #31629): a batch's
  rows are concatenated into a few rows (of about three of its longest rows each), with
  ``position_ids`` restarting at 0 for each and no attention mask; transformers then builds a
  block-diagonal causal mask, so no token attends across rows, and the head pools each segment
  (``segments`` gives each token's row, -1 for the filler that ends a packed row). No padding is
  computed at all. But attention over a packed row costs (row length)^2 with SDPA's dense
  block-diagonal mask, however many texts it holds, so packing pays only where it removes more padding
  than it adds attention: ``packing_pays`` weighs each token's linear layers (a constant) against its
  attention (its row's length over ``ATTENTION_TOKENS``), and packed rows hold at most ``PACKED_ROW_TOKENS``.
  Measured, SmolLM2-135M + LoRA, 16 texts of 256 tokens (no padding to remove), one training step on
  the 2-core EPYC: padded 25 s, packed into rows of 1,024 tokens 35 s, into one row of 4,096 tokens 67 s.
  Inference packs too: sorted by length, its batches still carry padding (13% of the computed tokens on
  the 500 held-out Rotten Tomatoes snippets). Evaluating them packed took 13.1-13.3 s against 14.1-14.3 s
  padded in a fresh process, 12.6-13.3 s against 13.1-13.9 s after 16 training steps (2-core Xeon, SmolLM2
  NF4 + LoRA, two runs each).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

MEGA_BATCHES = 50  # batches per sorted mega-batch: large enough to find similar lengths, small enough to mix
PACKED_ROW_TOKENS = 1024  # sdpa builds a dense (tokens x tokens) mask per packed row: keep it bounded
# and shorter still for short texts: a packed row's attention costs its length per token, so rows of about
# three of the batch's longest texts (SmolLM2-135M NF4 + LoRA, batches of 16 Rotten Tomatoes snippets of at
# most 64 tokens, 2-core Xeon: rows of 1,024 tokens 1.545 s/step, 256: 1.485, 192: 1.423; the filler that
# evens the rows grew from 0 to 1.6% of the tokens)
LONGEST_PER_ROW = 3
ATTENTION_TOKENS = 1024
"""The row length at which a token's attention costs about as much as its linear layers. Fitted to the two
measurements in the module docstring (SmolLM2-135M on CPU: 900 from inference, 1,700 from training); larger
models' linear layers grow faster than their attention, so there it underestimates what packing saves."""
# padded tokens per inference batch: on CPU smaller batches were faster up to a point (the sweep is in
# benchmarks/README.md, "lora_inference"); GPUs want large batches.
INFERENCE_TOKENS = {"cpu": 2048, "gpu": 8192}
INFERENCE_ROWS = 512


class LengthGroupedSampler(Sampler[int]):
    """Row indices in an order whose consecutive ``batch_size`` chunks hold rows of similar length."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega_batches: int = MEGA_BATCHES):
        self.lengths, self.batch_size, self.seed, self.mega_batches = list(lengths), batch_size, seed, mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.mega_batches
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # a short last batch must stay last: the loader cuts the flat order into batch_size chunks
        short = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
        return batches + ([short] if short else [])

    def __iter__(self):
        for batch in self.batches():
            yield from batch


def row_length(ids) -> int:
    """Tokens of one encoded row: all choices of a multiple-choice row, all windows of a long text."""
    if ids and isinstance(ids[0], list):
        return sum(len(x) for x in ids)
    return len(ids)


def longest_sequence(ids) -> int:
    """Tokens of the longest sequence in one encoded row (a choice, a window, or the row itself)."""
    return max(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)


def by_length(lengths: list[int]) -> list[int]:
    """Indices from the longest row to the shortest (the first batch shows the worst case)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def inference_tokens() -> int:
    """Padded tokens per inference batch on this machine (the model runs on the GPU when there is one)."""
    return INFERENCE_TOKENS["gpu" if torch.cuda.is_available() else "cpu"]


def inference_batches(lengths: list[int], rows: int | None = None, tokens: int | None = None) -> list[list[int]]:
    """Row indices sorted by length (longest first), cut into batches of ``rows`` rows when given, else
    of up to ``tokens`` padded tokens (default ``inference_tokens()``; at most ``INFERENCE_ROWS`` rows)."""
    order = by_length(lengths)
    tokens = tokens or inference_tokens()
    if rows:
        return [order[i : i + rows] for i in range(0, len(order), rows)]
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < INFERENCE_ROWS and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def packable(head, is_decoder: bool) -> bool:
    """Packing needs a decoder (its causal mask is rebuilt per segment) and a head that pools one
    vector per text from plain rows (not windows, choices or per-token outputs)."""
    return is_decoder and head.packable()


def packing_pays(lengths: list[int]) -> bool:
    """Whether a batch of rows of these lengths is cheaper packed than padded. Each computed token costs
    its linear layers (1) plus its attention (the length of the row it sits in, over ``ATTENTION_TOKENS``):
    padded, every row is as long as the longest; packed, no padding is computed but rows are longer."""
    longest, real = max(lengths), sum(lengths)
    row = min(PACKED_ROW_TOKENS, LONGEST_PER_ROW * longest)
    padded = len(lengths) * longest * (1 + longest / ATTENTION_TOKENS)
    return padded > real * (1 + row / ATTENTION_TOKENS)


def balanced_rows(lengths: list[int], row_tokens: int = PACKED_ROW_TOKENS) -> list[list[int]]:
    """Which sequences go in which packed row: as few rows as ``row_tokens`` allows, each sequence
    (longest first) into the emptiest row (LPT scheduling), so the rows come out of similar length and
    the filler that evens them is small (filling rows one after the other can leave the last nearly
    empty: its filler is computed like real tokens). A longer sequence gets a row of its own."""
    rows: list[list[int]] = [[] for _ in range(max(1, math.ceil(sum(lengths) / row_tokens)))]
    sizes = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(len(rows)), key=sizes.__getitem__)
        if sizes[r] and sizes[r] + lengths[i] > row_tokens:
            rows.append([])
            sizes.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        sizes[r] += lengths[i]
    return [sorted(row) for row in rows if row]


def pack(sequences: list[list[int]], pad_id: int, row_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate ``sequences`` into rows of at most ``row_tokens`` tokens (default: ``LONGEST_PER_ROW``
    times the longest sequence, at most ``PACKED_ROW_TOKENS``), one row when they fit, several of similar
    length otherwise (see ``balanced_rows``).

    Returns ``input_ids``, ``position_ids`` (0.. within each sequence) and ``segments`` (the
    sequence each token belongs to; -1 for the filler that pads the rows to one length, whose
    positions restart at 0 too, so it forms a segment of its own that nothing attends to)."""
    lengths = [len(seq) for seq in sequences]
    if row_tokens is None:
        row_tokens = min(PACKED_ROW_TOKENS, LONGEST_PER_ROW * max(lengths))
    rows: list[list[int]] = []
    owners: list[list[int]] = []
    for members in balanced_rows(lengths, row_tokens):
        rows.append([token for i in members for token in sequences[i]])
        owners.append([i for i in members for _ in sequences[i]])
    width = max(len(r) for r in rows)
    input_ids, positions, segments = [], [], []
    for row, owner in zip(rows, owners, strict=False):
        fill = width - len(row)
        input_ids.append(row + [pad_id] * fill)
        pos, previous = [], None
        for who in owner:
            pos.append(pos[-1] + 1 if who == previous else 0)
            previous = who
        positions.append(pos + list(range(fill)))
        segments.append(owner + [-1] * fill)
    return {
        "input_ids": torch.tensor(input_ids),
        "position_ids": torch.tensor(positions),
        "segments": torch.tensor(segments),
    }
