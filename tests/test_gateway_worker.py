"""The worker side of the Gateway protocol (docs/gateway.md) against a fake Gateway on loopback.

`GatewayClient` is driven directly with a fake load (no model): registration, heartbeats, a
Gateway restart (404), an unreachable Gateway, deregistration, log streaming and its bounds. One
end-to-end test runs `jaxserve serve -ga ... --hi 1` on a tiny model and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from jaxserve import __version__
from jaxserve.gateway import worker as worker_module
from jaxserve.gateway.worker import (EngineLoad, GatewayClient, LogQueue, advertised_url,
                                     launch_arguments)

pytest.register_assert_rewrite("server_utils")
from server_utils import REPO, SERVED_NAME, SERVER_ENGINE, free_port, serve_argv  # noqa: E402

# The fixture: server_model_dir.
pytest_plugins = ["server_utils"]

LOAD = {"running": 2, "waiting": 1, "kv_cache_usage": 0.25, "prompt_throughput": 10.0,
        "generation_throughput": 5.0}


# ---- a fake Gateway --------------------------------------------------------------------------------
class FakeGateway:
    """The worker-facing routes of a Gateway on loopback, recording every call.

    `forget()` is a Gateway restart (ids unknown: 404); `hang` makes every answer wait until
    `release` (or 10 s); `probe_health` makes registration first GET the worker's `/health`.
    """

    def __init__(self, port: int = 0, token: str | None = None, probe_health: bool = False):
        self.token, self.probe_health = token, probe_health
        self.calls: list[dict[str, Any]] = []
        self.workers: dict[str, str] = {}  # id -> url
        self.logs: dict[str, list[str]] = {}
        self.dropped: dict[str, int] = {}
        self.hang, self.release = threading.Event(), threading.Event()
        self._next = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def forget(self) -> None:
        with self._lock:
            self.workers.clear()

    def of(self, method: str, suffix: str = "") -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.calls if c["method"] == method and c["path"].endswith(suffix)]

    def answer(self, method: str, path: str, headers, body: Any) -> tuple[int, Any]:
        if self.hang.is_set():
            self.release.wait(10)
        if self.token is not None and headers.get("X-Gateway-Token") != self.token:
            return 401, {"error": {"message": "bad token", "type": "invalid_request_error"}}
        parts = path.strip("/").split("/")
        with self._lock:
            if (method, path) == ("POST", "/workers/register"):
                if self.probe_health:
                    body["health_at_registration"] = httpx.get(body["url"] + "/health").status_code
                known = [i for i, url in self.workers.items() if url == body["url"]]
                worker_id = known[0] if known else f"w{self._next}"
                self._next += not known
                self.workers[worker_id] = body["url"]
                return 200, {"id": worker_id,
                             "heartbeat_interval": body["backend_args"]["heartbeat_interval"]}
            if len(parts) < 2 or parts[1] not in self.workers:
                return 404, {"error": {"message": "unknown worker", "type": "not_found_error"}}
            worker_id = parts[1]
            if method == "DELETE":
                del self.workers[worker_id]
            elif parts[2:] == ["logs"]:
                self.logs.setdefault(worker_id, []).extend(body["lines"])
                self.dropped[worker_id] = self.dropped.get(worker_id, 0) + body["dropped"]
            return 200, {"status": "ok"}

    def _handler(self):
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                call = {"method": self.command, "path": self.path, "body": body,
                        "headers": dict(self.headers), "time": time.monotonic()}
                status, answer = gateway.answer(self.command, self.path, self.headers, body)
                call["status"] = status
                with gateway._lock:
                    gateway.calls.append(call)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the hang test)

            do_POST = do_DELETE = _serve

            def log_message(self, *args) -> None:
                pass

        return Handler


@pytest.fixture
def gateway():
    fake = FakeGateway(token="s3cret")
    yield fake
    fake.close()


def wait_for(predicate, timeout: float = 5.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def make_client(url: str, interval: float = 0.2, **kw: Any) -> GatewayClient:
    opts = dict(token="s3cret", worker_url="http://worker:8001", models=["tiny", "tiny-2"],
                backend="vllm", backend_args={"heartbeat_interval": interval, "api_key": "***"},
                device={"kind": "cpu", "count": 1}, version=__version__, max_model_len=96,
                heartbeat_interval=interval, load_fn=lambda: dict(LOAD), log_streaming=False)
    opts.update(kw)
    return GatewayClient(url, **opts)


@pytest.fixture
def clients():
    """Clients made by a test, stopped after it whatever happens."""
    made: list[GatewayClient] = []

    def make(*args: Any, **kw: Any) -> GatewayClient:
        made.append(make_client(*args, **kw))
        return made[-1]

    yield make
    for client in made:
        client.stop()


# ---- registration and heartbeats -----------------------------------------------------------------
def test_registers_when_ready_with_the_full_payload_then_heartbeats(gateway, clients):
    ready = threading.Event()
    client = clients(gateway.url, interval=0.2, ready=ready.is_set)
    client.start()
    time.sleep(0.3)
    assert gateway.calls == []  # nothing before the server answers
    ready.set()
    wait_for(lambda: len(gateway.of("POST", "/heartbeat")) >= 4, what="4 heartbeats")
    register = gateway.of("POST", "/register")
    assert len(register) == 1 and register[0]["headers"]["X-Gateway-Token"] == "s3cret"
    assert register[0]["body"] == {
        "url": "http://worker:8001", "models": ["tiny", "tiny-2"], "backend": "vllm",
        "backend_args": {"heartbeat_interval": 0.2, "api_key": "***"},
        "device": {"kind": "cpu", "count": 1}, "engine": "jaxserve", "version": __version__,
        "max_model_len": 96}
    beats = gateway.of("POST", "/heartbeat")[:4]
    assert all(b["path"] == "/workers/w0/heartbeat" and b["body"] == {"load": LOAD}
               for b in beats)
    assert all(b["headers"]["X-Gateway-Token"] == "s3cret" for b in beats)
    gaps = [b["time"] - a["time"] for a, b in zip(beats, beats[1:])]
    assert all(0.15 < g < 0.6 for g in gaps), gaps


def test_registration_carries_the_workers_own_api_key(gateway, clients, monkeypatch):
    """The Gateway sends it as the worker's bearer key; it shows nowhere (backend_args: ***)."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    clients(gateway.url, api_key="worker-key").start()
    wait_for(lambda: gateway.of("POST", "/register"), what="a registration")
    body = gateway.of("POST", "/register")[0]["body"]
    assert body["api_key"] == "worker-key" and body["backend_args"]["api_key"] == "***"
    monkeypatch.setenv("VLLM_API_KEY", "env-key")  # the server's key from its environment
    assert make_client(gateway.url).registration["api_key"] == "env-key"


