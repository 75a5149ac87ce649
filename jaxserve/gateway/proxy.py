"""The OpenAI routes of the Gateway: each request is relayed to a healthy worker serving its model,
the answer streamed back chunk by chunk. A worker that fails before it answered anything (connection
refused, or dropped before the response began) is marked unhealthy at once and the request goes to
another worker: the client has received nothing yet, so it sees one answer.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxserve.entrypoints.http_common import error_json, unless_disconnected
from jaxserve.gateway.registry import NoWorker, Registry, Worker

# Hop-by-hop headers (RFC 9110 7.6.1): never relayed; a request's host and length are httpx's.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade"}
_NOT_FORWARDED = _HOP | {"host", "content-length"}
WORKER_HEADER = "X-Gateway-Worker"
# How a worker fails before it answered anything: refused, unreachable, or dropped the connection.
_WORKER_DOWN = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                httpx.RemoteProtocolError)


def no_worker_response(e: NoWorker) -> JSONResponse:
    code = "model_not_found" if e.status == 404 else None
    return error_json(e.message, e.status, code=code, param="model" if code else None)


def new_client() -> httpx.AsyncClient:
    """The Gateway's client for its workers: no read timeout (a generation takes as long as it
    takes), idle connections dropped before uvicorn's 5 s keep-alive closes them on the worker."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                            keepalive_expiry=2.0))


class _Relay(StreamingResponse):
    """A streamed answer that runs `on_close` however it ends (done, failed, client gone)."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def _model_of(body: bytes) -> str | None:
    """The request's `model`; None when it names none (or is not JSON: the worker says why)."""
    try:
        parsed = json.loads(body) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) and model else None


class Relay:
    """Relays client requests to the workers of a `Registry` over one shared httpx client."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.client: httpx.AsyncClient | None = None  # made on the serving event loop

    async def forward(self, request: Request) -> Response:
        """POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize."""
        body = await request.body()
        model = _model_of(body)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        tried: set[str] = set()
        while True:
            try:
                worker = self.registry.pick(model, exclude=tried)
            except NoWorker as e:
                return no_worker_response(e)
            tried.add(worker.id)
            outgoing = self.client.build_request(
                request.method, worker.url + request.url.path, params=request.url.query,
                headers=headers, content=body)
            worker.in_flight += 1
            try:
                upstream = await unless_disconnected(request.receive,
                                                     self.client.send(outgoing, stream=True))
            except _WORKER_DOWN as e:
                worker.in_flight -= 1
                self.registry.mark_unhealthy(worker, f"no answer: {e!r}")
                continue  # the client has nothing yet: another worker takes the request
            except httpx.TransportError as e:  # e.g. a header httpx cannot send
                worker.in_flight -= 1
                return error_json(f"Cannot relay the request to {worker.url}: {e!r}", 502)
            if upstream is None:
                worker.in_flight -= 1
                return Response(status_code=499)
            return self._relay(upstream, worker)

    def _relay(self, upstream: httpx.Response, worker: Worker) -> Response:
        async def chunks():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.TransportError as e:
                self.registry.mark_unhealthy(worker, f"failed mid-answer: {e!r}")
                raise

        async def close() -> None:
            worker.in_flight -= 1
            await upstream.aclose()

        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        headers[WORKER_HEADER] = worker.id
        return _Relay(chunks(), close, status_code=upstream.status_code, headers=headers)

    # ---- answered by the Gateway itself ------------------------------------------------------
    def _card(self, name: str, workers: list[Worker]) -> dict[str, Any]:
        first = workers[0]
        return {"id": name, "object": "model", "created": int(first.registered_at),
                "owned_by": "jaxserve", "root": first.backend_args.get("model"), "parent": None,
                "max_model_len": first.max_model_len}

    def _serving(self) -> dict[str, list[Worker]]:
        by_model: dict[str, list[Worker]] = {}
        for worker in self.registry.healthy():
            for name in worker.models:
                by_model.setdefault(name, []).append(worker)
        return by_model

    async def list_models(self, request: Request) -> Response:
        """GET /v1/models: the union of the healthy workers' models."""
        cards = [self._card(name, ws) for name, ws in self._serving().items()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            workers = self.registry.candidates(name)
        except NoWorker as e:
            return no_worker_response(e)
        return JSONResponse(self._card(name, workers))
