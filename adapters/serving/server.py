"""Serve adapted models over HTTP: many artifacts, one quantized base in memory.

``qadapters serve sentiment=runs/sentiment licence=runs/licence`` loads each artifact once; artifacts
trained on the same base share one loaded backbone (``backbones.py``), and requests are micro-batched
per artifact behind a bounded queue (``batcher.py``).

The HTTP layer is FastAPI on uvicorn (the ``serve`` extra): ``POST /v1/models/{name}/predict`` with
``{"texts": [...], "probabilities": true}`` (read as JSON whatever the content type says: ``curl -d``
sends a form type), ``GET /v1/models`` (and ``/v1/models/{name}``), ``GET /health``, ``GET /metrics``
(Prometheus, ``metrics.py``) and the OpenAPI docs at ``/docs``; OpenAI's ``/v1/chat/completions`` and
``/v1/completions`` (``openai_api.py``, on the continuous batch of ``scheduler.py``), vLLM's ``/tokenize``,
``/detokenize`` and ``/classify`` (``vllm_api.py``) and its ``/v1/load_lora_adapter`` (``runtime.py``). For
deployments, as text-embeddings-inference
and vLLM do: ``api_key`` makes every ``/v1/`` endpoint ask for ``Authorization: Bearer KEY`` (401 without it), and
``serve`` refuses to listen beyond this machine without one unless told ``insecure``; a full queue
answers 503 with ``Retry-After``, a request past ``timeout_s`` 504. Bad requests get a 4xx JSON error
naming the problem (422 malformed or mistyped body, 404 unknown model, 413 too many or too long texts,
400 inputs the head cannot read); an error inside a model is a 500 JSON answer, never a dead server.
uvicorn stops on SIGTERM after the requests in flight are answered.
"""

# no `from __future__ import annotations` here: FastAPI reads the request model from the endpoints'
# annotations at run time, and the model class is local to create_app
import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from adapters.errors import AdaptersError, ConfigError
from adapters.serving.backbones import Served, load_served, parse_artifacts
from adapters.serving.batcher import Batcher, Limits, QueueFull
from adapters.serving.metrics import ServerMetrics
from adapters.serving.openai_schema import ModelNames, openai_schemas, vllm_schemas
from adapters.serving.runtime import Refused, RuntimeAdapters, json_body, request_schemas
from adapters.serving.scheduler import Scheduler
from adapters.serving.threads import MODEL_WORK, in_passing_thread

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ERRORS = {
    400: "inputs the model's head cannot read",
    401: "a missing or wrong API key (servers started with --api-key)",
    404: "no model of that name is served",
    409: "the server's state is in the way: a name in use, the --max-loras limit, an artifact named at start",
    413: "too many inputs in one request, or an input too long",
    500: "an error inside the model (the server lives on)",
    503: "the model's queue is full: retry after Retry-After seconds",
    504: "no answer within the request timeout",
}
RETRY_AFTER_S = 1  # what a 503 tells the client to wait: a batch takes well under a second to clear

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _as_json(prediction: Any) -> dict[str, Any]:
    """A head's prediction as a JSON object: ``(value, probabilities)`` pairs are split."""
    if isinstance(prediction, tuple) and len(prediction) == 2:
        return {"prediction": prediction[0], "probabilities": prediction[1]}
    return {"prediction": prediction}


class JsonBodies:
    """ASGI middleware: a POST body is JSON whatever its content type says. ``curl -d '{...}'`` sends
    ``application/x-www-form-urlencoded``, which FastAPI would answer with 422; this API takes no forms."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _api_key_guard(api_key: str | None) -> list[Any]:
    """The dependencies of the ``/v1/`` endpoints: a Bearer check when there is a key, none otherwise (so
    the OpenAPI schema says auth only where it is asked)."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    if api_key is None:
        return []
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(
                401, "missing or wrong API key: send Authorization: Bearer KEY", headers={"WWW-Authenticate": "Bearer"}
            )

    return [Depends(authorized)]