def test_adopts_the_interval_the_gateway_answers(gateway, clients):
    client = clients(gateway.url, interval=5.0, backend_args={"heartbeat_interval": 0.2})
    client.start()
    wait_for(lambda: len(gateway.of("POST", "/heartbeat")) >= 2, timeout=2, what="2 heartbeats")
    assert client.interval == 0.2


def test_registers_again_at_once_after_a_404(gateway, clients):
    client = clients(gateway.url, interval=0.5)
    client.start()
    wait_for(lambda: client.worker_id == "w0", what="registration")
    gateway.forget()  # the Gateway restarted
    wait_for(lambda: client.worker_id == "w1", timeout=3, what="a second registration")
    missed = [c for c in gateway.of("POST", "/heartbeat") if c["status"] == 404][0]
    again = gateway.of("POST", "/register")[1]
    assert again["time"] - missed["time"] < 0.25  # at once, not an interval later
    wait_for(lambda: gateway.of("POST", "/workers/w1/heartbeat"), what="heartbeats as w1")


def test_unreachable_gateway_warns_once_then_registers(caplog, clients):
    caplog.set_level(logging.INFO, logger="jaxserve.gateway.worker")
    port = free_port()
    client = clients(f"http://127.0.0.1:{port}", interval=0.2)
    client.start()
    time.sleep(0.7)  # three tries or more, every 0.2 s at most
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "registration failed" in warnings[0].getMessage()
    fake = FakeGateway(port=port, token="s3cret")
    try:
        wait_for(lambda: client.worker_id is not None, timeout=3, what="registration")
        wait_for(lambda: fake.of("POST", "/heartbeat"), what="a heartbeat")
        assert [r.getMessage() for r in caplog.records].count(
            f"the gateway http://127.0.0.1:{port} answers again") == 1
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        client.stop()
        fake.close()


def test_wrong_token_is_a_failure_not_a_registration(caplog, clients):
    fake = FakeGateway(token="other")
    try:
        client = clients(fake.url, interval=0.2)
        client.start()
        wait_for(lambda: len(fake.of("POST", "/register")) >= 3, what="three tries")
        assert client.worker_id is None
        assert "HTTP 401" in caplog.text and caplog.text.count("registration failed") == 1
    finally:
        fake.close()


def test_deregisters_on_stop(gateway, clients):
    client = clients(gateway.url, interval=0.2)
    client.start()
    wait_for(lambda: client.worker_id == "w0", what="registration")
    started = time.monotonic()
    client.stop()
    assert time.monotonic() - started < 1.5
    assert [c["path"] for c in gateway.of("DELETE")] == ["/workers/w0"]
    assert gateway.workers == {}
    count = len(gateway.calls)
    time.sleep(0.4)
    assert len(gateway.calls) == count  # no heartbeats after stop


