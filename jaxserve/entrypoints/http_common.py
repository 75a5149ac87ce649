"""What both HTTP servers, a worker's (`jaxserve serve`) and the Gateway, share: OpenAI's error
JSON, reading a JSON body, noticing a client that leaves, and running under uvicorn (the port bound
early, SIGTERM a normal stop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse

T = TypeVar("T")


# ---- errors and bodies ---------------------------------------------------------------------------
def error_body(message: str, status: int, *, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error object. OpenAI calls every client-side mistake an invalid_request_error and
    tells them apart by `code` (model_not_found, invalid_api_key, ...)."""
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_json(message: str, status: int, *, param: str | None = None,
               code: str | int | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param=param, code=code), status_code=status)


class BodyError(ValueError):
    """A request body the server will not read: `status` is 400 (not JSON, too deep, lone
    surrogates) or 413 (larger than the server's limit)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Bodies above this size are parsed on a worker thread, so the event loop keeps answering.
_PARSE_INLINE_BYTES = 64 * 1024
# JSON nested deeper than this is refused (a 400 instead of a RecursionError deep in the server).
MAX_JSON_DEPTH = 128


async def read_body(request: Request, max_bytes: int | None = None) -> bytes:
    """The body, refused with a 413 `BodyError` as soon as it passes `max_bytes` (announced by
    Content-Length or counted while it arrives: an oversized body is never buffered whole)."""
    if max_bytes is not None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> BodyError:
    return BodyError(f"The request body is larger than this server's limit of {max_bytes} "
                     "bytes (--max-request-body-bytes).", 413)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """`body` as a JSON object, checked for what would break the server later: nesting deeper
    than MAX_JSON_DEPTH and strings holding lone UTF-16 surrogates (no UTF-8 exists for them).
    Raises `BodyError` (400)."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BodyError("The request body is not valid JSON.") from None
    except RecursionError:
        raise BodyError(f"The request body is nested more than {MAX_JSON_DEPTH} levels "
                        "deep.") from None
    if not isinstance(value, dict):
        raise BodyError("The request body must be a JSON object.")
    _check_json_value(value)
    return value


def _check_json_value(value: Any) -> None:
    """Depth and lone surrogates, walked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BodyError(f"The request body is nested more than {MAX_JSON_DEPTH} levels "
                            "deep.")
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_text(k)
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError("The request body holds a lone UTF-16 surrogate (such as "
                            "\\ud800) in a string; strings must be valid Unicode.") from None


async def read_json_object(request: Request, max_bytes: int | None = None) -> dict[str, Any]:
    """The body as a JSON object, checked by `parse_json_object`; `BodyError` (a ValueError:
    the client's mistake, with its status) for anything else. Large bodies parse on a thread."""
    body = await read_body(request, max_bytes)
    if len(body) <= _PARSE_INLINE_BYTES:
        return parse_json_object(body)
    return await asyncio.to_thread(parse_json_object, body)


# ---- clients that leave --------------------------------------------------------------------------
async def wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive, work: Awaitable[T]) -> T | None:
    """Await `work`; if the client goes away first, cancel it (whatever it holds, an engine
    request or a worker's connection, is let go) and return None. `receive` must be free: the
    request's body already read, and no one else waiting on it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    # NOTE: nobody is left to tell of a failure while the work unwinds.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


# ---- running under uvicorn -----------------------------------------------------------------------


def bind_socket(host: str | None, port: int) -> socket.socket:
    """Bind before the (slow) engine start, so a taken port fails at once."""
    host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


_FLUSH_S = 2.0


def graceful_server(config, on_exit: Callable[[], None] | None = None,
                    drain: Callable[[float], Awaitable[None]] | None = None):
    """A uvicorn server for which SIGTERM/SIGINT is a normal stop: it drains, then `run` returns
    (uvicorn itself re-raises the signal after draining, so the process would die of it).
    `on_exit` runs (once, without blocking the signal handler) when the signal arrives. `drain`,
    given the graceful-shutdown timeout, is awaited once no new connection is accepted and
    before uvicorn cancels what is still running: the app ends its responses properly there."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            if drain is not None:
                for server in self.servers:
                    server.close()  # no new connections while the open ones drain
                await drain(self.config.timeout_graceful_shutdown or 0)
                # What is left are responses the drain ended: time to send their last bytes.
                self.config.timeout_graceful_shutdown = _FLUSH_S
            await super().shutdown(sockets)

        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            # NOTE: uvicorn's record of signals to re-raise once shut down.
            self._captured_signals.clear()
            if first and on_exit is not None:
                on_exit()

    return Server(config)