def _documented_errors() -> Callable[..., dict[int | str, dict[str, Any]]]:
    """``documented(*codes)``: the error answers an endpoint gives, in its OpenAPI schema (clients and
    fuzzers read them)."""
    from pydantic import BaseModel, Field

    class ErrorAnswer(BaseModel):
        detail: Any = Field(description="what was wrong, and how to fix it")
        error: dict[str, Any] | None = Field(
            default=None, description="the same, in OpenAI's shape: message, type, param, code"
        )

    def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {code: {"model": ErrorAnswer, "description": ERRORS[code]} for code in codes}

    return documented


def _openai_errors() -> dict[int | str, Any]:
    """The OpenAI endpoints' own error answers (``{"error": {...}}``), for their OpenAPI schema."""
    schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "object"}}}
    return {
        code: {"description": ERRORS[code], "content": {"application/json": {"schema": schema}}}
        for code in (400, 404, 409, 503, 504)
    }


def _predict_request() -> Any:
    """The body of ``POST /v1/models/{name}/predict``."""
    from pydantic import BaseModel, ConfigDict, Field

    class PredictRequest(BaseModel):
        # a field this API does not know is refused (422 naming it), never dropped in silence
        model_config = ConfigDict(extra="forbid")

        texts: list[str | dict[str, Any] | list[Any]] = Field(
            min_length=1, description="the inputs (texts for most heads; prompts or chat message lists for CausalLM)"
        )
        probabilities: bool | None = Field(
            None, description="also return each label's probability (default: yes where the head has them)"
        )
        max_new_tokens: int | None = Field(None, ge=1, description="CausalLM: tokens to generate at most")
        temperature: float | None = Field(None, gt=0, description="CausalLM: sample at this temperature")
        top_p: float | None = Field(None, gt=0, le=1, description="CausalLM: nucleus sampling")

        def settings(self) -> dict[str, Any]:
            given = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
            chosen = {k: v for k, v in given.items() if v is not None}
            if "temperature" in chosen or "top_p" in chosen:
                chosen["do_sample"] = True
            return chosen

    return PredictRequest


def create_app(served: dict[str, Served], limits: Limits | None = None, api_key: str | None = None) -> Any:
    """The FastAPI application serving ``served`` (``api_key``: the Bearer token ``/v1/`` asks for)."""
    try:
        from fastapi import FastAPI
    except ImportError:
        raise ConfigError("serving needs FastAPI and uvicorn: pip install 'qadapters[serve]'") from None

    limits = limits or Limits()
    metrics = ServerMetrics(lambda name: batchers[name].waiting, list(served))
    batchers = {name: Batcher(s, limits, metrics.batch_observer(name)) for name, s in served.items()}
    # one continuous batch per shared base that generates
    generating = [s for s in served.values() if s.head_spec.lm_logits]
    schedulers = {s.group.index: Scheduler(s.group, limits.max_queue) for s in generating}
    metrics.add_generation(schedulers)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        for b in batchers.values():
            b.task = asyncio.create_task(b.run())
        yield
        for b in batchers.values():
            if b.task is not None:
                b.task.cancel()

    app = FastAPI(title="qadapters", summary="adapted models, one quantized base", lifespan=lifespan)
    app.add_middleware(JsonBodies)
    guard, documented = _api_key_guard(api_key), _documented_errors()
    _add_error_handlers(app)
    _add_service_routes(app, served, metrics, guard, documented)
    # OpenAI's endpoints answer their own errors as OpenAI does ({"error": {...}}); auth and crashes as ours
    openai_errors = {**documented(401, 500), **_openai_errors()}
    names = ModelNames(served)  # the schemas' model enums, kept current by the runtime routes
    add_openai_routes(app, served, schedulers, guard, openai_errors, limits, names)
    add_vllm_routes(app, served, batchers, guard, {**openai_errors, **documented(413)}, limits, names)
    _add_predict_route(app, served, batchers, limits, metrics, guard, documented)
    runtime = RuntimeAdapters(served, limits.max_loras)
    add_runtime_routes(app, runtime, batchers, schedulers, limits, metrics, guard, openai_errors, names)
    return app


