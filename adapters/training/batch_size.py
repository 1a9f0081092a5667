"""The largest per-device batch that fits, keeping the requested effective batch.

``TrainConfig(auto_batch_size=True)``: the per-device examples per optimizer step that were asked
for (``batch_size x grad_accum``) are split into ``b x (batch_size x grad_accum / b)`` with the
largest divisor ``b`` whose memory estimate (``memory.estimate_memory``, for the longest
sequence of the data) fits in 90% of the GPU's free memory (75% of the available RAM on CPU); then one real forward
and backward
pass at that size, on the longest rows, confirms it, and an out-of-memory error there backs off
to the next smaller divisor. The effective batch, and so the optimisation, do not change.
"""

from __future__ import annotations

import logging

import torch

from adapters.data.batching import by_length, longest_sequence
from adapters.data.encoding import Collator
from adapters.errors import ConfigError
from adapters.memory.estimate import estimate_memory

logger = logging.getLogger("adapters")
SAFETY = 0.9  # the estimate is within ~15%: keep some room for the allocator's fragmentation
CPU_SAFETY = 0.75  # on CPU the process also holds the Python heap, libraries and malloc's free lists


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _real_step(model, rows: list[dict], collator) -> None:
    """One forward and backward pass on ``rows``, leaving no gradient and no RNG state behind."""
    batch = {k: v.to(model.device) for k, v in collator(rows).items()}
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        was_training = model.training
        model.train()
        try:
            model(**batch)["loss"].backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)


def choose_batch_size(model, encoded, config, processes: int = 1) -> tuple[int, int, dict]:
    """(per-device batch, gradient accumulation, details) for ``config.batch_size x config.grad_accum``."""
    wanted = config.batch_size * config.grad_accum
    lengths = [longest_sequence(ids) for ids in encoded["input_ids"]]
    if not lengths:
        raise ConfigError("auto_batch_size needs training data")
    longest = by_length(lengths)  # the real step runs the worst case
    seq_len = lengths[longest[0]]
    free = free_memory(model.device)
    resident = None
    details = {"requested_per_device": wanted, "seq_len": seq_len, "free_bytes": free}
    collator = Collator(model.tokenizer, model.head_spec)
    for b in _divisors_descending(wanted):
        est = estimate_memory(
            model,
            batch_size=b,
            seq_len=seq_len,
            gradient_checkpointing=config.gradient_checkpointing,
            optimizer=config.optimizer,
            mixed_precision=config.mixed_precision,
            processes=processes,
        )
        if resident is None:  # the weights are loaded already: they are not in `free`
            resident = est.base_quantized + est.base_unquantized + est.trainable
        needed = est.tensors - resident
        if needed > (SAFETY if model.device.type == "cuda" else CPU_SAFETY) * free:
            continue
        try:
            _real_step(model, [encoded[i] for i in longest[:b]], collator)
        except (RuntimeError, MemoryError) as err:
            if not _is_out_of_memory(err):
                raise
            logger.warning("auto_batch_size: batch %d ran out of memory in a real step; trying a smaller one", b)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        details.update(batch_size=b, grad_accum=wanted // b, estimate_bytes=needed)
        return b, wanted // b, details
    raise ConfigError(
        f"auto_batch_size: not even one sequence of {seq_len} tokens fits in the {free / 2**30:.2f} GiB free on "
        f"{model.device}. Turn on gradient_checkpointing, lower max_length, or quantize the base (nf4)."
    )
