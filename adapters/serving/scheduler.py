"""Continuous batching on a shared backbone: every running generation decodes in **one forward per step**,
whatever artifact it belongs to (iteration-level scheduling, Orca, Yu et al., OSDI 2022; vLLM's and
S-LoRA's scheduler, Sheng et al., 2023, for many LoRA adapters on one base).

One ``Scheduler`` per ``SharedBackbone`` runs in its own thread. Between two steps it admits waiting
sequences (the short prompts that wait are prefilled together in one left-padded forward, so a burst of
clients gets its first tokens after one prefill; a long prompt is prefilled alone, in chunks of
``PREFILL_CHUNK`` tokens with a decoding step of the others between two chunks, so it does not stall them)
and drops those that finished, hit ``max_tokens`` or were cancelled (their client went away). Each step
takes the group's lock (granted in order, so classification batches run between steps and are never
starved), routes every row to its own adapter (``AdapterSpec.route``: peft's mixed-batch ``adapter_names``
for LoRA, a row mask for bottleneck layers, the base for neither; a batch of one adapter takes the plain
forward) and runs one forward of the whole batch.

The KV cache is transformers' ``DynamicCache``, kept as one batch, left-padded: a prefilled row joins by
padding the shorter of the two caches on the left, a leaving row is cut out, and columns every row pads are
trimmed. The attention mask hides the padding and each row keeps its own positions, so a row's tokens are
those it would get alone (tested: greedy texts under load equal one-at-a-time texts, LoRA, bottleneck and
base rows mixed). Every decoding setting is per row (``sampling.py``: penalties, temperature, truncations,
a grammar's mask, a seeded ``torch.Generator`` per sequence, so a seeded sample is the same text whatever else
is in the batch), as are logprobs (the prompt's too, from the prefill's logits, when asked: only then are all
positions projected onto the vocabulary). A row whose own step fails ends with its error; the others go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.backbone.signature import takes
from adapters.serving.batcher import QueueFull
from adapters.serving.sampling import Sampling, TokenLogprob, logprob_of, next_token, prompt_logprobs

PREFILL_CHUNK = 256  # prompt tokens prefilled per step; longer prompts take turns with the decoding rows
PREFILL_ROWS = 32  # short prompts prefilled together in one forward at most


@dataclass
class Sequence:
    """One generation: its prompt's token ids, its settings and where its text goes."""

    member: Any  # the Served artifact
    prompt: list[int]
    max_new_tokens: int  # 0: only the prompt's logprobs are wanted (``echo``)
    emit: Callable[[str | None, str | None], Any]
    """Called from the scheduler's thread with a piece of text, then once with ``(None, finish_reason)``."""
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    grammar: Any = None  # a ``grammar.Constraint`` the text must follow (``response_format``), or None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # per prompt token after the first
    sent: str = ""  # the text emitted so far
    prefilled: int = 0  # prompt tokens already in its cache
    cache: Any = None  # its own cache while it is prefilled
    generator: torch.Generator | None = None
    queued_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)
        self.processors = self.sampling.processors()


