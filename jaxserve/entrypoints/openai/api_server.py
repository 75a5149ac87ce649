"""The OpenAI-compatible HTTP server: Starlette routes over the async engine, run by uvicorn.

`run_server(ns)` is `jaxserve serve`: it binds the port first (a taken port fails in a second,
not after the model loads), builds the engine (weights, compiled buckets), then serves until
SIGTERM/SIGINT, letting in-flight requests finish for up to `--shutdown-timeout` seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import importlib
import inspect
import json
import logging
import os
import time
import uuid
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pydantic
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxserve import __version__
from jaxserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from jaxserve.entrypoints.openai import protocol
from jaxserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                  DetokenizeRequest, DetokenizeResponse,
                                                  ModelCard, ModelList, TokenizeChatRequest,
                                                  TokenizeCompletionRequest, TokenizeResponse)
from jaxserve.entrypoints.openai.serving import RequestError, ServingOptions
from jaxserve.entrypoints.openai.serving_chat import OpenAIServingChat
from jaxserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from jaxserve.entrypoints.http_common import (BodyError, bind_socket, error_body, error_json,
                                             graceful_server, read_json_object,
                                             unless_disconnected)
from jaxserve.entrypoints.openai.chat_template import load_chat_template
from jaxserve.entrypoints.serve_flags import BY_KEY
from jaxserve.metrics import Metrics

logger = logging.getLogger("jaxserve.server")

# Paths that answer without an API key.
_OPEN_PATHS = {"/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs"}


# ---- errors --------------------------------------------------------------------------------------
def error_response(e: RequestError) -> JSONResponse:
    return error_json(e.message, e.status, param=e.param, code=e.code)


def _validation_error(e: pydantic.ValidationError) -> RequestError:
    first = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body",))
    msg = first.get("msg", str(e)).removeprefix("Value error, ")
    return RequestError(f"{loc}: {msg}" if loc else msg, param=loc or None)


async def _read_body(request: Request, max_bytes: int | None) -> dict[str, Any]:
    """The JSON object body; 413 past `max_bytes`, 400 for what is not a sound JSON object."""
    try:
        return await read_json_object(request, max_bytes)
    except BodyError as e:
        raise RequestError(str(e), e.status) from None


def _validate(body: dict[str, Any], model: type[pydantic.BaseModel]):
    try:
        parsed = model.model_validate(body)
    except pydantic.ValidationError as e:
        raise _validation_error(e) from None
    if parsed.model_extra:
        logger.warning("ignored unknown request fields: %s", sorted(parsed.model_extra))
    return parsed


# ---- disconnects and shutdown -------------------------------------------------------------------
_SHUTTING_DOWN = "The server is shutting down; this response was cut short."


async def _unless_stopped(work: Awaitable[pydantic.BaseModel], stopping: asyncio.Event):
    """`work`'s result; if the server stops first, `work` is cancelled (its engine requests are
    aborted) and the client gets a 503."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the client left: `work` goes too
        task.cancel()
        raise
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise RequestError(_SHUTTING_DOWN, 503)


async def _json_until_disconnect(request: Request, work: Awaitable[pydantic.BaseModel],
                                 stopping: asyncio.Event) -> Response:
    """The response `work` builds, as JSON; if the client goes away first, `work` is cancelled
    (which aborts its engine requests)."""
    response = await unless_disconnected(request.receive, _unless_stopped(work, stopping))
    return Response(status_code=499) if response is None else JSONResponse(
        response.model_dump())


class _SSEResponse(StreamingResponse):
    """Server-sent events that stop (and abort the request) as soon as the client leaves, or
    end with an error event and [DONE] when the server stops."""

    def __init__(self, payloads: AsyncIterator[str], stopping: asyncio.Event):
        self.stopping = stopping
        super().__init__(_sse(payloads, self), media_type="text/event-stream")
        self.on_close: Callable[[], None] | None = None

    async def __call__(self, scope, receive, send) -> None:
        async def never():  # the watcher in unless_disconnected owns `receive`
            await asyncio.Event().wait()

        await unless_disconnected(receive, super().__call__(scope, never, send))


async def _until(items: AsyncIterator[str], stopping: asyncio.Event) -> AsyncIterator[str]:
    """`items` until they end or `stopping` is set; then `items` is closed (its requests are
    aborted)."""
    it = aiter(items)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            following = asyncio.ensure_future(anext(it))
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await following
                return
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        if hasattr(it, "aclose"):
            await it.aclose()


