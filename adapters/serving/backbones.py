"""Artifacts on shared backbones. Each artifact is loaded once; artifacts trained on the same base (same
weights, quantization and dtype) share **one** loaded copy of it, the way vLLM serves many LoRA adapters
on one base. The first artifact of a group is loaded with ``adapters.load``; each further one joins
through its adapter kind (``AdapterSpec.join``: another named peft adapter, another set of hooked
bottleneck layers) and keeps its own small head. A request runs with its artifact's adapter switched
on and the others off (``AdapterSpec.switch``), under the group's lock, so one backbone answers for
all of them.

The OpenAI endpoints generate through the base's continuous batch (``scheduler.py``), which takes the lock
for one decoding step at a time. A generation asked through ``/v1/models/{name}/predict`` takes turns: the
lock is granted in the order it was asked for (``TurnLock``), and such a generating request gives it up
after every decoding step when someone is waiting (``TakeTurns``, a transformers ``StoppingCriteria`` that
never stops), then takes its place again with its adapter, head and random state put back. So a
classification request waits behind a long generation for at most **one decoding step of each generation
in progress** (plus the batches ahead of it), not for whole generations, and a seeded
generation samples the same text whatever runs in between."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.artifacts.format import Artifact, open_artifact
from adapters.artifacts.spec import ArtifactSpec
from adapters.errors import ConfigError


@dataclass
class Served:
    """One artifact as served: its name, its head and its adapter within a group's shared base."""

    name: str
    path: Path
    spec: ArtifactSpec
    group: SharedBackbone
    head: nn.Module
    head_spec: Any
    adapter: Any
    max_length: int
    handle: Any = None  # how its adapter is switched on and off (``AdapterSpec.switch``)

    def predict(self, inputs: list, probabilities: bool = False, seed: int | None = None, **settings: Any) -> list:
        """Predictions of this artifact (``settings``: generation settings, for heads that generate, which
        take turns with other requests after every decoding step; ``seed``: sampling seeded)."""
        with self.group.selected(self) as model:
            if getattr(self.head_spec, "lm_logits", False):
                settings["stopping_criteria"] = _take_turns(self.group, self)
                if seed is not None:
                    torch.manual_seed(seed)
            return model.predict(inputs, probabilities=probabilities, **settings)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "base": self.spec.base.name,
            "base_group": self.group.index,
            "quantization": self.spec.quantization,
            "adapter": self.adapter.describe() if self.adapter else None,
            "head": self.head_spec.to_dict(),
            "max_length": self.max_length,
        }