@dataclass
class Batch:
    """The running rows and their one left-padded cache."""

    rows: list[Sequence] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None  # (rows, cached tokens): 1 where a row has a token
    positions: list[int] = field(default_factory=list)  # each row's next position

    def add(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor) -> None:
        """Rows ``seqs`` join with their own ``cache`` (left-padded as ``mask`` says): the narrower of the two
        caches is padded on the left, then both are stacked."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            total = max(self.mask.shape[1], mask.shape[1])
            _pad_left(self.cache, total)
            _pad_left(cache, total)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([mine.keys, theirs.keys], 0)
                mine.values = torch.cat([mine.values, theirs.values], 0)
            self.mask = torch.cat([_pad_mask(self.mask, total), _pad_mask(mask, total)], 0)
        self.rows += seqs
        self.positions += [len(seq.prompt) for seq in seqs]
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].member.name)
        if order != list(range(len(self.rows))):  # rows by artifact: each adapter's rows are one run
            self.keep(order)

    def keep(self, keep: list[int]) -> None:
        """Only the rows ``keep`` (indices, in that order) stay; columns that every remaining row pads are
        dropped."""
        if not keep:
            self.rows, self.cache, self.mask, self.positions = [], None, None, []
            return
        assert self.mask is not None
        index = torch.tensor(keep)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # the first column some row uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self.rows = [self.rows[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]


def _say(seq: Sequence, piece: str | None, finish: str | None) -> None:
    """Hand ``seq``'s consumer a piece or its end; a consumer that is gone (its event loop closed) cancels the
    sequence instead of stopping the scheduler's thread."""
    try:
        seq.emit(piece, finish)
    except Exception:  # noqa: BLE001 - whatever the consumer raises, the other rows go on
        seq.cancelled.set()


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([torch.zeros(mask.shape[0], width - mask.shape[1], dtype=mask.dtype), mask], 1)


def _select(cache: Any, index: list[int]) -> None:
    """Keep only the batch rows ``index`` of every layer of ``cache``."""
    for layer in cache.layers:
        rows = torch.tensor(index, device=layer.keys.device)
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def _pad_left(cache: Any, width: int) -> None:
    for layer in cache.layers:
        missing = width - layer.keys.shape[-2]
        if missing > 0:
            pad = layer.keys.new_zeros(*layer.keys.shape[:-2], missing, layer.keys.shape[-1])
            layer.keys = torch.cat([pad, layer.keys], -2)
            layer.values = torch.cat([pad.clone(), layer.values], -2)