# ---- log streaming ---------------------------------------------------------------------------------
def messages(lines) -> list[str]:
    """The test's messages at the ends of formatted lines (whatever the root's format is)."""
    return [re.search(r"(line \d+|last)$", line).group(1) for line in lines]


@pytest.fixture
def app_log():
    log = logging.getLogger("test.gateway.app")
    log.setLevel(logging.INFO)
    return log


def test_log_lines_arrive_without_the_clients_own(gateway, clients, app_log):
    client = clients(gateway.url, interval=0.3, log_streaming=True, log_period=0.1)
    client.start()
    wait_for(lambda: client.worker_id == "w0", what="registration")
    httpx_log = logging.getLogger("httpx")
    level = httpx_log.level
    httpx_log.setLevel(logging.INFO)
    try:
        for i in range(5):
            app_log.info("line %d", i)
        httpx_log.info("HTTP Request: POST /workers/w0/logs")
        logging.getLogger("jaxserve.gateway.worker").warning("the client's own line")
        app_log.warning("last")
    finally:
        httpx_log.setLevel(level)
    wait_for(lambda: any("last" in line for line in gateway.logs.get("w0", [])), what="lines")
    lines = gateway.logs["w0"]
    assert messages(line for line in lines if "test.gateway.app" in line) == \
        ["line 0", "line 1", "line 2", "line 3", "line 4", "last"]
    assert not any("HTTP Request" in line or "own line" in line for line in lines)
    assert gateway.dropped["w0"] == 0


def test_a_full_queue_drops_the_oldest_and_reports_the_drops(gateway, clients, app_log):
    ready = threading.Event()
    client = clients(gateway.url, interval=0.3, log_streaming=True, log_capacity=5,
                     log_period=0.1, ready=ready.is_set)
    client.start()
    for i in range(12):
        app_log.info("line %d", i)
    assert len(client.logs) == 5
    ready.set()  # registers; the queued lines follow
    wait_for(lambda: "w0" in gateway.logs, what="the log post")
    assert messages(gateway.logs["w0"]) == [f"line {i}" for i in range(7, 12)]
    assert gateway.dropped["w0"] == 7


def test_log_queue_puts_back_what_fits():
    queue = LogQueue(capacity=3)
    for i in range(4):
        queue.emit(logging.makeLogRecord({"msg": f"m{i}"}))
    lines, dropped = queue.take(10)
    assert (lines, dropped) == (["m1", "m2", "m3"], 1)
    queue.emit(logging.makeLogRecord({"msg": "new"}))
    queue.put_back(lines, dropped)  # only two of three fit beside "new"
    assert queue.take(10) == (["m2", "m3", "new"], 2)


def test_a_log_post_404_registers_again_and_resends(gateway, clients, app_log):
    client = clients(gateway.url, interval=5.0, backend_args={"heartbeat_interval": 5.0},
                     log_streaming=True, log_period=0.1)
    client.start()
    wait_for(lambda: client.worker_id == "w0", what="registration")
    gateway.forget()
    app_log.info("after the restart")
    wait_for(lambda: "w1" in gateway.logs, timeout=3, what="lines under the new id")
    assert any(line.endswith("after the restart") for line in gateway.logs["w1"])
    assert [c["status"] for c in gateway.of("POST", "/logs")][0] == 404


def test_emit_never_blocks_when_the_gateway_hangs(gateway, clients, app_log):
    client = clients(gateway.url, interval=0.3, log_streaming=True, log_capacity=100,
                     log_period=0.05)
    client.start()
    wait_for(lambda: client.worker_id == "w0", what="registration")
    gateway.hang.set()
    app_log.info("the sender takes this one and hangs")
    time.sleep(0.2)
    started = time.monotonic()
    for i in range(1000):  # ten times what the queue holds
        app_log.info("line %d", i)
    # NOTE: had a line waited for the hung post, the lines would take its whole timeout (5 s);
    # 1,000 lines take well under a second even on a loaded two-core machine.
    assert time.monotonic() - started < worker_module._REQUEST_TIMEOUT
    assert len(client.logs) == 100
    started = time.monotonic()
    client.stop()  # the sender is stuck in a post: stop gives up on it
    assert time.monotonic() - started < 3.5
    gateway.release.set()


