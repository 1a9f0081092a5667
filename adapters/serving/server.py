"""Serve adapted models over HTTP: many artifacts, one quantized base in memory.

``qadapters serve sentiment=runs/sentiment licence=runs/licence`` loads each artifact once. Artifacts
trained on the same base (same weights, quantization and dtype) share **one** copy of it, the way
vLLM serves many LoRA adapters on one base: the first artifact of a group is loaded with
``adapters.load``; each further LoRA artifact is added to the same peft model as another named
adapter (``PeftModel.load_adapter``), each bottleneck artifact as another set of hooked adapter
layers, and every artifact keeps its own (small) head. A request runs with its artifact's adapter
switched on and the others off, under the group's lock, so one base answers for all of them.

Requests are micro-batched per artifact (``Batcher``): the first request of a batch waits at most
``max_wait_ms`` for others, up to ``max_batch`` inputs, and the batch runs in one call (sorted by
length inside ``AdaptedModel.logits``). A batch that fails is retried request by request, so one bad
request never fails another's.

The HTTP layer is FastAPI on uvicorn (the ``serve`` extra: ``pip install qadapters[serve]``):
``POST /v1/models/{name}/predict`` with ``{"texts": [...], "probabilities": true}``, ``GET /v1/models``,
``GET /health``, and the OpenAPI docs at ``/docs``. Bad requests get a 4xx JSON error naming the
problem (422 malformed or mistyped body, 404 unknown model, 413 too many or too long texts); an
error inside a model is a 500 JSON answer, never a dead server. uvicorn stops on SIGTERM after the
requests in flight are answered.
"""

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from adapters.artifacts.format import Artifact, ArtifactSpec, open_artifact
from adapters.errors import AdaptersError, ConfigError


@dataclass
class Served:
    """One artifact as served: its name, its head and its adapter within a group's shared base."""

    name: str
    path: Path
    spec: ArtifactSpec
    group: "SharedBackbone"
    head: nn.Module
    head_spec: Any
    adapter: Any
    max_length: int
    handle: Any = None  # how its adapter is switched on and off (``AdapterSpec.switch``)

    def predict(self, inputs: list, probabilities: bool) -> list:
        with self.group.selected(self) as model:
            return model.predict(inputs, probabilities=probabilities)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "base": self.spec.base.name,
            "base_group": self.group.index,
            "quantization": self.spec.quantization,
            "adapter": self.adapter.describe() if self.adapter else None,
            "head": self.head_spec.to_dict(),
        }


@dataclass
class SharedBackbone:
    """One loaded base and the artifacts served on it."""

    index: int
    key: tuple
    model: Any  # the AdaptedModel of the group's first artifact: its backbone is the shared base
    members: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepts(self, key: tuple, adapter) -> bool:
        return key == self.key and (adapter is None or adapter.can_join(self.model))

    @contextmanager
    def selected(self, member: Served) -> Iterator[Any]:
        """The shared model computing as ``member``: every adapter off, then its own on; its head."""
        model = self.model
        with self.lock:
            saved = model.head, model.head_spec, model.max_length
            for other in self.members:
                if other.adapter is not None:
                    other.adapter.switch(model, other.handle, False)
            if member.adapter is not None:
                member.adapter.switch(model, member.handle, True)
            model.head, model.head_spec, model.max_length = member.head, member.head_spec, member.max_length
            try:
                yield model
            finally:
                model.head, model.head_spec, model.max_length = saved


def _group_key(artifact: Artifact) -> tuple:
    """Artifacts with the same key can share one loaded backbone."""
    where = artifact.base_location()
    where = str(Path(where).resolve()) if Path(where).exists() else where
    spec = artifact.spec
    return where, spec.quantization, spec.dtype, artifact.head.lm_logits


def load_served(artifacts: dict[str, Path], device: str | None = None) -> dict[str, Served]:
    """Load every artifact once, sharing a backbone between artifacts trained on the same one."""
    from adapters.model import AdaptedModel

    opened = {name: open_artifact(path) for name, path in artifacts.items()}  # all checked before any load
    groups: list[SharedBackbone] = []
    served: dict[str, Served] = {}
    for name, artifact in opened.items():
        key = _group_key(artifact)
        group = next((g for g in groups if g.accepts(key, artifact.adapter)), None)
        if group is None:
            model = AdaptedModel.from_pretrained(artifact.path, device=device)
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
            member = _join(group, name, artifact)
        group.members.append(member)
        served[name] = member
    return served


