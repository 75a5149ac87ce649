"""`jaxserve gateway`: the Starlette app that workers register with (docs/gateway.md) and clients
send OpenAI requests to, and the uvicorn server that runs it.

Routes: the worker protocol (`/workers/register`, `/workers/{id}/heartbeat`, `DELETE /workers/{id}`,
`/workers/{id}/logs`), monitoring (`GET /workers`, `GET /workers/{id}/logs`, the status page `/`),
all behind the registration token; `/health`, open; and the OpenAI routes relayed to workers
(`proxy.py`), behind the API key. A background task marks silent workers unhealthy, then drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxserve.entrypoints.http_common import bind_socket, error_json, graceful_server
from jaxserve.gateway.proxy import GATEWAY_ID_HEADER, Relay, new_client
from jaxserve.gateway.registry import GatewayConfig, Registry, Worker, small_object
from jaxserve.gateway.status_page import STATUS_PAGE

logger = logging.getLogger("jaxserve.gateway")

Handler = Callable[[Request], Awaitable[Response]]
_KEEPALIVE_S = 15.0  # an SSE comment this often, so a follower that left is noticed
_MAX_BODY = 1 << 20  # bytes of a worker-protocol request (registration, heartbeat)
_MAX_LOG_BODY = 16 << 20  # bytes of a log post (a batch of lines)


class _Refused(Exception):
    """A request the Gateway answers with an error instead of running the route."""

    def __init__(self, response: Response):
        self.response = response


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _guard(check: Callable[[Request], None], handler: Handler) -> Handler:
    async def route(request: Request) -> Response:
        try:
            check(request)
            return await handler(request)
        except _Refused as e:
            return e.response
    return route


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _json_object(request: Request, max_bytes: int = _MAX_BODY) -> dict[str, Any]:
    """The body as a JSON object of at most `max_bytes` (else 413), NaN and Infinity refused."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _Refused(error_json(f"The body is over {max_bytes} bytes.", 413))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _Refused(error_json(f"The body is over {max_bytes} bytes.", 413))
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _Refused(error_json(f"The body is not valid JSON: {str(e)[:200]}", 400)) from None
    if not isinstance(value, dict):
        raise _Refused(error_json("The body must be a JSON object.", 400))
    return value


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_this_server(url: str, server: tuple[str, int] | None) -> bool:
    """Whether `url` names the address this request reached (a worker URL pointing back at the
    Gateway): the same port on a loopback, unspecified or own address or name."""
    from urllib.parse import urlsplit

    if server is None:
        return False
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if port != server[1]:
        return False
    own = {str(server[0]).lower(), socket.gethostname().lower(), socket.getfqdn().lower()}
    if host in own or host in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _log_follow(registry: Registry, worker: Worker) -> Response:
    """The worker's kept lines, then each new one, as SSE events whose data is a JSON string."""
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=registry.config.log_lines)
    for line in worker.logs:
        queue.put_nowait(line)
    worker.followers.add(queue)

    async def events() -> AsyncIterator[str]:
        while True:
            try:
                line = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if line is None:  # the worker was removed
                return
            yield f"data: {json.dumps(line)}\n\n"

    class Follow(StreamingResponse):
        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                worker.followers.discard(queue)

    return Follow(events(), media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache"})


def build_app(config: GatewayConfig) -> Starlette:
    """The Gateway's Starlette app; `app.state.registry` holds its workers."""
    registry = Registry(config)
    gateway_id = uuid.uuid4().hex  # tells this Gateway's own answers apart from a worker's
    relay = Relay(registry, gateway_id)

    def check_token(request: Request) -> None:
        if config.gateway_token is None:
            return
        given = request.headers.get("x-gateway-token") or request.query_params.get("token")
        if not _same(given, config.gateway_token):
            raise _Refused(error_json("Invalid or missing gateway token (X-Gateway-Token).",
                                          401, code="invalid_gateway_token"))

    def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        if not _same(request.headers.get("authorization"), f"Bearer {config.api_key}"):
            raise _Refused(error_json("Invalid or missing API key.", 401,
                                          code="invalid_api_key"))

    def known(request: Request) -> Worker:
        worker = registry.workers.get(request.path_params["id"])
        if worker is None:
            raise _Refused(error_json(
                f"No worker {request.path_params['id']!r}: register again.", 404,
                code="worker_not_found"))
        return worker

    # ---- the worker protocol -----------------------------------------------------------------
    async def register(request: Request) -> Response:
        body = await _json_object(request)
        url = body.get("url")
        if isinstance(url, str) and _is_this_server(url, request.scope.get("server")):
            return error_json(f"url={url!r} is this Gateway's own address: give the worker's "
                              "(--worker-url)", 400, param="url")
        try:
            worker = registry.register(body)
        except ValueError as e:
            return error_json(str(e), 400)
        return JSONResponse({"id": worker.id, "heartbeat_interval": worker.heartbeat_interval})

    async def heartbeat(request: Request) -> Response:
        worker = known(request)
        try:
            load = small_object((await _json_object(request)).get("load"), "load")
        except ValueError as e:
            return error_json(str(e), 400, param="load")
        registry.heartbeat(worker, load)
        return JSONResponse({"status": "ok"})

    async def deregister(request: Request) -> Response:
        registry.remove(known(request), "deregistered")
        return JSONResponse({"status": "ok"})

    async def post_logs(request: Request) -> Response:
        worker = known(request)
        body = await _json_object(request, _MAX_LOG_BODY)
        lines, dropped = body.get("lines") or [], body.get("dropped") or 0
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            return error_json("lines must be a list of strings", 400, param="lines")
        if not isinstance(dropped, int) or isinstance(dropped, bool) or dropped < 0:
            return error_json("dropped must be a count", 400, param="dropped")
        registry.add_logs(worker, lines, dropped)
        return JSONResponse({"status": "ok"})

    # ---- monitoring --------------------------------------------------------------------------
    async def list_workers(request: Request) -> Response:
        return JSONResponse([w.to_json() for w in registry.workers.values()])

    async def get_logs(request: Request) -> Response:
        worker = known(request)
        if request.query_params.get("follow", "").lower() in ("1", "true", "yes"):
            return _log_follow(registry, worker)
        return JSONResponse({"lines": list(worker.logs),
                             "dropped_log_lines": worker.dropped_log_lines})

    async def status_page(request: Request) -> Response:
        return HTMLResponse(STATUS_PAGE)

    async def health(request: Request) -> Response:
        return Response(status_code=200, headers={GATEWAY_ID_HEADER: gateway_id})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        relay.client = new_client(config.worker_timeout)

        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(registry.sweep_period())
                registry.sweep()

        sweeper = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await relay.client.aclose()

    def worker_route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _guard(check_token, handler), methods=[method])

    def client_route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _guard(check_api_key, handler), methods=[method])

    routes = [
        worker_route("/workers/register", register, "POST"),
        worker_route("/workers/{id}/heartbeat", heartbeat, "POST"),
        worker_route("/workers/{id}", deregister, "DELETE"),
        worker_route("/workers/{id}/logs", post_logs, "POST"),
        worker_route("/workers", list_workers, "GET"),
        worker_route("/workers/{id}/logs", get_logs, "GET"),
        worker_route("/", status_page, "GET"),
        Route("/health", health, methods=["GET"]),
        client_route("/v1/chat/completions", relay.forward, "POST"),
        client_route("/v1/completions", relay.forward, "POST"),
        client_route("/tokenize", relay.forward, "POST"),
        client_route("/detokenize", relay.forward, "POST"),
        client_route("/v1/models", relay.list_models, "GET"),
        client_route("/v1/models/{model:path}", relay.get_model, "GET"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_json(f"No route {request.method} {request.url.path}.", 404)

    async def wrong_method(request: Request, exc: Exception) -> Response:
        return error_json(f"{request.method} is not allowed on {request.url.path}.", 405)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: wrong_method})
    app.state.registry = registry
    return app


