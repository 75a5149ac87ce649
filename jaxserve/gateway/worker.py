"""The worker side of the Gateway protocol (docs/gateway.md): registration, heartbeats, log lines.

`GatewayClient` runs on two daemon threads of its own, never on the engine thread or the event
loop: one registers once the server answers and then heartbeats every interval (registering
again at once when the Gateway answers 404), the other posts the log lines that a logging handler
collects into a bounded queue. The handler only formats and appends, so a slow or absent Gateway
never blocks a logging call; when the queue is full the oldest line is dropped and counted.

HTTP goes through `urllib.request`, which logs nothing, so the client's own traffic cannot feed
back into the log stream.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from argparse import Namespace
from collections.abc import Callable
from http.client import HTTPException
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

_SECRETS = ("api_key", "gateway_token", "hf_token")  # shown to the Gateway as "***"
# Records never streamed: the client's own lines and HTTP client libraries.
_QUIET_LOGGERS = (__name__, "httpx", "httpcore", "urllib3")
# Loggers that do not propagate to the root (uvicorn's), so the handler is added to them too.
_OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.access")
_LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s] %(message)s"
_REQUEST_TIMEOUT = 5.0  # seconds, register / heartbeat / log post
_STOP_TIMEOUT = 1.0  # seconds, the last log post and the deregistration on shutdown


# ---- what the worker reports ---------------------------------------------------------------------
def launch_arguments(ns: Namespace) -> dict[str, Any]:
    """`backend_args`: every flag's destination and effective value, JSON-safe, secrets masked.

    The namespace holds each flag after `--config`, dialect defaults and SGLang spellings; the
    `EngineArgs` fields are laid over it, as the engine resolved them (`--context-length 2048`
    shows as `max_model_len: 2048`). `served_model_name` keeps the namespace's whole list.
    """
    args = {k: v for k, v in vars(ns).items() if k not in ("engine_args", "model_tag")}
    engine_args = getattr(ns, "engine_args", None)
    if dataclasses.is_dataclass(engine_args):
        for key, value in dataclasses.asdict(engine_args).items():
            if key != "served_model_name" or key not in args:
                args[key] = value
    for key in _SECRETS:
        if isinstance(args.get(key), str):  # `--hf-token` alone is True: nothing to hide
            args[key] = "***"
    return json.loads(json.dumps(args, default=str))


def advertised_url(host: str | None, port: int, *, scheme: str = "http",
                   worker_url: str | None = None) -> str:
    """The address the Gateway routes to: `--worker-url`, else this machine's hostname when the
    server listens on all interfaces, else the address it is bound to."""
    if worker_url:
        return worker_url.rstrip("/")
    if host in (None, "", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def device_info() -> dict[str, Any]:
    import jax

    return {"kind": jax.default_backend(), "count": jax.device_count()}


class EngineLoad:
    """`load_fn` for an `LLMEngine`: queue lengths, KV usage, and token rates since the last call.

    Reads only what the engine already keeps: its queues' and KV usage's totals over its
    data-parallel replicas, and the Prometheus token counters (zero rates when the engine has no
    metrics, or new ones).
    """

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}
        self._last = (time.monotonic(), *self._tokens())

    def _tokens(self) -> tuple[float, float]:
        metrics = self.engine.metrics
        if metrics is None:
            return 0.0, 0.0
        get = metrics.registry.get_sample_value
        return (get("vllm:prompt_tokens_total", self.labels) or 0.0,
                get("vllm:generation_tokens_total", self.labels) or 0.0)

    def __call__(self) -> dict[str, Any]:
        now, prompt, generation = time.monotonic(), *self._tokens()
        then, last_prompt, last_generation = self._last
        self._last = (now, prompt, generation)
        elapsed = max(now - then, 1e-6)
        return {"running": self.engine.num_running,
                "waiting": self.engine.num_waiting,
                "kv_cache_usage": self.engine.kv_cache_usage,
                "prompt_throughput": max(prompt - last_prompt, 0.0) / elapsed,
                "generation_throughput": max(generation - last_generation, 0.0) / elapsed}


# ---- log lines -----------------------------------------------------------------------------------
class LogQueue(logging.Handler):
    """A logging handler that keeps the newest `capacity` formatted lines for the sender.

    `emit` formats and appends under a short lock, nothing more; a full queue drops its oldest
    line and counts it.
    """

    def __init__(self, capacity: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"the log queue needs room for a line, got {capacity=}")
        self.capacity = capacity
        self._lines: collections.deque[str] = collections.deque()
        self._dropped = 0
        self._mutex = threading.Lock()
        self.addFilter(lambda r: not any(r.name == q or r.name.startswith(q + ".")
                                         for q in _QUIET_LOGGERS))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a broken record must not break the caller's logging call
            self.handleError(record)
            return
        with self._mutex:
            if len(self._lines) >= self.capacity:
                self._lines.popleft()
                self._dropped += 1
            self._lines.append(line)

    def take(self, most: int) -> tuple[list[str], int]:
        """Up to `most` oldest lines and the drops since the last take."""
        with self._mutex:
            lines = [self._lines.popleft() for _ in range(min(most, len(self._lines)))]
            dropped, self._dropped = self._dropped, 0
        return lines, dropped

    def put_back(self, lines: list[str], dropped: int) -> None:
        """Return an unsent batch to the front; lines that no longer fit count as dropped."""
        with self._mutex:
            room = self.capacity - len(self._lines)
            kept = lines[len(lines) - room:] if room < len(lines) else lines
            self._lines.extendleft(reversed(kept))
            self._dropped += dropped + len(lines) - len(kept)

    def __len__(self) -> int:
        return len(self._lines)


# ---- the client ----------------------------------------------------------------------------------
def _log_sources() -> list[logging.Logger]:
    sources = [logging.getLogger()]
    for name in _OWN_HANDLER_LOGGERS:
        log = logging.getLogger(name)
        if not log.propagate:
            sources.append(log)
    return sources


def install_log_queue(logs: LogQueue) -> LogQueue:
    """Attach `logs` to the root logger (and to uvicorn's, which do not propagate), formatted as
    the root's own handler formats; attaching twice is harmless."""
    root = logging.getLogger()
    fmt = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    logs.setFormatter(fmt or logging.Formatter(_LOG_FORMAT))
    for log in _log_sources():
        log.addHandler(logs)
    return logs


class Reply(NamedTuple):
    status: int | None  # None: no answer (refused, timed out, reset)
    body: Any
    error: str  # why, for the warning

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class GatewayClient:
    """Registers this worker with a Gateway, heartbeats its load and streams its log lines.

    `load_fn()` returns the heartbeat's `load` object; `ready()` says whether the server answers
    requests (registration waits for it; a heartbeat is skipped while it is false, so a worker
    that stopped answering turns unhealthy at the Gateway).
    """

    def __init__(self, gateway_url: str, *, token: str | None, worker_url: str,
                 models: list[str], backend: str, backend_args: dict[str, Any],
                 device: dict[str, Any], version: str, max_model_len: int | None,
                 heartbeat_interval: float, load_fn: Callable[[], dict[str, Any]],
                 log_streaming: bool = True, ready: Callable[[], bool] = lambda: True,
                 log_capacity: int = 5000, log_batch: int = 1000, log_period: float = 0.5,
                 logs: LogQueue | None = None, api_key: str | None = None):
        if heartbeat_interval <= 0:
            raise ValueError(f"--heartbeat-interval must be positive, got {heartbeat_interval}")
        self.gateway_url = gateway_url.rstrip("/")
        self.interval = float(heartbeat_interval)
        self.registration = {"url": worker_url, "models": list(models), "backend": backend,
                             "backend_args": backend_args, "device": device,
                             "engine": "jaxserve", "version": version,
                             "max_model_len": max_model_len}
        api_key = api_key or os.environ.get("VLLM_API_KEY") or None
        if api_key:  # what the Gateway must send to be let in; never shown in /workers
            self.registration["api_key"] = api_key
        self.load_fn = load_fn
        self.ready = ready
        self.worker_id: str | None = None
        # `logs`: a queue installed earlier (at start-up, so loading and compiling lines are
        # kept until registration); else one of our own, installed by start().
        self.logs = (logs or LogQueue(log_capacity)) if log_streaming else None
        self.log_batch, self.log_period = log_batch, log_period
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["X-Gateway-Token"] = token
        self._opener = urllib.request.build_opener()
        self._stop = threading.Event()
        self._wake = threading.Event()  # register at once (a 404 on a log post)
        self._lock = threading.Lock()
        self._failing = False
        self._logs_refused = False
        self._threads: list[threading.Thread] = []
        self._stop_lock = threading.Lock()
        self._stopped = False

    # ---- lifecycle
    def start(self) -> None:
        """Start the heartbeat thread (and the log handler and sender). Returns at once."""
        if self.logs is not None:
            install_log_queue(self.logs)
            self._threads.append(threading.Thread(target=self._send_logs, daemon=True,
                                                  name="gateway-logs"))
        self._threads.append(threading.Thread(target=self._heartbeats, daemon=True,
                                              name="gateway-heartbeat"))
        for thread in self._threads:
            thread.start()

    def stop_soon(self) -> None:
        """stop() on a thread of its own: for a signal handler, which must not wait."""
        threading.Thread(target=self.stop, name="gateway-stop", daemon=True).start()

    def stop(self) -> None:
        """Post the last log lines and deregister: best effort, about a second each, after
        giving the threads a second to finish. A second call waits for the first."""
        with self._stop_lock:
            if not self._stopped:
                self._stopped = True
                self._shut_down()

    def _shut_down(self) -> None:
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + _STOP_TIMEOUT
        for thread in self._threads:  # a thread stuck on a hung Gateway is left behind
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = any(thread.is_alive() for thread in self._threads)
        if self.logs is not None:
            for log in _log_sources():
                log.removeHandler(self.logs)
        worker_id = self.worker_id
        if worker_id is None:
            return
        if self.logs is not None and len(self.logs) and not stuck:
            self._post_logs(worker_id, timeout=_STOP_TIMEOUT)
        reply = self._call("DELETE", f"/workers/{_quote(worker_id)}", timeout=_STOP_TIMEOUT)
        self.worker_id = None
        if reply.ok:
            logger.info("deregistered from the gateway %s", self.gateway_url)
        else:
            logger.warning("could not deregister from the gateway %s: %s", self.gateway_url,
                           reply.error)


    # ---- HTTP
    def _call(self, method: str, path: str, body: Any = None,
              timeout: float = _REQUEST_TIMEOUT) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.gateway_url + path, data=data, method=method,
                                         headers=self._headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return Reply(response.status, _json(response.read()), "")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")[:200]
            return Reply(e.code, _json(text.encode()), f"HTTP {e.code} {text}".strip())
        except (OSError, HTTPException) as e:  # URLError, refused, timed out, reset
            reason = getattr(e, "reason", e)
            return Reply(None, None, f"{type(reason).__name__}: {reason}")

    def _note(self, reply: Reply, what: str) -> None:
        """One warning when the Gateway stops answering, one line when it answers again."""
        with self._lock:
            was_failing, self._failing = self._failing, not reply.ok
        if reply.ok and was_failing:
            logger.info("the gateway %s answers again", self.gateway_url)
        elif not reply.ok and not was_failing:
            logger.warning("gateway %s: %s failed (%s); serving on, retrying every %g s at "
                           "most", self.gateway_url, what, reply.error, self.interval)

    # ---- the heartbeat thread
    def _heartbeats(self) -> None:
        while not self.ready():
            if self._stop.wait(0.05):
                return
        backoff = min(0.5, self.interval)
        while not self._stop.is_set():
            self._wake.clear()
            if self.worker_id is None:
                ok = self._register()
            elif self.ready():
                ok = self._heartbeat()
                if self.worker_id is None:  # 404: the Gateway restarted
                    continue
            else:
                ok = True
            delay = self.interval if ok else backoff
            backoff = min(0.5, self.interval) if ok else min(backoff * 2, self.interval)
            self._wake.wait(delay)

    def _register(self) -> bool:
        reply = self._call("POST", "/workers/register", self.registration)
        if reply.ok and not (isinstance(reply.body, dict) and reply.body.get("id")):
            reply = Reply(None, reply.body, f"no worker id in {reply.body!r}")
        self._note(reply, "registration")
        if not reply.ok:
            return False
        interval = reply.body.get("heartbeat_interval")
        if isinstance(interval, (int, float)) and interval > 0:
            self.interval = float(interval)
        with self._lock:
            self.worker_id = str(reply.body["id"])
        logger.info("registered with the gateway %s as %s (%s; heartbeat every %g s)",
                    self.gateway_url, self.worker_id, self.registration["url"], self.interval)
        return True

    def _heartbeat(self) -> bool:
        worker_id = self.worker_id
        try:
            load = self.load_fn()
        except Exception:  # a broken load reader must not stop the heartbeats
            logger.exception("reading the worker's load failed")
            load = {}
        reply = self._call("POST", f"/workers/{_quote(worker_id)}/heartbeat", {"load": load})
        if reply.status == 404:
            self._forget(worker_id)
            return True
        self._note(reply, "heartbeat")
        return reply.ok

    def _forget(self, worker_id: str) -> None:
        """The Gateway does not know `worker_id`: register again at once."""
        with self._lock:
            if self.worker_id == worker_id:
                self.worker_id = None
                logger.info("the gateway %s does not know worker %s; registering again",
                            self.gateway_url, worker_id)
        self._wake.set()

    # ---- the log thread
    def _send_logs(self) -> None:
        while not self._stop.wait(self.log_period):
            worker_id = self.worker_id
            if worker_id is not None and not self._failing and len(self.logs):
                self._post_logs(worker_id)

    def _post_logs(self, worker_id: str, timeout: float = _REQUEST_TIMEOUT) -> None:
        while True:
            lines, dropped = self.logs.take(self.log_batch)
            if not lines and not dropped:
                return
            reply = self._call("POST", f"/workers/{_quote(worker_id)}/logs",
                               {"lines": lines, "dropped": dropped}, timeout=timeout)
            if reply.status == 404:
                self.logs.put_back(lines, dropped)
                self._forget(worker_id)
                return
            if reply.status is None:  # unreachable: keep them for the next try
                self.logs.put_back(lines, dropped)
                return
            if not reply.ok:  # refused: resending the same batch would be refused again
                if not self._logs_refused:
                    logger.warning("the gateway %s refused %d log lines (%s); dropping refused "
                                   "batches", self.gateway_url, len(lines), reply.error)
                self._logs_refused = True
                self.logs.put_back([], dropped + len(lines))
                return


def _quote(worker_id: str) -> str:
    return urllib.parse.quote(worker_id, safe="")


def _json(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None
