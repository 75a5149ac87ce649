"""The Gateway (`jaxserve gateway`, docs/gateway.md) on loopback.

Three layers: the Gateway app with fake workers (tiny Starlette apps on background threads,
registered and heartbeated by the test through the HTTP API); the status page in headless
Chromium; and end to end, a `jaxserve gateway` process with two real `jaxserve serve -ga` workers
on a tiny model (issue 7's "What it must show").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

pytest.register_assert_rewrite("server_utils")
from server_utils import (REPO, SERVED_NAME, SERVER_ENGINE, ServerProcess,  # noqa: E402
                          free_port, sse_chunks, stop_process)

from jaxserve.gateway.app import build_app  # noqa: E402
from jaxserve.gateway.registry import GatewayConfig  # noqa: E402

# The fixtures: server_model_dir (a tiny Llama with the default model's tokenizer).
pytest_plugins = ["server_utils"]

TOKEN = "s3cret"
AUTH = {"X-Gateway-Token": TOKEN}


# ---- serving an app on a loopback thread -----------------------------------------------------------
class Served:
    """An ASGI app served by uvicorn on a background thread, on `port` (a free one if None)."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.app = app
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port or 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto",
                                                    timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> Served:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


class FakeWorker:
    """Answers like a worker: chat completions (streamed in two events, the second held until
    `release` is set), completions, /tokenize and /v1/models; counts the requests it got."""

    def __init__(self, name: str):
        self.name = name
        self.hits: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.streams_ended = 0  # streams finished or abandoned by the Gateway
        self.release = threading.Event()
        self.release.set()
        self.served = Served(Starlette(routes=[
            Route("/v1/chat/completions", self._answer, methods=["POST"]),
            Route("/v1/completions", self._answer, methods=["POST"]),
            Route("/tokenize", self._answer, methods=["POST"]),
        ]))
        self.url = self.served.url

    async def _answer(self, request: Request) -> Response:
        body = await request.json()
        self.hits.append(request.url.path)
        self.headers.append(dict(request.headers))
        if body.get("fail"):  # a worker-side error passes through untouched
            return JSONResponse({"error": {"message": "bad", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        if not body.get("stream"):
            return JSONResponse({"worker": self.name, "path": request.url.path,
                                 "model": body.get("model"), "query": request.url.query})

        async def events():
            try:
                yield f"data: {json.dumps({'worker': self.name, 'n': 1})}\n\n"
                while not self.release.is_set():
                    await asyncio.sleep(0.005)
                yield f"data: {json.dumps({'worker': self.name, 'n': 2})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.streams_ended += 1

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fakes():
    workers = [FakeWorker("a"), FakeWorker("b")]
    for w in workers:
        w.served.__enter__()
    yield workers
    for w in workers:
        w.served.__exit__()


@pytest.fixture
def fake_a(fakes):
    fakes[0].hits.clear()
    return fakes[0]


@pytest.fixture
def fake_b(fakes):
    fakes[1].hits.clear()
    return fakes[1]


@pytest.fixture
def gateway():
    """Returns start(**GatewayConfig fields) -> an httpx client of a fresh Gateway."""
    started = []

    def start(**config: Any) -> httpx.Client:
        served = Served(build_app(GatewayConfig(**{"gateway_token": TOKEN, **config})))
        served.__enter__()
        client = httpx.Client(base_url=served.url, timeout=10)
        started.append((served, client))
        return client

    yield start
    for served, client in started:
        client.close()
        served.__exit__()


def register(gw: httpx.Client, url: str, models=("m",), **fields: Any) -> str:
    body = {"url": url, "models": list(models), "backend": "vllm",
            "backend_args": {"model": "/models/m"}, "device": {"kind": "cpu", "count": 1},
            "version": "0.1.0", "max_model_len": 96, **fields}
    r = gw.post("/workers/register", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def workers(gw: httpx.Client) -> dict[str, dict]:
    r = gw.get("/workers", headers=AUTH)
    assert r.status_code == 200, r.text
    return {w["id"]: w for w in r.json()}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def chat(gw: httpx.Client, model: str | None = "m", **body: Any) -> httpx.Response:
    return gw.post("/v1/chat/completions", json={"model": model, "messages": [], **body})


# ---- registration, heartbeats, auth -----------------------------------------------------------------
def test_register_and_list(gateway):
    gw = gateway()
    args = {"model": "/models/m", "max_model_len": 96, "api_key": "***", "heartbeat_interval": 7}
    wid = register(gw, "http://10.0.0.1:8001/", backend="sglang", backend_args=args)
    listed = workers(gw)[wid]
    assert listed["url"] == "http://10.0.0.1:8001"
    assert listed["status"] == "healthy" and listed["models"] == ["m"]
    assert listed["backend"] == "sglang" and listed["backend_args"] == args
    assert listed["device"] == {"kind": "cpu", "count": 1} and listed["version"] == "0.1.0"
    assert listed["load"] == {} and listed["dropped_log_lines"] == 0
    assert abs(listed["last_heartbeat"] - time.time()) < 5
    assert listed["registered_at"] == listed["last_heartbeat"]
    # The answer's interval is the worker's own, from its launch arguments.
    again = gw.post("/workers/register", headers=AUTH, json={
        "url": "http://10.0.0.1:8001", "models": ["m", "n"], "backend_args": args})
    assert again.json() == {"id": wid, "heartbeat_interval": 7}
    assert workers(gw)[wid]["models"] == ["m", "n"] and len(workers(gw)) == 1
    other = register(gw, "http://10.0.0.2:8001")
    assert other != wid and list(workers(gw)) == [wid, other]

    for bad in ({"models": ["m"]}, {"url": "10.0.0.3:80", "models": ["m"]},
                {"url": "http://10.0.0.3:80", "models": "m"},
                {"url": "http://10.0.0.3:80", "models": ["m"], "backend_args": [1]},
                {"url": "http://10.0.0.3:80", "models": ["m"], "heartbeat_interval": 0}):
        assert_error(gw.post("/workers/register", json=bad, headers=AUTH), 400)
    assert_error(gw.post("/workers/register", content=b"{", headers=AUTH), 400)
    assert len(workers(gw)) == 2


def test_heartbeat_deregister_and_unknown_ids(gateway):
    gw = gateway()
    wid = register(gw, "http://10.0.0.1:8001")
    before = workers(gw)[wid]["last_heartbeat"]
    time.sleep(0.01)
    load = {"running": 2, "waiting": 1, "kv_cache_usage": 0.25, "prompt_throughput": 10.0,
            "generation_throughput": 5.0}
    r = gw.post(f"/workers/{wid}/heartbeat", json={"load": load}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert workers(gw)[wid]["load"] == load and workers(gw)[wid]["last_heartbeat"] > before

    for method, path in (("POST", "/workers/nope/heartbeat"), ("DELETE", "/workers/nope"),
                         ("POST", "/workers/nope/logs"), ("GET", "/workers/nope/logs")):
        body = {"load": {}, "lines": []} if method == "POST" else None
        assert_error(gw.request(method, path, json=body, headers=AUTH), 404, "worker_not_found")

    assert gw.delete(f"/workers/{wid}", headers=AUTH).status_code == 200
    assert workers(gw) == {}
    # A Gateway that restarted answers a heartbeat with 404: the worker must register again.
    assert_error(gw.post(f"/workers/{wid}/heartbeat", json={"load": {}}, headers=AUTH), 404)


def test_tokens_and_api_key(gateway, fake_a):
    gw = gateway(api_key="k3y")
    wid = register(gw, fake_a.url)
    guarded = [("POST", "/workers/register", {"url": "http://10.0.0.9:1", "models": ["m"]}),
               ("POST", f"/workers/{wid}/heartbeat", {"load": {}}),
               ("POST", f"/workers/{wid}/logs", {"lines": ["x"]}),
               ("GET", "/workers", None), ("GET", f"/workers/{wid}/logs", None),
               ("GET", "/", None), ("DELETE", f"/workers/{wid}", None)]
    for method, path, body in guarded:
        for headers, params in (({}, {}), ({"X-Gateway-Token": "wrong"}, {}),
                                ({}, {"token": "wrong"}),
                                ({"Authorization": "Bearer k3y"}, {})):  # the API key is no token
            r = gw.request(method, path, json=body, headers=headers, params=params)
            assert_error(r, 401, "invalid_gateway_token")
    assert gw.get("/workers", params={"token": TOKEN}).status_code == 200
    page = gw.get("/", params={"token": TOKEN})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert gw.get("/health").status_code == 200  # open

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}, AUTH):
        assert_error(gw.post("/v1/chat/completions", json={"model": "m"}, headers=headers),
                     401, "invalid_api_key")
        assert_error(gw.get("/v1/models", headers=headers), 401, "invalid_api_key")
    assert fake_a.hits == []
    r = gw.post("/v1/chat/completions", json={"model": "m"}, headers={"Authorization":
                                                                      "Bearer k3y"})
    assert r.status_code == 200 and r.json()["worker"] == "a"
    assert "authorization" not in fake_a.headers[-1]  # the client's key stays at the Gateway
    assert gw.delete(f"/workers/{wid}", headers=AUTH).status_code == 200


def test_workers_get_their_own_key_never_the_clients_credentials(gateway, fake_a):
    gw = gateway(api_key="client-key")
    register(gw, fake_a.url, api_key="worker-key")
    client_headers = {"Authorization": "Bearer client-key", "Cookie": "session=1",
                      "X-Gateway-Token": TOKEN, "X-Trace": "t1"}
    r = gw.post("/v1/chat/completions", json={"model": "m", "messages": []},
                headers=client_headers)
    assert r.status_code == 200, r.text
    seen = fake_a.headers[-1]
    assert seen["authorization"] == "Bearer worker-key"
    assert "cookie" not in seen and "x-gateway-token" not in seen
    assert seen["x-trace"] == "t1"  # other headers pass
    listed = workers(gw)
    assert all("api_key" not in w and "worker-key" not in json.dumps(w) for w in listed.values())


# ---- a Gateway that does not trust its workers blindly ----------------------------------------
@pytest.fixture
def hung_url():
    """A port that accepts connections (and reads what is sent) but never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=hold, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_hung_worker_is_detected_and_the_request_goes_elsewhere(gateway, fake_a, hung_url,
                                                                  stream):
    gw = gateway(probe_after=0.2, probe_timeout=0.3)
    hung = register(gw, hung_url)  # first in round-robin order
    live = register(gw, fake_a.url)
    r = chat(gw, stream=stream)  # the client's own timeout (10 s) would fail a hang
    assert r.status_code == 200 and r.headers["x-gateway-worker"] == live
    assert workers(gw)[hung]["status"] == "unhealthy"
    assert gw.get("/health", timeout=2).status_code == 200
    # Alone, it fails the request with a 503 instead of holding it.
    gw.delete(f"/workers/{live}", headers=AUTH)
    gw.post(f"/workers/{hung}/heartbeat", json={"load": {}}, headers=AUTH)
    assert_error(chat(gw, stream=stream), 503)


def test_a_worker_silent_past_the_worker_timeout_is_left(gateway, fake_a, hung_url):
    # The probe would wait 60 s: the read timeout ends the wait first.
    gw = gateway(worker_timeout=0.5, probe_after=60)
    hung = register(gw, hung_url)
    live = register(gw, fake_a.url)
    r = chat(gw)
    assert r.status_code == 200 and r.headers["x-gateway-worker"] == live
    assert workers(gw)[hung]["status"] == "unhealthy"


def test_a_slow_worker_that_answers_health_is_waited_for(gateway):
    """A long generation is not a hang: while /health answers, the request waits."""
    async def slow(request: Request) -> Response:
        await asyncio.sleep(1.0)
        return JSONResponse({"worker": "slow"})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    app = Starlette(routes=[Route("/v1/chat/completions", slow, methods=["POST"]),
                            Route("/health", health)])
    with Served(app) as slow_worker:
        gw = gateway(probe_after=0.1, probe_timeout=0.5)
        wid = register(gw, slow_worker.url)
        r = chat(gw)
        assert r.status_code == 200 and r.json() == {"worker": "slow"}
        assert workers(gw)[wid]["status"] == "healthy"


class _Forwarder:
    """A TCP port that forwards every connection to `target_port` (another name for it)."""

    def __init__(self, target_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.target_port = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_a_worker_url_pointing_at_the_gateway(gateway, fake_a):
    gw = gateway()
    port = int(str(gw.base_url).rstrip("/").rsplit(":", 1)[1])
    for url in (str(gw.base_url), f"http://localhost:{port}", f"http://127.0.0.1:{port}/"):
        r = gw.post("/workers/register", json={"url": url, "models": ["m"]}, headers=AUTH)
        assert_error(r, 400)
        assert "Gateway" in r.json()["error"]["message"]
    # Through another name the registration cannot tell: the first relayed request comes back,
    # is answered 508 at once, and the Gateway drops that worker and goes on to a real one.
    alias = _Forwarder(port)
    try:
        loop = register(gw, alias.url)
        live = register(gw, fake_a.url)
        r = chat(gw)
        assert r.status_code == 200 and r.headers["x-gateway-worker"] == live
        assert loop not in workers(gw) and live in workers(gw)
        loop = register(gw, alias.url)  # alone: dropped, so no worker serves the model
        gw.delete(f"/workers/{live}", headers=AUTH)
        assert_error(chat(gw), 404, "model_not_found")
        assert loop not in workers(gw)
    finally:
        alias.close()


def _post_raw(gw: httpx.Client, path: str, text: str) -> httpx.Response:
    return gw.post(path, content=text.encode(), headers={**AUTH,
                                                         "Content-Type": "application/json"})


def test_registration_fields_are_checked_and_bounded(gateway, fake_a):
    gw = gateway()
    good = register(gw, fake_a.url)
    base = '{"url": "http://10.0.0.7:8000", "models": ["m"]'
    for extra in (', "heartbeat_interval": NaN', ', "heartbeat_interval": Infinity',
                  ', "heartbeat_interval": -Infinity', ', "heartbeat_interval": 0',
                  ', "heartbeat_interval": 1e300', ', "backend_args": {"x": NaN}',
                  ', "backend_args": {"heartbeat_interval": NaN}', ', "device": {"n": Infinity}',
                  ', "max_model_len": 1.5', ', "version": ' + json.dumps("v" * 100)):
        assert_error(_post_raw(gw, "/workers/register", base + extra + "}"), 400)
    for models in ([], ["m"] * 65, ["x" * 600], [1]):
        r = gw.post("/workers/register", json={"url": "http://10.0.0.7:8000", "models": models},
                    headers=AUTH)
        assert_error(r, 400)
    # 11 MB of launch arguments: refused by size before parsing; many small ones: by JSON size.
    huge = {"url": "http://10.0.0.7:8000", "models": ["m"],
            "backend_args": {"x": "a" * 11_000_000}}
    assert_error(gw.post("/workers/register", json=huge, headers=AUTH), 413)
    many = {f"k{i}": "v" * 1000 for i in range(100)}
    assert_error(gw.post("/workers/register", headers=AUTH, json={
        "url": "http://10.0.0.7:8000", "models": ["m"], "backend_args": many}), 400)
    # One long argument (an inline chat template) is kept, cut.
    wid = register(gw, "http://10.0.0.8:8000", backend_args={"chat_template": "t" * 100_000})
    kept = workers(gw)[wid]["backend_args"]["chat_template"]
    assert kept.startswith("t" * 4096) and len(kept) < 4200 and "more characters" in kept
    # A heartbeat's load is checked the same way.
    assert_error(_post_raw(gw, f"/workers/{good}/heartbeat", '{"load": {"running": NaN}}'), 400)
    assert_error(gw.post(f"/workers/{good}/heartbeat", json={"load": {"x": "y" * 5000}},
                         headers=AUTH), 400)
    # Nothing of that touched the listing, the status page or the good worker.
    assert gw.get("/", headers=AUTH).status_code == 200
    listed = workers(gw)
    assert set(listed) == {good, wid} and listed[good]["status"] == "healthy"
    assert chat(gw).status_code == 200


def test_log_lines_are_bounded_in_bytes(gateway):
    gw = gateway(log_lines=3)
    wid = register(gw, "http://10.0.0.1:8001")
    line = "x" * 50_000
    r = gw.post(f"/workers/{wid}/logs", json={"lines": ["a", line]}, headers=AUTH)
    assert r.status_code == 200
    kept = gw.get(f"/workers/{wid}/logs", headers=AUTH).json()["lines"]
    assert kept[0] == "a" and kept[1].startswith("x" * 4096) and len(kept[1]) < 4200
    many = [f"line {i}" for i in range(1000)]  # one post of more lines than are kept
    assert gw.post(f"/workers/{wid}/logs", json={"lines": many}, headers=AUTH).status_code == 200
    assert gw.get(f"/workers/{wid}/logs", headers=AUTH).json()["lines"] == many[-3:]
    r = gw.post(f"/workers/{wid}/logs", content=b'{"lines": ["' + b"y" * (17 << 20) + b'"]}',
                headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 413)


def test_relayed_answers_have_one_date_and_one_server_header(gateway, fake_a):
    gw = gateway()
    register(gw, fake_a.url)
    for stream in (False, True):
        r = chat(gw, stream=stream)
        assert r.status_code == 200
        assert len(r.headers.get_list("date")) == 1, r.headers
        assert len(r.headers.get_list("server")) == 1, r.headers


def test_open_registration_is_announced_and_tokens_stay_out_of_access_logs(tmp_path):
    log_path = tmp_path / "gateway.log"
    gateway = GatewayProcess(str(log_path), token=None)
    try:
        assert httpx.get(gateway.url + "/workers", params={"token": "hunter2"}).status_code == 200
        assert httpx.get(gateway.url + "/?token=hunter2&x=1").status_code == 200
    finally:
        assert gateway.stop() == 0
    log = log_path.read_text()
    assert "REGISTRATION IS OPEN" in log and "--gateway-token" in log
    assert "hunter2" not in log
    assert "/workers?token=*** HTTP" in log  # the line is there, the token is not
    assert "ERROR" not in log and "Traceback" not in log


def test_gateway_config_checks():
    with pytest.raises(ValueError, match="load_balance_method"):
        GatewayConfig(load_balance_method="random")
    with pytest.raises(ValueError, match="unhealthy_after"):
        GatewayConfig(unhealthy_after=5, remove_after=2)
    with pytest.raises(ValueError, match="log_lines"):
        GatewayConfig(log_lines=0)


# ---- routing ----------------------------------------------------------------------------------------
def test_round_robin_spreads_and_relays(gateway, fake_a, fake_b):
    gw = gateway()
    ids = {register(gw, fake_a.url): "a", register(gw, fake_b.url): "b"}
    answers = [chat(gw) for _ in range(6)]
    assert all(r.status_code == 200 for r in answers)
    served = [r.json()["worker"] for r in answers]
    assert served in (["a", "b"] * 3, ["b", "a"] * 3), served
    assert [ids[r.headers["x-gateway-worker"]] for r in answers] == served
    assert len(fake_a.hits) == len(fake_b.hits) == 3

    # Every OpenAI route, the query string and worker errors pass through.
    r = gw.post("/v1/completions?x=1", json={"model": "m", "prompt": "hi"})
    assert r.json()["path"] == "/v1/completions" and r.json()["query"] == "x=1"
    assert gw.post("/tokenize", json={"model": "m", "prompt": "hi"}).json()["path"] == "/tokenize"
    assert_error(chat(gw, fail=True), 400)
    # A request without a model goes to any healthy worker.
    assert chat(gw, model=None).status_code == 200


def test_models_union_404_and_503(gateway, fake_a, fake_b):
    gw = gateway()
    register(gw, fake_a.url, models=["m", "shared"])
    register(gw, fake_b.url, models=["n", "shared"])
    dead = register(gw, f"http://127.0.0.1:{free_port()}", models=["gone"])
    models = gw.get("/v1/models").json()
    assert models["object"] == "list"
    assert sorted(m["id"] for m in models["data"]) == ["gone", "m", "n", "shared"]
    assert all(m["object"] == "model" and m["max_model_len"] == 96 for m in models["data"])
    assert gw.get("/v1/models/n").json()["id"] == "n"
    assert chat(gw, model="n").json()["worker"] == "b"

    err = assert_error(chat(gw, model="nope"), 404, "model_not_found")
    assert "nope" in err["message"] and err["param"] == "model"
    assert_error(gw.get("/v1/models/nope"), 404, "model_not_found")
    # The only worker of `gone` refuses connections: marked unhealthy at once, then 503.
    assert_error(chat(gw, model="gone"), 503)
    assert workers(gw)[dead]["status"] == "unhealthy"
    assert_error(chat(gw, model="gone"), 503)
    assert_error(gw.get("/v1/models/gone"), 503)
    assert "gone" not in [m["id"] for m in gw.get("/v1/models").json()["data"]]


def test_retry_on_another_worker_when_the_port_is_closed(gateway, fake_a):
    gw = gateway()
    closed = register(gw, f"http://127.0.0.1:{free_port()}")  # first in round-robin order
    live = register(gw, fake_a.url)
    answers = [chat(gw) for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert {r.headers["x-gateway-worker"] for r in answers} == {live}
    assert len(fake_a.hits) == 4
    assert workers(gw)[closed]["status"] == "unhealthy"
    assert workers(gw)[live]["status"] == "healthy"
    # Its next heartbeat makes it healthy again.
    gw.post(f"/workers/{closed}/heartbeat", json={"load": {}}, headers=AUTH)
    assert workers(gw)[closed]["status"] == "healthy"


@pytest.fixture
def dropping_url():
    """A port that accepts connections and closes them without answering."""
    listener = socket.create_server(("127.0.0.1", 0))

    def drop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=drop, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_retry_when_a_worker_drops_the_connection_before_answering(gateway, fake_a,
                                                                   dropping_url):
    gw = gateway()
    dropper = register(gw, dropping_url)
    live = register(gw, fake_a.url)
    for stream in (False, True):
        r = chat(gw, stream=stream)
        assert r.status_code == 200 and r.headers["x-gateway-worker"] == live
        assert workers(gw)[dropper]["status"] == "unhealthy"
        gw.post(f"/workers/{dropper}/heartbeat", json={"load": {}}, headers=AUTH)


def test_client_leaving_mid_stream_ends_the_worker_stream(gateway, fake_a):
    gw = gateway()
    wid = register(gw, fake_a.url)
    ended = fake_a.streams_ended
    fake_a.release.clear()
    try:
        with httpx.Client(base_url=str(gw.base_url), timeout=10) as other:
            with other.stream("POST", "/v1/chat/completions",
                              json={"model": "m", "stream": True}) as r:
                events = r.iter_lines()
                assert next(events).startswith("data: ")
                assert workers(gw)[wid]["in_flight"] == 1
        deadline = time.monotonic() + 5  # the client has gone: the worker's stream ends too
        while fake_a.streams_ended == ended or workers(gw)[wid]["in_flight"]:
            assert time.monotonic() < deadline, (fake_a.streams_ended, workers(gw))
            time.sleep(0.01)
    finally:
        fake_a.release.set()


def test_shortest_queue(gateway, fake_a, fake_b):
    gw = gateway(load_balance_method="shortest_queue")
    a, b = register(gw, fake_a.url), register(gw, fake_b.url)

    def beat(wid: str, running: int, waiting: int = 0) -> None:
        gw.post(f"/workers/{wid}/heartbeat", headers=AUTH,
                json={"load": {"running": running, "waiting": waiting}})

    def served_by(wid: str) -> str:
        # NOTE: a relayed answer may reach the client just before the Gateway stops counting it.
        while workers(gw)[wid]["in_flight"]:
            time.sleep(0.005)
        return chat(gw).json()["worker"]

    beat(a, 3, 1)
    beat(b, 2)
    assert {served_by(b) for _ in range(4)} == {"b"}
    beat(a, 0)
    beat(b, 0, 1)
    assert {served_by(a) for _ in range(4)} == {"a"}

    # The Gateway's own in-flight requests count: hold a stream open on one worker.
    beat(b, 0)
    for fake in (fake_a, fake_b):
        fake.release.clear()
    try:
        with httpx.Client(base_url=str(gw.base_url), timeout=10) as other:
            with other.stream("POST", "/v1/chat/completions",
                              json={"model": "m", "stream": True}) as held:
                events = held.iter_lines()  # NOTE: dropping the iterator would close the stream
                first = json.loads(next(events)[len("data: "):])["worker"]
                holding, rest = (a, b) if first == "a" else (b, a)
                assert workers(gw)[holding]["in_flight"] == 1
                assert {served_by(rest) for _ in range(3)} == {"b" if first == "a" else "a"}
                for fake in (fake_a, fake_b):
                    fake.release.set()
                assert [e for e in events if e][-1] == "data: [DONE]"
    finally:
        for fake in (fake_a, fake_b):
            fake.release.set()
    deadline = time.monotonic() + 5
    while {w["in_flight"] for w in workers(gw).values()} != {0}:
        assert time.monotonic() < deadline, workers(gw)


def test_stream_passes_through_chunk_by_chunk(gateway, fake_a):
    gw = gateway()
    register(gw, fake_a.url)
    fake_a.release.clear()
    try:
        with gw.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            first = next(lines)
            # The first event came through while the worker still holds back the second.
            assert json.loads(first[len("data: "):]) == {"worker": "a", "n": 1}
            assert not fake_a.release.is_set()
            fake_a.release.set()
            rest = [line for line in lines if line]
    finally:
        fake_a.release.set()
    assert rest == ['data: {"worker": "a", "n": 2}', "data: [DONE]"]


def test_unhealthy_after_missed_heartbeats_then_removed(monkeypatch):
    """The sweep judges silence in the worker's own intervals: on a clock the test moves, not on
    how fast this machine runs."""
    from jaxserve.gateway import registry as registry_module

    now = [1000.0]
    monkeypatch.setattr(registry_module.time, "monotonic", lambda: now[0])
    reg = registry_module.Registry(GatewayConfig(unhealthy_after=2.5, remove_after=10))
    worker = reg.register({"url": "http://10.0.0.1:8001", "models": ["m"],
                           "backend_args": {"heartbeat_interval": 0.2}})
    for _ in range(6):  # heartbeats on time keep it healthy
        now[0] += 0.1
        reg.heartbeat(worker, {})
        reg.sweep()
        assert worker.status == "healthy"
    silent_since = now[0]
    now[0] = silent_since + 2.4 * 0.2
    reg.sweep()
    assert worker.status == "healthy"
    now[0] = silent_since + 2.6 * 0.2
    reg.sweep()
    assert worker.status == "unhealthy"
    reg.heartbeat(worker, {})
    assert worker.status == "healthy"
    silent_since = now[0]
    now[0] = silent_since + 9.9 * 0.2
    reg.sweep()
    assert worker.id in reg.workers and worker.status == "unhealthy"
    now[0] = silent_since + 10.1 * 0.2
    reg.sweep()
    assert worker.id not in reg.workers


def test_the_gateway_sweeps_silent_workers_by_itself(gateway):
    """Through HTTP: a silent worker turns unhealthy, then is removed, with no request to make
    it so (waits are bounded, not measured)."""
    interval = 0.2
    gw = gateway(unhealthy_after=2.5, remove_after=5)
    wid = register(gw, "http://10.0.0.1:8001", backend_args={"heartbeat_interval": interval})
    deadline = time.monotonic() + 30
    while workers(gw)[wid]["status"] == "healthy":
        assert time.monotonic() < deadline, "still healthy after 30 s of silence"
        time.sleep(0.02)
    gw.post(f"/workers/{wid}/heartbeat", json={"load": {}}, headers=AUTH)
    assert workers(gw)[wid]["status"] == "healthy"
    while wid in workers(gw):
        assert time.monotonic() < deadline, "not removed after 30 s of silence"
        time.sleep(0.02)
    assert_error(gw.post(f"/workers/{wid}/heartbeat", json={"load": {}}, headers=AUTH), 404)


# ---- logs -------------------------------------------------------------------------------------------
def test_logs_kept_listed_and_followed(gateway):
    gw = gateway(log_lines=5)
    wid = register(gw, "http://10.0.0.1:8001")
    post = lambda lines, dropped=0: gw.post(  # noqa: E731
        f"/workers/{wid}/logs", json={"lines": lines, "dropped": dropped}, headers=AUTH)
    assert post(["line 1", "line 2"], dropped=3).status_code == 200
    assert gw.get(f"/workers/{wid}/logs", headers=AUTH).json()["lines"] == ["line 1", "line 2"]
    assert post([f"line {i}" for i in range(3, 9)], dropped=1).status_code == 200
    kept = [f"line {i}" for i in range(4, 9)]  # the newest five
    assert gw.get(f"/workers/{wid}/logs", params={"token": TOKEN}).json()["lines"] == kept
    assert workers(gw)[wid]["dropped_log_lines"] == 4
    assert_error(post("not a list"), 400)
    assert_error(post(["ok"], dropped=-1), 400)

    got: list[str] = []
    opened, ended = threading.Event(), threading.Event()

    def follow() -> None:
        with httpx.Client(base_url=str(gw.base_url), timeout=10) as client:
            with client.stream("GET", f"/workers/{wid}/logs",
                               params={"follow": "true", "token": TOKEN}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got.append(json.loads(line[len("data: "):]))
                        opened.set()
        ended.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert opened.wait(5)
    post(["new 1", "new 2\nwith a second line"])
    deadline = time.monotonic() + 5
    while len(got) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == kept + ["new 1", "new 2\nwith a second line"]
    # Deregistering ends the stream.
    gw.delete(f"/workers/{wid}", headers=AUTH)
    assert ended.wait(5)
    follower.join(5)


# ---- the status page in headless Chromium -----------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def check_status_page(browser, base_url: str, expected: dict[str, str], log_line: str) -> None:
    """The page lists each worker (url -> model) as healthy; the first one's launch arguments
    unfold, and its live-logs link shows `log_line`."""
    page = browser.new_page()
    try:
        page.goto(f"{base_url}/?token={TOKEN}")
        rows = page.locator("#workers tbody tr")
        rows.nth(len(expected) - 1).wait_for(timeout=10_000)
        assert rows.count() == len(expected)
        seen = {}
        for i in range(rows.count()):
            cells = rows.nth(i).locator("td").all_inner_texts()
            seen[cells[1]] = cells
        assert set(seen) == set(expected), seen
        from jaxserve import __version__

        for url, model in expected.items():
            assert seen[url][2] == "healthy" and model in seen[url][3], seen[url]
            assert seen[url][4] == f"jaxserve {__version__} (vllm flags)", seen[url]
        n = len(expected)
        assert page.inner_text("#summary") == f"{n} worker{'s' * (n != 1)}, {n} healthy"
        first = next(iter(expected))
        args = page.locator("tr", has_text=first).locator("details.args")
        args.locator("summary").click()
        assert '"model": ' in args.locator("pre").inner_text()
        link = page.locator("tr", has_text=first).locator("a.logs-link")
        assert "follow=true" in link.get_attribute("href")
        link.click()
        page.locator("#log-lines", has_text=log_line).wait_for(timeout=10_000)
        assert page.inner_text("#error") == ""
    finally:
        page.close()


def test_status_page_in_chromium(browser, gateway, fake_a, fake_b):
    gw = gateway()
    a = register(gw, fake_a.url, models=["m"])
    register(gw, fake_b.url, models=["n"])
    gw.post(f"/workers/{a}/heartbeat", headers=AUTH,
            json={"load": {"running": 2, "waiting": 1, "kv_cache_usage": 0.5}})
    gw.post(f"/workers/{a}/logs", json={"lines": ["<b>hello</b> from a"]}, headers=AUTH)
    check_status_page(browser, str(gw.base_url).rstrip("/"),
                      {fake_a.url: "m", fake_b.url: "n"}, "<b>hello</b> from a")
    page = browser.new_page()
    try:
        page.goto(f"{str(gw.base_url).rstrip('/')}/?token={TOKEN}")
        row = page.locator("tr", has_text=fake_a.url)
        row.wait_for(timeout=10_000)
        assert "2 running, 1 waiting, KV 50%" in row.inner_text()
        assert page.locator("b").count() == 0  # worker text is never HTML
    finally:
        page.close()


def test_status_page_counts_one_worker_in_chromium(browser, gateway, fake_a):
    gw = gateway()
    register(gw, fake_a.url, version=__import__("jaxserve").__version__)
    check_status_page(browser, str(gw.base_url).rstrip("/"), {fake_a.url: "m"}, "")


# ---- end to end: a `jaxserve gateway` process and two real workers --------------------------------
# NOTE: these share one fleet and run in file order: the Gateway restarts, then a worker is killed.
HEARTBEAT_S = 1.0


class GatewayProcess:
    """`jaxserve gateway` on a loopback port (the same port again after a restart)."""

    def __init__(self, log_path: str, port: int | None = None, token: str | None = TOKEN):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "ab")
        argv = [sys.executable, "-m", "jaxserve.cli", "gateway", "--host", "127.0.0.1",
                "--port", str(self.port)] + (["--gateway-token", token] if token else [])
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"the gateway exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "the gateway did not answer /health"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        self.ready_at = time.monotonic()

    def stop(self) -> int:
        return stop_process(self.proc, self._log, timeout=20)


class WorkerProcess(ServerProcess):
    """`jaxserve serve MODEL -ga URL --hi 1 --gateway-token T` (the short spellings)."""

    def __init__(self, model: str, log_path: str, gateway_url: str):
        super().__init__(model, log_path,
                         extra_argv=("-ga", gateway_url, "--hi", str(HEARTBEAT_S),
                                     "--gateway-token", TOKEN),
                         served_model_name=[SERVED_NAME], **SERVER_ENGINE)


@pytest.fixture(scope="module")
def fleet(server_model_dir, tmp_path_factory):
    """A Gateway and two workers registered with it; {"gateway", "workers", "ids", "logs"}."""
    logs = tmp_path_factory.mktemp("fleet")
    gateway = GatewayProcess(str(logs / "gateway.log"))
    workers_ = [WorkerProcess(server_model_dir, str(logs / f"worker{i}.log"), gateway.url)
                for i in range(2)]
    state = {"gateway": gateway, "workers": workers_, "logs": logs, "model": server_model_dir}
    try:
        for w in workers_:
            w.wait_ready()
        state["ids"] = wait_registered(gateway.url, [w.base_url for w in workers_], timeout=30)
        yield state
    finally:
        for w in workers_:
            w.stop()
        state["gateway"].stop()


def wait_registered(gateway_url: str, urls: list[str], timeout: float) -> dict[str, str]:
    """Polls `GET /workers` until every url is there and healthy; returns url -> worker id."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            listed = httpx.get(gateway_url + "/workers", headers=AUTH, timeout=2).json()
            ids = {w["url"]: w["id"] for w in listed if w["status"] == "healthy"}
            if all(u in ids for u in urls):
                return {u: ids[u] for u in urls}
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not all of {urls} registered in {timeout} s"
        time.sleep(0.02)


def fleet_workers(fleet) -> dict[str, dict]:
    r = httpx.get(fleet["gateway"].url + "/workers", headers=AUTH, timeout=5)
    assert r.status_code == 200, r.text
    return {w["url"]: w for w in r.json()}


CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Name three rivers."}],
        "max_tokens": 12, "temperature": 0}


def test_e2e_workers_register_with_their_launch_arguments(fleet):
    from jaxserve import __version__

    listed = fleet_workers(fleet)
    assert set(listed) == {w.base_url for w in fleet["workers"]}
    for w in fleet["workers"]:
        got = listed[w.base_url]
        assert got["status"] == "healthy" and got["models"] == [SERVED_NAME]
        assert got["backend"] == "vllm" and got["version"] == __version__
        assert got["device"]["kind"] == "cpu" and got["device"]["count"] >= 1
        assert got["max_model_len"] == SERVER_ENGINE["max_model_len"]
        assert got["heartbeat_interval"] == HEARTBEAT_S
        args = got["backend_args"]
        for key, value in SERVER_ENGINE.items():
            assert args[key] == value, key
        assert args["model"] == fleet["model"] and args["port"] == w.port
        assert args["served_model_name"] == [SERVED_NAME]
        assert args["gateway_address"] == fleet["gateway"].url
        assert args["heartbeat_interval"] == HEARTBEAT_S and args["log_streaming"] is True
        assert args["gateway_token"] == "***"
        assert len(args) > 100, "backend_args holds every flag, not only those given"
    # Heartbeats carry the load.
    deadline = time.monotonic() + 3 * HEARTBEAT_S
    while not all(w["load"] for w in fleet_workers(fleet).values()):
        assert time.monotonic() < deadline, fleet_workers(fleet)
        time.sleep(0.05)
    for got in fleet_workers(fleet).values():
        assert {"running", "waiting", "kv_cache_usage", "prompt_throughput",
                "generation_throughput"} <= set(got["load"])


def test_e2e_round_robin_and_stream_equal_to_a_direct_one(fleet):
    gw = fleet["gateway"].url
    by_id = {v: k for k, v in fleet["ids"].items()}
    with httpx.Client(timeout=60) as http:
        served = []
        for _ in range(4):
            r = http.post(gw + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            served.append(by_id[r.headers["x-gateway-worker"]])
        assert served[0] != served[1] and served[:2] == served[2:], served

        models = http.get(gw + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [SERVED_NAME]
        prompt = {"model": SERVED_NAME, "prompt": "The quick brown fox"}
        direct = http.post(fleet["workers"][0].base_url + "/tokenize", json=prompt).json()
        assert http.post(gw + "/tokenize", json=prompt).json() == direct

        def streamed(base_url: str) -> list[str]:
            r = http.post(base_url + "/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 200, r.text
            return [c["choices"][0]["delta"].get("content") or ""
                    for c in sse_chunks(r) if c["choices"]]

        through = streamed(gw)
        assert "".join(through)
        for w in fleet["workers"]:  # the same tiny model on both: the same greedy text
            assert streamed(w.base_url) == through


def test_e2e_worker_logs_readable_at_the_gateway(fleet):
    gw = fleet["gateway"].url
    worker = fleet["workers"][0]
    wid = fleet["ids"][worker.base_url]
    probe = f"probe-{time.monotonic_ns()}"
    got: list[str] = []
    follower_saw = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", f"{gw}/workers/{wid}/logs", timeout=30,
                          params={"follow": "true", "token": TOKEN}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[len("data: "):]))
                    if probe in got[-1]:
                        follower_saw.set()
                        return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    # uvicorn's access log line of this request names the probe.
    assert httpx.get(f"{worker.base_url}/v1/models?{probe}=1").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        lines = httpx.get(f"{gw}/workers/{wid}/logs", headers=AUTH).json()["lines"]
        if any(probe in line for line in lines):
            break
        assert time.monotonic() < deadline, lines[-20:]
        time.sleep(0.1)
    assert follower_saw.wait(10), got[-5:]
    assert any("engine ready" in line for line in lines), "start-up lines reach the Gateway too"
    other = fleet["ids"][fleet["workers"][1].base_url]
    other_lines = httpx.get(f"{gw}/workers/{other}/logs", headers=AUTH).json()["lines"]
    assert not any(probe in line for line in other_lines)


def test_e2e_status_page_in_chromium(fleet, browser):
    """The page shows both workers, and the first one's live logs."""
    probe = f"probe-{time.monotonic_ns()}"
    assert httpx.get(f"{fleet['workers'][0].base_url}/v1/models?{probe}=1").status_code == 200
    check_status_page(browser, fleet["gateway"].url,
                      {w.base_url: SERVED_NAME for w in fleet["workers"]}, probe)


def test_e2e_tokens_refused(fleet):
    gw = fleet["gateway"].url
    body = {"url": "http://127.0.0.1:1", "models": ["intruder"]}
    for headers in ({}, {"X-Gateway-Token": "wrong"}):
        assert_error(httpx.post(gw + "/workers/register", json=body, headers=headers), 401)
        assert_error(httpx.get(gw + "/workers", headers=headers), 401)
        wid = next(iter(fleet["ids"].values()))
        assert_error(httpx.get(f"{gw}/workers/{wid}/logs", headers=headers), 401)
        assert_error(httpx.delete(f"{gw}/workers/{wid}", headers=headers), 401)
    assert set(fleet_workers(fleet)) == set(fleet["ids"])


def test_e2e_gateway_restart_workers_register_again(fleet):
    old = fleet["gateway"]
    assert old.stop() == 0, "SIGTERM is a normal stop"
    new = GatewayProcess(str(fleet["logs"] / "gateway.log"), port=old.port)
    fleet["gateway"] = new
    urls = [w.base_url for w in fleet["workers"]]
    ids = wait_registered(new.url, urls, timeout=10 * HEARTBEAT_S)
    took = time.monotonic() - new.ready_at
    # Within one interval, plus the HTTP round trips of the 404 and the registration.
    assert took <= HEARTBEAT_S + 0.5, f"re-registered {took:.2f} s after the restart"
    print(f"re-registered {took:.2f} s after the Gateway restarted")
    fleet["ids"] = ids
    r = httpx.post(new.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text


def test_e2e_sigkilled_worker_unhealthy_and_traffic_continues(fleet):
    gw = fleet["gateway"].url
    killed, survivor = fleet["workers"]
    killed_id, survivor_id = fleet["ids"][killed.base_url], fleet["ids"][survivor.base_url]
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    dead_at = time.monotonic()
    while fleet_workers(fleet)[killed.base_url]["status"] == "healthy":
        assert time.monotonic() - dead_at < 3 * HEARTBEAT_S, "still healthy after 3 intervals"
        time.sleep(0.02)
    took = time.monotonic() - dead_at
    assert fleet_workers(fleet)[survivor.base_url]["status"] == "healthy"

    with httpx.Client(timeout=60) as http:
        answers = [http.post(gw + "/v1/chat/completions", json={**CHAT, "stream": i % 2 == 1})
                   for i in range(6)]
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    assert {r.headers["x-gateway-worker"] for r in answers} == {survivor_id}
    assert killed_id != survivor_id
    print(f"unhealthy {took:.2f} s after SIGKILL (heartbeat every {HEARTBEAT_S} s)")