def add_runtime_routes(
    app: Any,
    runtime: RuntimeAdapters,
    batchers: dict[str, Batcher],
    schedulers: dict[int, Scheduler],
    limits: Limits,
    metrics: ServerMetrics,
    guard: list[Any],
    errors: dict[int | str, Any],
    names: ModelNames,
) -> None:
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (``runtime.py``): a loaded artifact
    gets its batcher (and its base a scheduler, if it generates), its /metrics gauges and its place in the
    OpenAPI schema's model lists; an unloaded one's work is cancelled first."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    load_schema, unload_schema, done = request_schemas()
    answers = {**errors, **done}

    @app.post("/v1/load_lora_adapter", dependencies=guard, responses=answers, openapi_extra=load_schema)
    async def load_lora_adapter(request: Request) -> Any:
        try:
            body = await json_body(request, {"lora_name", "lora_path", "lora_int_id", "base_model_name"})
            loop = asyncio.get_running_loop()
            member = await loop.run_in_executor(MODEL_WORK, runtime.load, body.get("lora_name"), body.get("lora_path"))
        except Refused as err:
            return JSONResponse(status_code=err.status, content=err.body())
        batchers[member.name] = Batcher(member, limits, metrics.batch_observer(member.name))
        batchers[member.name].task = asyncio.create_task(batchers[member.name].run())
        if member.head_spec.lm_logits and member.group.index not in schedulers:
            schedulers[member.group.index] = Scheduler(member.group, limits.max_queue)
            metrics.watch_base(member.group.index, schedulers[member.group.index])
        metrics.watch_model(member.name)
        _schema_changed(app, names)
        return PlainTextResponse(f"Success: LoRA adapter '{member.name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=guard, responses=answers, openapi_extra=unload_schema)
    async def unload_lora_adapter(request: Request) -> Any:
        try:
            member = runtime.leaving((await json_body(request, {"lora_name", "lora_int_id"})).get("lora_name"))
        except Refused as err:
            return JSONResponse(status_code=err.status, content=err.body())
        if member.group.index in schedulers:
            schedulers[member.group.index].cancel(member)
        batcher = batchers.pop(member.name)
        if batcher.task is not None:
            batcher.task.cancel()
        await asyncio.get_running_loop().run_in_executor(MODEL_WORK, runtime.unload, member)
        metrics.forget_model(member.name)
        _schema_changed(app, names)
        return PlainTextResponse(f"Success: LoRA adapter '{member.name}' removed successfully.")


def _schema_changed(app: Any, names: ModelNames) -> None:
    """The served names changed: the model enums follow, and ``/openapi.json`` is built afresh."""
    names.refresh()
    app.openapi_schema = None


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
    413: "invalid_request_error", 503: "server_overloaded", 504: "timeout_error",
}  # fmt: skip


def error_body(status: int, message: Any) -> dict[str, Any]:
    """An error answer both ways: ``detail`` (FastAPI's) and ``error`` (OpenAI's: what its clients show)."""
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    text = message if isinstance(message, str) else str(message)
    return {"detail": message, "error": {"message": text, "type": kind, "param": None, "code": status}}