# ---- what the worker reports -----------------------------------------------------------------------
def test_launch_arguments_are_effective_json_and_masked(monkeypatch):
    from jaxserve.entrypoints.cli_args import parse_serve_args

    monkeypatch.delenv("HF_TOKEN", raising=False)  # restored after the test
    ns = parse_serve_args(["m", "--api-key", "k", "--gateway-token", "t", "--hf-token", "h",
                           "--context-length", "2048", "--served-model-name", "a", "b",
                           "-ga", "http://gw:9000", "--hi", "5", "--cuda-graph-max-bs", "4"])
    args = launch_arguments(ns)
    assert json.loads(json.dumps(args)) == args
    assert (args["api_key"], args["gateway_token"], args["hf_token"]) == ("***",) * 3
    assert args["max_model_len"] == 2048 and args["cuda_graph_max_bs"] == 4
    assert args["served_model_name"] == ["a", "b"] and args["model"] == "m"
    assert args["compile_sizes"] == [1, 2, 4] and args["gateway_address"] == "http://gw:9000"
    assert args["heartbeat_interval"] == 5.0 and args["backend"] == "vllm"
    assert "engine_args" not in args and "model_tag" not in args


def test_advertised_url():
    host = socket.gethostname()
    assert advertised_url(None, 8001) == f"http://{host}:8001"
    assert advertised_url("0.0.0.0", 8001, scheme="https") == f"https://{host}:8001"
    assert advertised_url("127.0.0.1", 8001) == "http://127.0.0.1:8001"
    assert advertised_url("::1", 8001) == "http://[::1]:8001"
    assert advertised_url("0.0.0.0", 1, worker_url="http://w.example:80/") == \
        "http://w.example:80"


def test_engine_load_reads_queues_usage_and_token_rates():
    from jaxserve.metrics import Metrics

    metrics = Metrics("tiny")
    engine = SimpleNamespace(num_running=3, num_waiting=2, kv_cache_usage=0.5, metrics=metrics)
    load = EngineLoad(engine, "tiny")
    metrics.prompt_tokens.inc(100)
    metrics.generation_tokens.inc(40)
    time.sleep(0.1)
    first = load()
    assert (first["running"], first["waiting"], first["kv_cache_usage"]) == (3, 2, 0.5)
    assert 100 / 0.5 < first["prompt_throughput"] <= 100 / 0.1
    assert first["generation_throughput"] == pytest.approx(first["prompt_throughput"] * 0.4)
    assert load()["prompt_throughput"] == 0.0  # nothing new since
    engine.metrics = None
    assert load()["generation_throughput"] == 0.0


# ---- end to end ------------------------------------------------------------------------------------
def test_jaxserve_serve_registers_heartbeats_streams_and_deregisters(server_model_dir, tmp_path):
    fake = FakeGateway(probe_health=True)
    port = free_port()
    worker_url = f"http://127.0.0.1:{port}"
    argv = serve_argv(server_model_dir, host="127.0.0.1", port=port,
                      served_model_name=[SERVED_NAME], **SERVER_ENGINE)
    argv += ["-ga", fake.url, "--hi", "1"]
    env = dict(os.environ, JAXSERVE_GATEWAY_TOKEN="")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: fake.of("POST", "/register") or proc.poll() is not None, timeout=180,
                 what="registration")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        body = fake.of("POST", "/register")[0]["body"]
        assert body["health_at_registration"] == 200  # registered once the server answers
        assert (body["url"], body["models"], body["backend"]) == \
            (worker_url, [SERVED_NAME], "vllm")
        assert (body["device"]["kind"], body["version"], body["max_model_len"]) == \
            ("cpu", __version__, 96)
        args = body["backend_args"]
        assert (args["max_model_len"], args["block_size"], args["heartbeat_interval"]) == \
            (96, 4, 1.0)
        assert args["gateway_address"] == fake.url and args["log_streaming"] is True
        r = httpx.post(worker_url + "/v1/completions", timeout=60, json={
            "model": SERVED_NAME, "prompt": "Hello there", "max_tokens": 8})
        assert r.status_code == 200, r.text

        def busy_heartbeat() -> bool:
            return any(b["body"]["load"]["generation_throughput"] > 0
                       for b in fake.of("POST", "/heartbeat"))
        wait_for(busy_heartbeat, timeout=5, what="a heartbeat after the request")
        beat = fake.of("POST", "/heartbeat")[0]
        assert beat["path"] == "/workers/w0/heartbeat"
        assert set(beat["body"]["load"]) == set(LOAD)
        wait_for(lambda: any("POST /v1/completions" in line for line in fake.logs.get("w0", [])),
                 what="the access log line")
        # Lines written while the model loaded and compiled, before registration, arrive too.
        assert any("engine ready" in line for line in fake.logs["w0"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        assert [c["path"] for c in fake.of("DELETE")] == ["/workers/w0"]
        assert "registered with the gateway" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        fake.close()
