"""The OpenAI routes of the Gateway: each request is relayed to a healthy worker serving its model,
the answer streamed back chunk by chunk. A worker that fails before it answered anything (connection
refused, dropped before the response began, silent past `--worker-timeout`, or no longer answering
`/health` while the request waits) is marked unhealthy at once and the request goes to another
worker: the client has received nothing yet, so it sees one answer.

The worker gets the request's body and its content headers, never the client's credentials: the
Gateway sends the worker's own API key (given at registration), if it has one. Requests the Gateway
relays carry its id; one that comes back to it (a worker URL that is the Gateway itself, through
whatever alias) is answered 508 at once, and the relaying side drops that worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
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
# The client's credentials stay at the Gateway; the worker gets its own key (see above).
_NOT_FORWARDED = _HOP | {"host", "content-length", "authorization", "cookie",
                         "x-gateway-token", "x-api-key"}
# The Gateway's server writes its own.
_NOT_RELAYED = _HOP | {"date", "server"}
WORKER_HEADER = "X-Gateway-Worker"
GATEWAY_ID_HEADER = "X-Jaxserve-Gateway"
# How a worker fails before it answered anything: refused, unreachable, dropped the connection,
# or silent for the read timeout.
_WORKER_DOWN = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteTimeout,
                httpx.PoolTimeout)


class WorkerHung(Exception):
    """The worker took the request but stopped answering even `/health`."""


def no_worker_response(e: NoWorker) -> JSONResponse:
    code = "model_not_found" if e.status == 404 else None
    return error_json(e.message, e.status, code=code, param="model" if code else None)


def new_client(read_timeout: float | None = None) -> httpx.AsyncClient:
    """The Gateway's client for its workers: `read_timeout` seconds of silence at most (before
    the first byte and between chunks), idle connections dropped before uvicorn's 5 s keep-alive
    closes them on the worker."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=read_timeout, write=30.0, pool=None),
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

    def __init__(self, registry: Registry, gateway_id: str = ""):
        self.registry = registry
        self.gateway_id = gateway_id
        self.client: httpx.AsyncClient | None = None  # made on the serving event loop

    def _headers(self, request: Request, worker: Worker) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED
                   and k.lower() != GATEWAY_ID_HEADER.lower()]
        if worker.api_key:
            headers.append(("authorization", f"Bearer {worker.api_key}"))
        if self.gateway_id:
            headers.append((GATEWAY_ID_HEADER, self.gateway_id))
        return headers

    async def forward(self, request: Request) -> Response:
        """POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize."""
        if self.gateway_id and request.headers.get(GATEWAY_ID_HEADER) == self.gateway_id:
            loop = error_json("This request came back to the Gateway that relayed it: a "
                              "worker URL points at the Gateway.", 508)
            loop.headers[GATEWAY_ID_HEADER] = self.gateway_id
            return loop
        body = await request.body()
        model = _model_of(body)
        tried: set[str] = set()
        while True:
            try:
                worker = self.registry.pick(model, exclude=tried)
            except NoWorker as e:
                return no_worker_response(e)
            tried.add(worker.id)
            outgoing = self.client.build_request(
                request.method, worker.url + request.url.path, params=request.url.query,
                headers=self._headers(request, worker), content=body)
            worker.in_flight += 1
            try:
                upstream = await unless_disconnected(request.receive,
                                                     self._first_byte(outgoing, worker))
            except (*_WORKER_DOWN, WorkerHung) as e:
                worker.in_flight -= 1
                self.registry.mark_unhealthy(worker, f"no answer: {e!r}")
                continue  # the client has nothing yet: another worker takes the request
            except httpx.TransportError as e:  # e.g. a header httpx cannot send
                worker.in_flight -= 1
                return error_json(f"Cannot relay the request to {worker.url}: "
                                  f"{type(e).__name__}", 502)
            if upstream is None:
                worker.in_flight -= 1
                return Response(status_code=499)
            if self.gateway_id and upstream.headers.get(GATEWAY_ID_HEADER) == self.gateway_id:
                worker.in_flight -= 1
                await upstream.aclose()
                self.registry.remove(worker, "its URL is this Gateway's own address")
                continue
            return self._relay(upstream, worker)

    async def _first_byte(self, outgoing: httpx.Request, worker: Worker) -> httpx.Response:
        """The worker's response headers. Every `probe_after` seconds of waiting, the worker's
        `/health` is asked (a generation may take long; a hung server answers nothing): no
        answer raises `WorkerHung`."""
        config = self.registry.config
        send = asyncio.ensure_future(self.client.send(outgoing, stream=True))
        start = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({send}, timeout=config.probe_after)
                if done:
                    return send.result()
                if not await self._answers(worker):
                    raise WorkerHung(f"no response in {time.monotonic() - start:.1f} s and no "
                                     f"answer on /health within {config.probe_timeout:g} s")
        finally:
            if not send.done():
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await send

    async def _answers(self, worker: Worker) -> bool:
        """Whether the worker's HTTP server answers at all (any status will do)."""
        try:
            reply = await self.client.get(worker.url + "/health",
                                          timeout=self.registry.config.probe_timeout)
        except httpx.HTTPError:
            return False
        return reply.status_code > 0

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

        headers = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in _NOT_RELAYED and k.lower() != GATEWAY_ID_HEADER.lower()}
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