def _add_error_handlers(app: Any) -> None:
    """Our typed errors answer 400 with their message; anything else 500 with its type and message; every
    HTTP error (401, 404, 413, 503 ...) in both FastAPI's and OpenAI's shape (``error_body``)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, err.detail), err.status_code, headers=err.headers)

    @app.exception_handler(AdaptersError)
    async def adapters_error(request: Request, err: AdaptersError) -> JSONResponse:
        return JSONResponse(status_code=400, content=error_body(400, str(err)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content=error_body(500, f"{type(err).__name__}: {err}"))


def _add_service_routes(app: Any, served: dict[str, Served], metrics: ServerMetrics, guard: list, documented) -> None:
    """``/health``, ``/metrics`` (Prometheus) and ``/v1/models``."""
    from fastapi.responses import Response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(served)}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
    )
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    started = int(time.time())

    def card(name: str, s: Served) -> dict[str, Any]:
        """OpenAI's model object, with vLLM's ``parent`` (the base an adapter sits on) and ``max_model_len``."""
        described = s.describe()
        return {
            "id": name, "object": "model", "created": started, "owned_by": "qadapters", "kind": s.head_spec.kind,
            "root": name, "parent": described.get("base"), "max_model_len": described.get("max_length"),
        }  # fmt: skip

    @app.get("/v1/models", dependencies=guard, responses=documented(401, 500))
    async def models() -> dict[str, Any]:
        """Every served artifact: ``models`` (ours) and ``data`` (OpenAI's list format, with each kind)."""
        data = [card(name, s) for name, s in served.items()]
        return {"object": "list", "data": data, "models": [s.describe() for s in served.values()]}

    @app.get("/v1/models/{name}", dependencies=guard, responses=documented(401, 404, 500))
    async def model(name: str) -> dict[str, Any]:
        """One served artifact as OpenAI's ``models.retrieve`` reads it."""
        from fastapi import HTTPException

        if name not in served:
            raise HTTPException(404, f"no model {name!r}; served: {sorted(served)}")
        return card(name, served[name])


def _add_predict_route(
    app: Any,
    served: dict[str, Served],
    batchers: dict[str, Batcher],
    limits: Limits,
    metrics: ServerMetrics,
    guard: list,
    documented,
) -> None:
    """``/v1/models/{name}/predict``: the request checked against ``limits``, then queued on the model's batcher."""
    from fastapi import HTTPException

    PredictRequest = _predict_request()  # noqa: N806 - a class, made where pydantic is known to be installed

    @app.post("/v1/models/{name}/predict", dependencies=guard, responses=documented(400, 401, 404, 413, 500, 503, 504))
    async def predict(name: str, body: PredictRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        request: Any = body  # the class is made at run time (pydantic is an optional extra): typed Any here
        if name not in batchers:
            raise HTTPException(404, f"no model {name!r}; served: {sorted(batchers)}")
        _check_size(request.texts, limits)
        start, status = time.monotonic(), 200
        try:
            generates = served[name].head_spec.lm_logits
            probabilities = request.probabilities if request.probabilities is not None else not generates
            predictions = await batchers[name].predict(list(request.texts), probabilities, **request.settings())
        except QueueFull as err:
            status = 503
            raise HTTPException(503, f"{err}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except TimeoutError:
            status = 504
            raise HTTPException(504, f"no answer within {limits.timeout_s:g} s; the server is busy") from None
        except AdaptersError:
            status = 400
            raise
        except Exception:
            status = 500
            raise
        finally:
            metrics.answered(name, status, time.monotonic() - start)
        return {"model": name, "predictions": [_as_json(p) for p in predictions]}


def _check_size(texts: list, limits: Limits) -> None:
    """413 for a request over the text count or an input over the character limit."""
    from fastapi import HTTPException

    if len(texts) > limits.max_texts:
        raise HTTPException(413, f"{len(texts)} texts in one request; at most {limits.max_texts}")
    longest = max(len(str(t)) for t in texts)
    if longest > limits.max_chars:
        raise HTTPException(413, f"an input of {longest} characters; at most {limits.max_chars}")


def add_openai_routes(
    app: Any,
    served: dict[str, Served],
    schedulers: dict[int, Scheduler],
    guard: list[Any],
    errors: dict[int | str, Any],
    limits: Limits,
    names: ModelNames,
) -> None:
    """``/v1/chat/completions`` and ``/v1/completions`` (``openai_api.py``)."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    from adapters.serving import openai_api as oai
    from adapters.serving.openai_requests import checked_generation, read

    chat_schema, text_schema = openai_schemas(names)

    async def run(request: Request, chat: bool) -> Any:
        ask = read(await _json(request), chat, served, limits.max_chars)
        checked_generation(ask)
        choices = oai.submit(schedulers[ask.member.group.index], ask)  # a full queue is a 503 before any answer
        if ask.stream:
            return StreamingResponse(oai.sse(ask, choices), media_type="text/event-stream")
        await oai.complete(choices, ask)
        return oai.answer(ask, choices)

    @app.post("/v1/chat/completions", dependencies=guard, openapi_extra=chat_schema, responses=errors)
    async def chat_completions(request: Request) -> Any:
        return await _answered(run(request, True), limits.timeout_s)

    @app.post("/v1/completions", dependencies=guard, openapi_extra=text_schema, responses=errors)
    async def completions(request: Request) -> Any:
        return await _answered(run(request, False), limits.timeout_s)


def add_vllm_routes(
    app: Any,
    served: dict[str, Served],
    batchers: dict[str, Batcher],
    guard: list,
    errors: dict,
    limits: Limits,
    names: ModelNames,
) -> None:
    """vLLM's ``/tokenize``, ``/detokenize`` and ``/classify`` (``vllm_api.py``)."""
    from fastapi import Request

    from adapters.serving import vllm_api

    schemas = vllm_schemas(names)

    @app.post("/tokenize", dependencies=guard, openapi_extra=schemas["tokenize"], responses=errors)
    async def tokenize(request: Request) -> Any:
        async def work() -> Any:
            return vllm_api.tokenize(await _json(request), served, limits.max_chars)

        return await _answered(work(), limits.timeout_s)

    @app.post("/detokenize", dependencies=guard, openapi_extra=schemas["detokenize"], responses=errors)
    async def detokenize(request: Request) -> Any:
        async def work() -> Any:
            return vllm_api.detokenize(await _json(request), served)

        return await _answered(work(), limits.timeout_s)

    @app.post("/classify", dependencies=guard, openapi_extra=schemas["classify"], responses=errors)
    async def classify(request: Request) -> Any:
        async def work() -> Any:
            return await vllm_api.classify(await _json(request), served, batchers, limits.max_texts)

        return await _answered(work(), limits.timeout_s)


async def _answered(work: Awaitable[Any], timeout_s: float) -> Any:
    """``work``'s answer, or its refusal in OpenAI's shape: its own 4xx, 503 with ``Retry-After`` when the queue
    is full, 504 past the timeout."""
    from fastapi.responses import JSONResponse

    from adapters.serving.openai_requests import OpenAIError

    try:
        return await work
    except OpenAIError as err:
        return JSONResponse(status_code=err.status, content=err.body())
    except QueueFull as err:
        busy = OpenAIError(503, f"{err}; retry later")
        return JSONResponse(status_code=503, content=busy.body(), headers={"Retry-After": str(RETRY_AFTER_S)})
    except TimeoutError:
        late = OpenAIError(504, f"no answer within {timeout_s:g} s; the server is busy")
        return JSONResponse(status_code=504, content=late.body())


async def _json(request: Any) -> Any:
    """The request's body as JSON (an ``OpenAIError`` 400 when it is not)."""
    from adapters.serving.openai_requests import OpenAIError

    try:
        return await request.json()
    except ValueError:
        raise OpenAIError(400, "the body is not valid JSON") from None


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without an API key, unless ``insecure`` says it is meant."""
    if host not in LOCAL_HOSTS and api_key is None and not insecure:
        raise ConfigError(
            f"--host {host} listens beyond this machine: give --api-key (or QADAPTERS_API_KEY) so only "
            f"clients with the key are answered, or --insecure if that is what you mean"
        )


def serve(
    artifacts: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    device: str | None = None,
    api_key: str | None = None,
    insecure: bool = False,
    verify: bool = True,
) -> None:
    """Load ``artifacts`` (``PATH`` or ``NAME=PATH``), each verified against its manifest (``verify``), and serve
    them until SIGTERM/SIGINT, which drains the requests in flight and exits with status 0."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("serving needs FastAPI and uvicorn: pip install 'qadapters[serve]'") from None
    check_exposure(host, api_key, insecure)  # before any model loads
    paths = parse_artifacts(artifacts)
    served = in_passing_thread(load_served, paths, device, verify)  # the main thread holds no OpenMP pool
    groups = len({s.group.index for s in served.values()})
    print(f"serving {len(served)} model(s) on {groups} base(s) at http://{host}:{port} (docs: /docs)", flush=True)
    server = _draining_server_class()(
        uvicorn.Config(create_app(served, limits, api_key), host=host, port=port, log_level="info")
    )
    server.run()


def _draining_server_class() -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, exiting with status 0 after SIGTERM/SIGINT once the requests in flight are answered
        (uvicorn re-raises the signal after its graceful shutdown, which ends the process with -15)."""

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # drained: the shutdown was the one asked for

    return DrainingServer