async def _sse(payloads: AsyncIterator[str], response: _SSEResponse) -> AsyncIterator[str]:
    """`data: ...` events, then `data: [DONE]`; a failure mid-stream, or the server stopping,
    is an error event first."""
    try:
        try:
            async for payload in _until(payloads, response.stopping):
                yield f"data: {payload}\n\n"
            if response.stopping.is_set():
                yield f"data: {json.dumps(error_body(_SHUTTING_DOWN, 503))}\n\n"
        except RequestError as e:
            yield f"data: {json.dumps(error_body(e.message, e.status))}\n\n"
        except ValueError as e:
            yield f"data: {json.dumps(error_body(str(e), 400))}\n\n"
        except EngineDeadError:
            logger.exception("engine failure during a stream")
            yield f"data: {json.dumps(error_body('The engine has stopped.', 500))}\n\n"
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - reported to the client, the server carries on
            logger.exception("failure during a stream")
            message = "Internal server error (details are in the server's log)."
            yield f"data: {json.dumps(error_body(message, 500))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if response.on_close is not None:
            response.on_close()


# ---- middleware ----------------------------------------------------------------------------------
class _AuthMiddleware:
    """`Authorization: Bearer <key>` on every path but health, metrics and docs."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = (Headers(scope=scope).get("authorization") or "").encode()
        if not any(hmac.compare_digest(given, k) for k in self.keys):
            response = error_json("Invalid or missing API key.", 401, code="invalid_api_key")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _RequestIdMiddleware:
    """`--enable-request-id-headers`: every response carries X-Request-Id (the client's, if sent)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        return await self.app(scope, receive, send_with_id)


class _HTTPMetricsMiddleware:
    """Counts requests and their latency per route (unknown paths are one "none" handler)."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def record_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = scope["path"]
            handler = path if path in self.paths else (
                "/v1/models/{model}" if path.startswith("/v1/models/") else "none")
            method = scope["method"]
            self.metrics.http_requests.labels(handler, method, f"{status[0] // 100}xx").inc()
            self.metrics.http_duration.labels(handler, method).observe(
                time.perf_counter() - start)


def _user_middleware(path: str) -> Middleware:
    """`--middleware module.name`: an ASGI middleware class, or an async function
    `(request, call_next) -> response` (FastAPI's HTTP-middleware form)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"--middleware {path!r}: give an import path, module.name")
    obj = getattr(importlib.import_module(module_name), attr)
    if inspect.isclass(obj):
        return Middleware(obj)
    if inspect.iscoroutinefunction(obj):
        return Middleware(BaseHTTPMiddleware, dispatch=obj)
    raise ValueError(f"--middleware {path!r} is neither a class nor an async function")


# ---- the app -------------------------------------------------------------------------------------
def _opt(ns: Namespace, name: str, default=None):
    value = getattr(ns, name, default)
    return default if value is None else value


def served_model_names(ns: Namespace, engine_model_name: str) -> list[str]:
    names = _opt(ns, "served_model_name")
    if isinstance(names, str):
        names = [names]
    return list(names) if names else [engine_model_name]


def build_app(ns: Namespace, engine: AsyncLLMEngine) -> Starlette:
    """The Starlette app for this engine and these frontend flags."""
    core = engine.engine
    names = served_model_names(ns, core.model_name)
    options = ServingOptions(
        served_model_names=names, response_role=_opt(ns, "response_role", "assistant"),
        return_tokens_as_token_ids=bool(_opt(ns, "return_tokens_as_token_ids", False)),
        enable_prompt_tokens_details=bool(_opt(ns, "enable_prompt_tokens_details", False)),
        enable_force_include_usage=bool(_opt(ns, "enable_force_include_usage", False)),
        chat_template_content_format=_opt(ns, "chat_template_content_format", "auto"),
        enable_log_requests=bool(_opt(ns, "enable_log_requests", False)),
        max_log_len=_opt(ns, "max_log_len"),
        enable_auto_tool_choice=bool(_opt(ns, "enable_auto_tool_choice", False)),
        tool_call_parser=_opt(ns, "tool_call_parser") or None,
        reasoning_parser=_opt(ns, "reasoning_parser") or None,
        trust_request_chat_template=bool(_opt(ns, "trust_request_chat_template", False)))
    chat_template = load_chat_template(_opt(ns, "chat_template"))
    max_body = _opt(ns, "max_request_body_bytes", BY_KEY["max_request_body_bytes"].default)
    max_body = None if max_body <= 0 else max_body
    # NOTE: templates, tokenizing and detokenizing run here, never on the event loop.
    prepare_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxserve-prepare")

    async def off_loop(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            prepare_pool, functools.partial(fn, *args, **kwargs))

    async def parse(request: Request, model: type[pydantic.BaseModel]):
        body = await _read_body(request, max_body)
        return await asyncio.to_thread(_validate, body, model)  # a large body takes a while
    completions = OpenAIServingCompletion(engine, options)
    chat = OpenAIServingChat(engine, options, chat_template=chat_template)
    if core.metrics is None:
        cache = core.cache_config
        core.metrics = Metrics(names[0], cache_info={
            "block_size": str(cache.block_size), "num_gpu_blocks": str(core.runner.num_pages),
            "cache_dtype": str(core.runner.kv_cache.dtype),
            "enable_prefix_caching": str(cache.enable_prefix_caching)})
    metrics = core.metrics
    load = {"in_flight": 0}
    stopping = asyncio.Event()  # set when the server stops: open responses end with a 503

    async def drain(timeout: float) -> None:
        """On shutdown: let requests in flight finish for up to `timeout` s, then end the rest
        (streams with an error event and [DONE], others with a 503)."""
        deadline = time.monotonic() + max(timeout, 0)
        while load["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if load["in_flight"]:
            logger.info("shutting down: ending %d responses in flight", load["in_flight"])
        stopping.set()
        deadline = time.monotonic() + 5
        while load["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def base_id(request: Request, body_id: str | None, prefix: str) -> str:
        return f"{prefix}-{body_id or request.headers.get('x-request-id') or uuid.uuid4().hex}"

    def engine_id(request_id: str) -> str:
        # Unique inside the engine even when clients reuse an X-Request-Id.
        return f"{request_id}-{uuid.uuid4().hex[:8]}"

    def guarded(handler: Callable[[Request], Awaitable[Response]]):
        async def route(request: Request) -> Response:
            load["in_flight"] += 1
            streaming = False
            try:
                response = await handler(request)
                if isinstance(response, _SSEResponse):  # in flight until the stream ends
                    streaming = True
                    response.on_close = lambda: load.__setitem__("in_flight",
                                                                 load["in_flight"] - 1)
                return response
            except RequestError as e:
                return error_response(e)
            except RecursionError:
                return error_json("The request is nested too deeply to process.", 400)
            except EngineDeadError:
                logger.exception("the engine has stopped")
                return error_json("The engine has stopped; restart the server.", 500)
            finally:
                if not streaming:
                    load["in_flight"] -= 1
        return route

    async def create_completion(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        request_id = base_id(request, req.request_id, "cmpl")
        prompts = await off_loop(completions.prepare, req, engine_id(request_id))
        await completions.compile_grammar(prompts[0].params, prompts[0].constraint_param)
        if req.stream:
            return _SSEResponse(completions.stream(req, request_id, prompts), stopping)
        return await _json_until_disconnect(
            request, completions.complete(req, request_id, prompts), stopping)

    async def create_chat_completion(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        request_id = base_id(request, req.request_id, "chatcmpl")
        prompt = await off_loop(chat.prepare, req)
        await chat.compile_grammar(prompt.params, prompt.constraint_param)
        eid = engine_id(request_id)
        if req.stream:
            return _SSEResponse(chat.stream(req, request_id, eid, prompt), stopping)
        return await _json_until_disconnect(
            request, chat.complete(req, request_id, eid, prompt), stopping)

    async def list_models(request: Request) -> Response:
        cards = [ModelCard(id=name, root=core.model_path, max_model_len=core.max_model_len)
                 for name in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        chat.check_model(name)
        return JSONResponse(ModelCard(id=name, root=core.model_path,
                                      max_model_len=core.max_model_len).model_dump())

    async def tokenize(request: Request) -> Response:
        body = await _read_body(request, max_body)
        if "messages" in body:
            req = await asyncio.to_thread(_validate, body, TokenizeChatRequest)
            chat.check_model(req.model)
            text = await off_loop(
                chat.render, req.messages, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs,
                tools=req.tools)
        else:
            req = await asyncio.to_thread(_validate, body, TokenizeCompletionRequest)
            chat.check_model(req.model)
            text = req.prompt

        def encode():
            ids = chat.tokenizer(text, add_special_tokens=req.add_special_tokens).input_ids
            return ids, (chat.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs
                         else None)

        ids, strs = await off_loop(encode)
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=core.max_model_len,
                                             tokens=ids, token_strs=strs).model_dump())

    async def detokenize(request: Request) -> Response:
        req = await parse(request, DetokenizeRequest)
        chat.check_model(req.model)
        vocab = core.model_config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"Token id {bad} is out of vocabulary (size {vocab}).",
                               param="tokens")
        text = await off_loop(chat.tokenizer.decode, req.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    async def health(request: Request) -> Response:
        if engine.dead_error is not None:
            return error_json("The engine has stopped.", 503)
        return Response(status_code=200)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def server_load(request: Request) -> Response:
        return JSONResponse({"server_load": load["in_flight"]})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1/completions", guarded(create_completion), methods=["POST"]),
        Route("/v1/chat/completions", guarded(create_chat_completion), methods=["POST"]),
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(get_model), methods=["GET"]),
        Route("/tokenize", guarded(tokenize), methods=["POST"]),
        Route("/detokenize", guarded(detokenize), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/load", server_load, methods=["GET"]),
    ]
    if _opt(ns, "enable_metrics", True):
        routes.append(Route("/metrics", prometheus, methods=["GET"]))
    if not _opt(ns, "disable_fastapi_docs", False):
        schema = openapi_schema(_opt(ns, "root_path", ""))

        async def openapi(request: Request) -> Response:
            return JSONResponse(schema)

        async def docs(request: Request) -> Response:
            return HTMLResponse(_SWAGGER_PAGE)

        routes += [Route("/openapi.json", openapi, methods=["GET"]),
                   Route("/docs", docs, methods=["GET"])]

    middleware = [Middleware(_HTTPMetricsMiddleware, metrics=metrics,
                             paths={r.path for r in routes}), Middleware(
        CORSMiddleware, allow_origins=_opt(ns, "allowed_origins", ["*"]),
        allow_methods=_opt(ns, "allowed_methods", ["*"]),
        allow_headers=_opt(ns, "allowed_headers", ["*"]),
        allow_credentials=bool(_opt(ns, "allow_credentials", False)))]
    if _opt(ns, "enable_request_id_headers", False):
        middleware.append(Middleware(_RequestIdMiddleware))
    keys = _api_keys(ns)
    if keys:
        middleware.append(Middleware(_AuthMiddleware, keys=keys))
    middleware += [_user_middleware(p) for p in _opt(ns, "middleware", []) or []]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_json(str(exc.detail), exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_json("Internal server error (details are in the server's log).", 500)

    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.engine = engine
    app.state.load = load
    app.state.drain = drain
    return app


def _api_keys(ns: Namespace) -> list[str]:
    keys = _opt(ns, "api_key") or os.environ.get("VLLM_API_KEY") or os.environ.get(
        "JAXSERVE_API_KEY")
    if not keys:
        return []
    if isinstance(keys, str):
        keys = [keys]
    return [k for k in keys if k]


def openapi_schema(root_path: str = "") -> dict[str, Any]:
    """OpenAPI 3.1 for the JSON endpoints, built from the pydantic request models; behind a
    proxy (`--root-path`) the schema's server is that prefix."""
    defs: dict[str, Any] = {}

    def ref(model: type[pydantic.BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def post(model, response, summary):
        return {"post": {"summary": summary,
                         "requestBody": {"required": True, "content": {
                             "application/json": {"schema": ref(model)}}},
                         "responses": {"200": {"description": "OK", "content": {
                             "application/json": {"schema": ref(response)}}}}}}

    paths = {
        "/v1/completions": post(CompletionRequest, protocol.CompletionResponse,
                                "Create a completion"),
        "/v1/chat/completions": post(ChatCompletionRequest, protocol.ChatCompletionResponse,
                                     "Create a chat completion"),
        "/tokenize": post(TokenizeCompletionRequest, TokenizeResponse, "Tokenize a prompt"),
        "/detokenize": post(DetokenizeRequest, DetokenizeResponse, "Detokenize token ids"),
        "/v1/models": {"get": {"summary": "List models", "responses": {"200": {
            "description": "OK", "content": {"application/json": {"schema": ref(ModelList)}}}}}},
    }
    for path, summary in (("/health", "Liveness"), ("/ping", "Liveness"),
                          ("/version", "Server version"), ("/load", "Requests in flight"),
                          ("/metrics", "Prometheus metrics")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    schema = {"openapi": "3.1.0", "info": {"title": "jaxserve", "version": __version__},
              "paths": paths, "components": {"schemas": defs}}
    if root_path:
        schema["servers"] = [{"url": root_path}]
    return schema


_SWAGGER_PAGE = """<!doctype html><html><head><title>jaxserve API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#ui"});</script></body></html>"""


# ---- running it ----------------------------------------------------------------------------------
def uvicorn_config(ns: Namespace, app: Starlette):
    import uvicorn

    return uvicorn.Config(
        app, log_level=_opt(ns, "uvicorn_log_level", "info"),
        access_log=not _opt(ns, "disable_uvicorn_access_log", False),
        root_path=_opt(ns, "root_path", ""), ssl_keyfile=_opt(ns, "ssl_keyfile"),
        ssl_certfile=_opt(ns, "ssl_certfile"), ssl_ca_certs=_opt(ns, "ssl_ca_certs"),
        ssl_cert_reqs=int(_opt(ns, "ssl_cert_reqs", 0)),
        timeout_graceful_shutdown=_opt(ns, "shutdown_timeout", 0), lifespan="off")


def run_server(ns: Namespace) -> int:
    """`jaxserve serve`: bind, start the engine, serve until SIGTERM or SIGINT; returns 0."""
    load_chat_template(_opt(ns, "chat_template"))  # a missing file fails before the slow start
    sock = bind_socket(_opt(ns, "host"), _opt(ns, "port", 8000))
    early_logs = None
    if _opt(ns, "gateway_address") and _opt(ns, "log_streaming", True):
        from jaxserve.gateway.worker import LogQueue, install_log_queue

        early_logs = install_log_queue(LogQueue(5000))  # loading and compiling lines too
    engine = AsyncLLMEngine.from_engine_args(ns.engine_args)
    app = build_app(ns, engine)
    host, port = sock.getsockname()[:2]
    scheme = "https" if _opt(ns, "ssl_certfile") else "http"
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    logger.info("serving %s on %s://%s:%d%s (routes: %s)",
                ", ".join(served_model_names(ns, engine.engine.model_name)), scheme, shown, port,
                _opt(ns, "root_path", ""),
                ", ".join(sorted({r.path for r in app.routes})))
    config = uvicorn_config(ns, app)
    # NOTE: after the uvicorn config, which replaces the handlers of uvicorn's loggers.
    gateway = _gateway_client(ns, engine, scheme, host, port, early_logs,
                              ready=lambda: server.started and engine.dead_error is None)
    # On SIGTERM the Gateway hears first (it stops routing here), then in-flight requests drain.
    server = graceful_server(config, on_exit=gateway.stop_soon if gateway else None,
                             drain=app.state.drain)
    if gateway is not None:
        gateway.start()
    try:
        server.run(sockets=[sock])
    finally:
        if gateway is not None:
            gateway.stop()
        logger.info("shutting down: aborting %d unfinished requests",
                    len(engine.engine.requests))
        engine.shutdown()
    return 0


def _gateway_client(ns: Namespace, engine: AsyncLLMEngine, scheme: str, host: str, port: int,
                    logs, ready: Callable[[], bool]):
    """The `--gateway-address` registration of this server (None without one)."""
    if not _opt(ns, "gateway_address"):
        return None
    from jaxserve.gateway.worker import (EngineLoad, GatewayClient, advertised_url,
                                         device_info, launch_arguments)

    core = engine.engine
    names = served_model_names(ns, core.model_name)
    return GatewayClient(
        ns.gateway_address, token=_opt(ns, "gateway_token"),
        worker_url=advertised_url(host, port, scheme=scheme, worker_url=_opt(ns, "worker_url")),
        models=names, backend=_opt(ns, "backend", "vllm"), backend_args=launch_arguments(ns),
        device=device_info(), version=__version__, max_model_len=core.max_model_len,
        heartbeat_interval=_opt(ns, "heartbeat_interval", 30.0),
        load_fn=EngineLoad(core, names[0]), log_streaming=_opt(ns, "log_streaming", True),
        ready=ready, logs=logs, api_key=(_api_keys(ns) or [None])[0])
