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


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; ValueError (the client's mistake) for anything else."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    return body


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


def graceful_server(config, on_exit: Callable[[], None] | None = None):
    """A uvicorn server for which SIGTERM/SIGINT is a normal stop: it drains, then `run` returns
    (uvicorn itself re-raises the signal after draining, so the process would die of it).
    `on_exit` runs (once, without blocking the signal handler) when the signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            # NOTE: uvicorn's record of signals to re-raise once shut down.
            self._captured_signals.clear()
            if first and on_exit is not None:
                on_exit()

    return Server(config)
