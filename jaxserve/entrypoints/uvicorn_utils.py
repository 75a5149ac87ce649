"""Running a Starlette app under uvicorn the way both servers (worker and Gateway) need it."""

from __future__ import annotations

import socket
from collections.abc import Callable


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