class Scheduler:
    """The generations of one shared backbone, batched step by step (module docstring)."""

    def __init__(self, group: Any, max_waiting: int = 1024, observe: Callable[[str, float], None] | None = None):
        self.group, self.max_waiting = group, max_waiting
        self.waiting: list[Sequence] = []
        self.batch = Batch()
        self.observe = observe or (lambda name, value: None)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        model = group.model
        eos = getattr(getattr(model.backbone, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else model.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    # --- the requests' side ---------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; ``QueueFull`` when ``max_waiting`` sequences wait already (answered 503)."""
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} generations are waiting for {self.group_name()}")
            self.waiting.append(seq)
            self._wake.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="qadapters-scheduler")
                self._thread.start()

    def group_name(self) -> str:
        return f"base {self.group.index}"

    def cancel(self, member: Any) -> None:
        """Cancel every sequence of ``member`` (an artifact being unloaded): they leave at the next step."""
        with self._wake:
            for seq in [*self.waiting, *self.batch.rows]:
                if seq.member is member:
                    seq.cancelled.set()

    @property
    def running(self) -> int:
        return len(self.batch.rows)

    # --- the scheduler's thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self.waiting or self.batch.rows))
                self._drop_cancelled_waiting()
                short = [s for s in self.waiting if s.prefilled == 0 and len(s.prompt) <= PREFILL_CHUNK]
                long = next((s for s in self.waiting if s not in short), None)
            try:
                with torch.inference_mode():
                    if short:  # every short prompt that waits, prefilled together in one forward
                        self._prefill_together(short[:PREFILL_ROWS])
                    elif long is not None:  # else one chunk of a long one
                        self._prefill_chunk(long)
                    if self.batch.rows:
                        self._decode_step()
            except Exception as err:  # noqa: BLE001 - one bad step must not stop the other rows' server
                self._fail_all(err)

    def _drop_cancelled_waiting(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled.is_set()]:
            self.waiting.remove(seq)
            _say(seq, None, "cancelled")

    def _fail_all(self, err: Exception) -> None:
        for seq in self.batch.rows:
            _say(seq, None, f"error: {err}")
        self.batch = Batch()
        with self._wake:
            for seq in self.waiting:
                _say(seq, None, f"error: {err}")
            self.waiting.clear()

    def _forward(self, rows: list[Sequence], every_position: bool = False, **inputs: Any) -> Any:
        """One forward of ``rows`` on the shared backbone, each row through its own adapter, under the lock;
        logits at the last position only, unless ``every_position`` (a prompt's logprobs)."""
        group = self.group
        network = group.model.backbone
        if not every_position and takes(network, "logits_to_keep"):
            inputs["logits_to_keep"] = 1  # the vocabulary projection of one position, not of the whole prompt
        with group.lock, ExitStack() as routes:
            for kind, handles in _kinds(group.members):
                masks = [(handle, torch.tensor([r.member.handle is handle for r in rows])) for handle in handles]
                routes.enter_context(kind.route(group.model, masks))
            return network(**_cache_argument(network, inputs), use_cache=True)

    def _prefill_chunk(self, seq: Sequence) -> None:
        from transformers import DynamicCache

        if seq.cache is None:
            seq.cache = DynamicCache()
        device = self.group.model.device
        chunk = seq.prompt[seq.prefilled : seq.prefilled + PREFILL_CHUNK]
        start = seq.prefilled
        out = self._forward(
            [seq],
            seq.sampling.prompt_logprobs is not None,
            input_ids=torch.tensor([chunk], device=device),
            position_ids=torch.arange(start, start + len(chunk), device=device)[None],
            past_key_values=seq.cache,
        )
        if seq.sampling.prompt_logprobs is not None:  # position i predicts prompt token i + 1
            _record_prompt_logprobs(seq, out.logits[0], start + 1)
        seq.prefilled += len(chunk)
        if seq.prefilled < len(seq.prompt):
            return
        cache, seq.cache = seq.cache, None
        self._admit([seq], cache, torch.ones(1, len(seq.prompt), dtype=torch.long), out.logits[:, -1])

    def _prefill_together(self, seqs: list[Sequence]) -> None:
        """The prompts of ``seqs``, left-padded to the longest, in one forward (as batched ``generate`` does)."""
        from transformers import DynamicCache

        device = self.group.model.device
        seqs = sorted(seqs, key=lambda s: s.member.name)  # each adapter's rows one run (``Batch.add``)
        width = max(len(s.prompt) for s in seqs)
        pad = self.group.model.tokenizer.pad_token_id or 0
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in seqs])
        ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in seqs])
        cache = DynamicCache()
        every = any(s.sampling.prompt_logprobs is not None for s in seqs)
        out = self._forward(
            seqs,
            every,
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device),
            past_key_values=cache,
        )
        for i, seq in enumerate(seqs):
            if seq.sampling.prompt_logprobs is not None:
                _record_prompt_logprobs(seq, out.logits[i, width - len(seq.prompt) :], 1)
        self._admit(seqs, cache, mask, out.logits[:, -1])

    def _admit(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Prefilled ``seqs`` leave the queue with their first token; those that go on join the batch."""
        with self._wake:
            for seq in seqs:
                self.waiting.remove(seq)
        going_on = []
        for i, seq in enumerate(seqs):
            self.observe("first_token", time.monotonic() - seq.queued_at)
            if seq.max_new_tokens == 0:  # only the prompt's logprobs were asked for
                _say(seq, None, "length")
            elif (token := self._next(seq, logits[i])) is not None and self._advance(seq, token):
                going_on.append(i)
        if going_on:
            if len(going_on) < len(seqs):
                _select(cache, going_on)
            self.batch.add([seqs[i] for i in going_on], cache, mask[going_on])

    def _decode_step(self) -> None:
        batch = self.batch
        assert batch.mask is not None
        device = self.group.model.device
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), 1, dtype=torch.long)], 1)
        width = batch.mask.shape[1]
        out = self._forward(
            batch.rows,
            input_ids=torch.tensor([[r.generated[-1]] for r in batch.rows], device=device),
            attention_mask=batch.mask.to(device),
            position_ids=torch.tensor(batch.positions, device=device)[:, None],
            past_key_values=batch.cache,
            cache_position=torch.tensor([width - 1], device=device),
        )
        self.observe("batch_size", len(batch.rows))
        keep = []
        for i, (seq, logits) in enumerate(zip(batch.rows, out.logits[:, -1], strict=True)):
            batch.positions[i] += 1
            if (token := self._next(seq, logits)) is not None and self._advance(seq, token):
                keep.append(i)
        if len(keep) < len(batch.rows):
            batch.keep(keep)

    def _next(self, seq: Sequence, logits: torch.Tensor) -> int | None:
        """``seq``'s next token, or None when its own settings fail on these logits: that row ends with the
        error and leaves, the other rows of the batch go on."""
        try:
            return self._sample(seq, logits)
        except Exception as err:  # noqa: BLE001 - one row's settings must not stop the batch
            _say(seq, None, f"error: {type(err).__name__}: {err}")
            return None

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        """The next token of ``seq`` from its last raw logits, with its own settings (``sampling.py``): the end
        of text masked until ``min_tokens``, its grammar's mask, penalties, then greedy or its own generator."""
        sampling = seq.sampling
        banned = [*self.eos, *sampling.stop_token_ids] if len(seq.generated) < sampling.min_tokens else None
        restrict = seq.grammar.restrict if seq.grammar is not None else None
        token = next_token(logits, seq.prompt, seq.generated, sampling, seq.processors, seq.generator, banned, restrict)
        if sampling.logprobs is not None:
            seq.logprobs.append(logprob_of(logits, token, sampling.logprobs))
        return token

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Record ``token`` for ``seq`` and emit its new text; False when the sequence ends here."""
        if seq.cancelled.is_set():
            _say(seq, None, "cancelled")
            return False
        ended = token in seq.sampling.stop_token_ids or (token in self.eos and not seq.sampling.ignore_eos)
        if not ended:
            seq.generated.append(token)
            self.observe("generated_tokens", 1)
            if seq.grammar is not None:
                ended = seq.grammar.accept(token)  # the grammar is complete: nothing more may follow
            text = self.group.model.tokenizer.decode(seq.generated, skip_special_tokens=True)
            if len(text) > len(seq.sent) and not text.endswith("\ufffd"):  # a character still being spelled
                _say(seq, text[len(seq.sent) :], None)
                seq.sent = text
        if ended or len(seq.generated) >= seq.max_new_tokens:
            text = self.group.model.tokenizer.decode(seq.generated, skip_special_tokens=True)
            if len(text) > len(seq.sent):
                _say(seq, text[len(seq.sent) :], None)
            _say(seq, None, "stop" if ended else "length")
            return False
        return True


def _record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, first: int) -> None:
    """The logprobs of ``seq.prompt[first:]`` as far as ``logits`` (the positions before each) reach."""
    following = seq.prompt[first : first + logits.shape[0]]
    if following:
        seq.prompt_logprobs += prompt_logprobs(logits[: len(following)], following, seq.sampling.prompt_logprobs or 0)


def _cache_argument(network: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``past_key_values`` under the name the model's forward takes (transformers 5 renames it ``cache``)."""
    if takes(network, "cache"):
        inputs = dict(inputs)
        inputs["cache"] = inputs.pop("past_key_values")
    return inputs


def _kinds(members: list[Any]) -> list[tuple[Any, list[Any]]]:
    """The served adapters by kind (one spec instance stands for its kind), each kind with its handles."""
    kinds: dict[type, tuple[Any, list[Any]]] = {}
    for member in members:
        if member.adapter is not None:
            spec, handles = kinds.setdefault(type(member.adapter), (member.adapter, []))
            if all(h is not member.handle for h in handles):
                handles.append(member.handle)
    return list(kinds.values())