# ---- running it ------------------------------------------------------------------------------
_SECRET_IN_QUERY = re.compile(r"((?:^|[?&])(?:token|api_key|key)=)[^&\s]*", re.IGNORECASE)


class RedactTokens(logging.Filter):
    """Access-log lines show `?token=***`: the status page passes its token in the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any("=" in str(a) for a in record.args):
            record.args = tuple(_SECRET_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def warn_if_open(config: GatewayConfig) -> None:
    """Say loudly, at start-up, what a Gateway without a registration token lets anyone do."""
    if config.gateway_token is None:
        logger.warning("REGISTRATION IS OPEN: no --gateway-token (or JAXSERVE_GATEWAY_TOKEN), "
                       "so anyone who reaches this port can register a worker (and receive the "
                       "requests routed to it), remove workers and read their logs and launch "
                       "arguments; give --gateway-token to close it")


def run_gateway(config: GatewayConfig, *, host: str | None = None, port: int = 9000,
                uvicorn_log_level: str = "info") -> int:
    """Serve the Gateway until SIGTERM or SIGINT; returns 0."""
    import uvicorn

    sock = bind_socket(host, port)
    app = build_app(config)
    shown = "localhost" if (host or "0.0.0.0") in ("0.0.0.0", "::") else host
    logger.info("gateway on http://%s:%d (%s; status page at /)", shown,
                sock.getsockname()[1], config.load_balance_method)
    warn_if_open(config)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())
    server = graceful_server(uvicorn.Config(app, log_level=uvicorn_log_level, lifespan="on",
                                            timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
