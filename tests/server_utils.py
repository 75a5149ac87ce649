"""Helpers and fixtures for the HTTP server tests: a tiny model folder that text prompts work with,
`jaxserve serve` in a subprocess, and in-process apps (one shared engine, different frontend
flags) served by uvicorn on a background thread.

A test module loads the fixtures with `pytest_plugins = ["server_utils"]`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from typing import Any

import httpx
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Engine shapes small enough to compile in seconds on two CPU cores.
SERVER_ENGINE = dict(max_model_len=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                     seed=0)
SERVED_NAME = "tiny-llama"


# ---- the model -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory, default_tokenizer) -> str:
    """A tiny random Llama with the default model's whole tokenizer (so text prompts work)."""
    from tiny_models import tiny_hf_model

    tok = default_tokenizer
    folder = tmp_path_factory.mktemp("server-llama")
    model = tiny_hf_model("LlamaForCausalLM", vocab_size=len(tok),
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id or 0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ---- a subprocess server -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(model: str, **opts: Any) -> list[str]:
    """`jaxserve serve model` with these options, given by their vLLM dest names."""
    argv = [sys.executable, "-m", "jaxserve.cli", "serve", model]
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


class ServerProcess:
    """`jaxserve serve` on a loopback port; its output goes to `log_path`."""

    def __init__(self, model: str, log_path: str, extra_argv: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, **opts: Any):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = serve_argv(model, host="127.0.0.1", port=self.port, **opts) + list(extra_argv)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)

    def log(self, tail: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        return stop_process(self.proc, self._log, timeout=30)


def stop_process(proc: subprocess.Popen, log, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` s; closes its log file; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()
    return proc.returncode


# ---- in-process servers --------------------------------------------------------------------------
class AppServer:
    """`build_app(ns, engine)` served by uvicorn on a background thread, on a free port."""

    def __init__(self, ns: Namespace, engine):
        import uvicorn

        from jaxserve.entrypoints.openai.api_server import build_app, uvicorn_config

        self.ns = ns
        self.app = build_app(ns, engine)
        ns.uvicorn_log_level = getattr(ns, "uvicorn_log_level", None) or "warning"
        self.server = uvicorn.Server(uvicorn_config(ns, self.app))
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        scheme = "https" if getattr(ns, "ssl_certfile", None) else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> AppServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture(scope="session")
def inprocess_engine(server_model_dir):
    """One AsyncLLMEngine in the test process, shared by every in-process app."""
    from jaxserve.engine.args import EngineArgs
    from jaxserve.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=server_model_dir, disable_log_stats=True, **SERVER_ENGINE))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def serve_app(inprocess_engine):
    """Returns start(**frontend_flags) -> AppServer context manager over the shared engine."""
    from jaxserve.engine.args import EngineArgs

    def start(**flags: Any) -> AppServer:
        ns = Namespace(engine_args=EngineArgs(), **flags)
        return AppServer(ns, inprocess_engine)

    return start


# ---- reading responses ---------------------------------------------------------------------------
def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent-events body, in order, `[DONE]` included."""
    events = []
    for block in response.text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        events.append(block[len("data: "):])
    return events


def sse_chunks(response: httpx.Response) -> list[dict]:
    """The JSON chunks of a stream, after checking that it ends with exactly one `[DONE]`."""
    events = sse_events(response)
    assert events and events[-1] == "[DONE]", events[-3:]
    assert events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$')


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels`; 0 for a declared
    metric with no such samples yet (a labelled counter before its first increment)."""
    declared = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert any(name.startswith(d) for d in declared), f"metric {name} not in /metrics"
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# ---- middleware for `--middleware` (imported by path: server_utils.NAME) -------------------------
class TagMiddleware:
    """An ASGI middleware class: tags every response with X-Tag-Class."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-tag-class", b"1")]
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


async def tag_function(request, call_next):
    """FastAPI's HTTP-middleware form: tags every response with X-Tag-Function."""
    response = await call_next(request)
    response.headers["X-Tag-Function"] = "1"
    return response