def _join(group: SharedBackbone, name: str, artifact: Artifact) -> Served:
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


@dataclass
class Limits:
    max_batch: int = 32
    """Inputs run together in one batch at most."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_texts: int = 256
    """Inputs one request may hold."""
    max_chars: int = 20_000
    """Characters one input may hold."""


class Batcher:
    """Micro-batches of one artifact's requests: a short wait, a maximum size, one call per batch."""

    def __init__(self, served: Served, limits: Limits):
        self.served, self.limits = served, limits
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def predict(self, inputs: list, probabilities: bool) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, probabilities, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            while sum(len(b[0]) for b in batch) < self.limits.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    break
            for probabilities in (False, True):
                part = [b for b in batch if b[1] is probabilities]
                if part:
                    await loop.run_in_executor(None, self._answer, part, probabilities, loop)

    def _answer(self, part: list, probabilities: bool, loop) -> None:
        """Run one batch (in a worker thread); a failing batch is retried request by request."""
        inputs = [x for b in part for x in b[0]]
        try:
            results = self.served.predict(inputs, probabilities)
        except Exception:  # noqa: BLE001 - find which request it was, answer the others
            for one in part:
                try:
                    loop.call_soon_threadsafe(_resolve, one[2], self.served.predict(one[0], probabilities), None)
                except Exception as err:  # noqa: BLE001
                    loop.call_soon_threadsafe(_resolve, one[2], None, err)
            return
        start = 0
        for one in part:
            loop.call_soon_threadsafe(_resolve, one[2], results[start : start + len(one[0])], None)
            start += len(one[0])


def _resolve(future: asyncio.Future, value, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(value)


def _as_json(prediction) -> dict:
    """A head's prediction as a JSON object: ``(value, probabilities)`` pairs are split."""
    if isinstance(prediction, tuple) and len(prediction) == 2:
        return {"prediction": prediction[0], "probabilities": prediction[1]}
    return {"prediction": prediction}


def create_app(served: dict[str, Served], limits: Limits | None = None):
    """The FastAPI application serving ``served``."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, Field
    except ImportError:
        raise ConfigError("serving needs FastAPI and uvicorn: pip install 'qadapters[serve]'") from None

    limits = limits or Limits()
    batchers = {name: Batcher(s, limits) for name, s in served.items()}

    @asynccontextmanager
    async def lifespan(app):
        for b in batchers.values():
            b.task = asyncio.create_task(b.run())
        yield
        for b in batchers.values():
            b.task.cancel()

    app = FastAPI(title="qadapters", summary="adapted models, one quantized base", lifespan=lifespan)

    class PredictRequest(BaseModel):
        texts: list[str | dict | list[str]] = Field(min_length=1, description="the inputs (texts for most heads)")
        probabilities: bool = Field(True, description="also return each label's probability where the head has them")

    @app.exception_handler(AdaptersError)
    async def adapters_error(request: Request, err: AdaptersError):
        return JSONResponse(status_code=400, content={"detail": str(err)})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return JSONResponse(status_code=500, content={"detail": f"{type(err).__name__}: {err}"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": len(served)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"models": [s.describe() for s in served.values()]}

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: PredictRequest) -> dict:
        if name not in batchers:
            raise HTTPException(404, f"no model {name!r}; served: {sorted(batchers)}")
        if len(request.texts) > limits.max_texts:
            raise HTTPException(413, f"{len(request.texts)} texts in one request; at most {limits.max_texts}")
        longest = max(len(str(t)) for t in request.texts)
        if longest > limits.max_chars:
            raise HTTPException(413, f"an input of {longest} characters; at most {limits.max_chars}")
        predictions = await batchers[name].predict(list(request.texts), request.probabilities)
        return {"model": name, "predictions": [_as_json(p) for p in predictions]}

    return app


def serve(
    artifacts: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    device: str | None = None,
) -> None:
    """Load ``artifacts`` (``PATH`` or ``NAME=PATH``) and serve them until SIGTERM/SIGINT."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("serving needs FastAPI and uvicorn: pip install 'qadapters[serve]'") from None
    paths = parse_artifacts(artifacts)
    served = load_served(paths, device)
    groups = len({s.group.index for s in served.values()})
    print(f"serving {len(served)} model(s) on {groups} base(s) at http://{host}:{port} (docs: /docs)", flush=True)
    uvicorn.run(create_app(served, limits), host=host, port=port, log_level="info")