class TurnLock:
    """A lock granted in the order it was asked for (a ticket lock): a thread that releases it and asks
    again goes behind those already waiting, which ``threading.Lock`` does not promise."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next = self._serving = 0

    def acquire(self) -> None:
        with self._changed:
            ticket = self._next
            self._next += 1
            self._changed.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()

    def waiting(self) -> int:
        """Threads waiting for the lock (besides its holder)."""
        with self._changed:
            return max(self._next - self._serving - 1, 0)

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class SharedBackbone:
    """One loaded base and the artifacts served on it."""

    index: int
    key: tuple
    model: Any  # the AdaptedModel of the group's first artifact: its backbone is the shared base
    members: list[Served] = field(default_factory=list)
    lock: TurnLock = field(default_factory=TurnLock)
    turns_taken: int = 0  # times a generation gave way to a waiting request (``TakeTurns``)

    def accepts(self, key: tuple, adapter) -> bool:
        return key == self.key and (adapter is None or adapter.can_join(self.model))

    @contextmanager
    def selected(self, member: Served) -> Iterator[Any]:
        """The shared model computing as ``member``: every adapter off, then its own on; its head."""
        model = self.model
        with self.lock:
            saved = model.head, model.head_spec, model.max_length
            self.activate(member)
            try:
                yield model
            finally:
                model.head, model.head_spec, model.max_length = saved

    def activate(self, member: Served) -> None:
        """The shared model computing as ``member`` (the caller holds the lock)."""
        model = self.model
        for other in self.members:
            if other.adapter is not None:
                other.adapter.switch(model, other.handle, False)
        if member.adapter is not None:
            member.adapter.switch(model, member.handle, True)
        model.head, model.head_spec, model.max_length = member.head, member.head_spec, member.max_length


def _take_turns(group: SharedBackbone, member: Served) -> Any:
    """A ``StoppingCriteriaList`` whose one criterion gives the backbone to waiting requests after each
    decoding step and never stops the generation itself."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    tokenizer = group.model.tokenizer
    resting_side = tokenizer.padding_side  # what other requests expect; generation pads on the left

    class TakeTurns(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if group.lock.waiting():
                model = group.model
                state = model.head, model.head_spec, model.max_length, tokenizer.padding_side
                rng = torch.get_rng_state()
                cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
                tokenizer.padding_side = resting_side
                group.turns_taken += 1
                group.lock.release()  # those waiting run now, in order; then this generation again
                group.lock.acquire()
                group.activate(member)
                model.head, model.head_spec, model.max_length, tokenizer.padding_side = state
                torch.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([TakeTurns()])


def group_key(artifact: Artifact) -> tuple:
    """Artifacts with the same key can share one loaded backbone."""
    where = artifact.base_location()
    where = str(Path(where).resolve()) if Path(where).exists() else where
    spec = artifact.spec
    return where, spec.quantization, spec.dtype, artifact.head.lm_logits


def load_served(artifacts: dict[str, Path], device: str | None = None, verify: bool = True) -> dict[str, Served]:
    """Load every artifact once, sharing a backbone between artifacts trained on the same one. Every file is
    verified against its manifest first (``verify``), before any model loads."""
    from adapters.model import AdaptedModel

    opened = {name: open_artifact(path, verify) for name, path in artifacts.items()}  # all checked before any load
    groups: list[SharedBackbone] = []
    served: dict[str, Served] = {}
    for name, artifact in opened.items():
        key = group_key(artifact)
        group = next((g for g in groups if g.accepts(key, artifact.adapter)), None)
        if group is None:
            model = AdaptedModel.from_pretrained(artifact.path, device=device, verify=False)  # verified above
            group = SharedBackbone(len(groups), key, model)
            groups.append(group)
            handle = artifact.adapter.handle(model) if artifact.adapter is not None else None
            member = Served(
                name,
                artifact.path,
                artifact.spec,
                group,
                model.head,
                model.head_spec,
                artifact.adapter,
                model.max_length,
                handle,
            )
        else:
            member = join_group(group, name, artifact)
        group.members.append(member)
        served[name] = member
    return served


def join_group(group: SharedBackbone, name: str, artifact: Artifact) -> Served:
    """Add ``artifact`` to ``group``'s backbone: its adapter beside the others, its own head."""
    model = group.model
    artifact.check_base(model.backbone, model.base.location)
    head = artifact.head.build(model.base.hidden_size, model.base.is_decoder).to(model.device)
    head.load_state_dict({k: v.to(model.device) for k, v in artifact.head_tensors.items()})
    adapter = artifact.adapter
    handle = adapter.join(model, artifact.path, f"served-{name}") if adapter is not None else None
    return Served(
        name, artifact.path, artifact.spec, group, head.eval(), artifact.head, adapter, artifact.spec.max_length, handle
    )


def parse_artifacts(items: list[str]) -> dict[str, Path]:
    """``["runs/a", "b=runs/x"]`` -> ``{"a": runs/a, "b": runs/x}``; names must be distinct."""
    out: dict[str, Path] = {}
    for item in items:
        name, _, where = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        if not name or name in out:
            raise ConfigError(f"artifact name {name!r} (from {item!r}) is empty or used twice; name them NAME=PATH")
        out[name] = Path(where)
    return out
