"""The Gateway's record of its workers: registration, heartbeats, health by silence, recent log
lines, and the choice of a worker for a request. Plain Python, no HTTP: every method runs on the
Gateway's event loop, so nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("jaxserve.gateway")

HEALTHY, UNHEALTHY = "healthy", "unhealthy"
LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue")
DEFAULT_HEARTBEAT_INTERVAL = 30.0
MAX_HEARTBEAT_INTERVAL = 86400.0  # a day
# What one worker may make the Gateway keep, so that no worker can crowd out the others.
MAX_BACKEND_ARGS_BYTES = 64 << 10  # its launch arguments, as JSON
MAX_ARG_CHARS = 4096  # one launch argument's text (an inline chat template, say) is cut beyond
MAX_SMALL_JSON_BYTES = 4096  # `device`, a heartbeat's `load`
MAX_LOG_LINE_CHARS = 4096  # a longer log line is cut
MAX_MODELS, MAX_NAME_CHARS, MAX_URL_CHARS = 64, 512, 2048


@dataclass(frozen=True)
class GatewayConfig:
    """What `jaxserve gateway` takes besides where it listens (see docs/gateway.md)."""

    api_key: str | None = None
    gateway_token: str | None = None
    load_balance_method: str = "round_robin"
    unhealthy_after: float = 2.5  # heartbeat intervals of silence before `unhealthy`
    remove_after: float = 20.0  # heartbeat intervals of silence before the worker is dropped
    log_lines: int = 2000  # recent log lines kept per worker
    worker_timeout: float | None = 600.0  # seconds of silence from a worker, then retry/fail
    probe_after: float = 5.0  # seconds waiting for a response, then ask the worker's /health
    probe_timeout: float = 5.0  # seconds /health may take before the worker counts as hung

    def __post_init__(self) -> None:
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"{self.load_balance_method=}: use one of {LOAD_BALANCE_METHODS}")
        if not 0 < self.unhealthy_after <= self.remove_after:
            raise ValueError(f"{self.unhealthy_after=}, {self.remove_after=}: set "
                             "0 < --unhealthy-after <= --remove-after")
        if self.log_lines < 1:
            raise ValueError(f"{self.log_lines=}: keep at least one line")
        if self.worker_timeout is not None and not 0 < self.worker_timeout < math.inf:
            raise ValueError(f"{self.worker_timeout=}: give a positive number of seconds")
        if not (0 < self.probe_after < math.inf and 0 < self.probe_timeout < math.inf):
            raise ValueError(f"{self.probe_after=}, {self.probe_timeout=}: give positive "
                             "numbers of seconds")


class NoWorker(Exception):
    """No worker can take the request: 404 when none serves the model, 503 when none is healthy."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class Worker:
    """One registered `jaxserve serve`, as `GET /workers` shows it (plus the Gateway's own state)."""

    id: str
    url: str
    models: list[str]
    backend: str  # the flag dialect: vllm or sglang
    backend_args: dict[str, Any]
    device: dict[str, Any]
    version: str | None
    max_model_len: int | None
    heartbeat_interval: float
    registered_at: float  # unix seconds
    last_heartbeat: float  # unix seconds
    last_seen: float  # time.monotonic() of the last registration or heartbeat
    status: str = HEALTHY
    load: dict[str, Any] = field(default_factory=dict)
    in_flight: int = 0  # requests the Gateway is relaying to it now
    logs: deque[str] = field(default_factory=deque)
    dropped_log_lines: int = 0
    followers: set[asyncio.Queue] = field(default_factory=set)
    api_key: str | None = field(default=None, repr=False)  # sent to it as its bearer key
    engine: str = "jaxserve"  # the server software, shown with `version`

    def queue_length(self) -> float:
        """Running + waiting by the last heartbeat, plus what the Gateway has sent since."""
        reported = sum(float(self.load.get(k) or 0) for k in ("running", "waiting"))
        return reported + self.in_flight

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "status": self.status, "models": self.models,
                "backend": self.backend, "engine": self.engine,
                "backend_args": self.backend_args,
                "device": self.device, "version": self.version,
                "max_model_len": self.max_model_len,
                "heartbeat_interval": self.heartbeat_interval, "load": self.load,
                "in_flight": self.in_flight, "last_heartbeat": self.last_heartbeat,
                "registered_at": self.registered_at,
                "dropped_log_lines": self.dropped_log_lines}


def _interval(body: dict[str, Any], backend_args: dict[str, Any]) -> float:
    """The worker's own heartbeat interval: a top-level `heartbeat_interval`, else its
    `--heartbeat-interval` in `backend_args`, else the worker default."""
    value = body.get("heartbeat_interval", backend_args.get("heartbeat_interval"))
    if isinstance(value, bool):
        raise ValueError(f"heartbeat_interval={value!r} is not a number")
    try:
        value = float(value) if value is not None else DEFAULT_HEARTBEAT_INTERVAL
    except (TypeError, ValueError):
        raise ValueError(f"heartbeat_interval={value!r} is not a number") from None
    if not 0 < value <= MAX_HEARTBEAT_INTERVAL:  # NaN fails this too
        raise ValueError(f"heartbeat_interval={value!r} must be a number of seconds in "
                         f"(0, {MAX_HEARTBEAT_INTERVAL:g}]")
    return value


def json_size(value: Any, name: str) -> int:
    """Bytes of `value` as JSON; `ValueError` naming it for NaN or infinity (which JSON lacks and
    would break every listing of the workers) or for what JSON cannot hold."""
    try:
        return len(json.dumps(value, allow_nan=False).encode())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: {e}") from None


def small_object(value: Any, name: str) -> dict[str, Any]:
    """A JSON object of at most `MAX_SMALL_JSON_BYTES` (`device`, `load`); None is empty."""
    value = value or {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object")
    if json_size(value, name) > MAX_SMALL_JSON_BYTES:
        raise ValueError(f"{name} is over {MAX_SMALL_JSON_BYTES} bytes")
    return value


def _short_args(args: dict[str, Any]) -> dict[str, Any]:
    """Launch arguments with each text over `MAX_ARG_CHARS` cut, then bounded as a whole."""
    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > MAX_ARG_CHARS:
            return f"{value[:MAX_ARG_CHARS]}... [{len(value) - MAX_ARG_CHARS} more characters]"
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    args = cut(args)
    size = json_size(args, "backend_args")
    if size > MAX_BACKEND_ARGS_BYTES:
        raise ValueError(f"backend_args is {size} bytes as JSON, over the "
                         f"{MAX_BACKEND_ARGS_BYTES} a worker may register")
    return args


def cut_line(line: str) -> str:
    if len(line) <= MAX_LOG_LINE_CHARS:
        return line
    return f"{line[:MAX_LOG_LINE_CHARS]}... [{len(line) - MAX_LOG_LINE_CHARS} more characters]"


def _text(value: Any, name: str, limit: int, default: str | None = None) -> str | None:
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{name} must be a string of at most {limit} characters")
    return value


def registration_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a registration; `ValueError` saying which one is wrong."""
    url, models = body.get("url"), body.get("models")
    if (not isinstance(url, str) or not url.startswith(("http://", "https://"))
            or len(url) > MAX_URL_CHARS):
        raise ValueError(f"url={str(url)[:100]!r}: give the worker's base URL, http://host:port")
    if (not isinstance(models, list) or not 0 < len(models) <= MAX_MODELS
            or not all(isinstance(m, str) and 0 < len(m) <= MAX_NAME_CHARS for m in models)):
        raise ValueError(f"models: give a list of 1 to {MAX_MODELS} served model names")
    backend_args = body.get("backend_args") or {}
    if not isinstance(backend_args, dict):
        raise ValueError("backend_args must be an object of flag destinations and values")
    max_model_len = body.get("max_model_len")
    if max_model_len is not None and (not isinstance(max_model_len, int)
                                      or isinstance(max_model_len, bool) or max_model_len < 1):
        raise ValueError(f"max_model_len={max_model_len!r} must be a positive integer")
    return dict(
        url=url.rstrip("/"), models=models,
        backend=_text(body.get("backend"), "backend", 64, "vllm") or "vllm",
        backend_args=_short_args(backend_args),
        device=small_object(body.get("device"), "device"),
        version=_text(body.get("version"), "version", 64), max_model_len=max_model_len,
        engine=_text(body.get("engine"), "engine", 64, "jaxserve") or "jaxserve",
        heartbeat_interval=_interval(body, backend_args),
        api_key=_text(body.get("api_key"), "api_key", 1024), registered_at=time.time())


def _put_dropping_oldest(queue: asyncio.Queue, item: str | None) -> None:
    """A slow log follower loses its oldest lines; it never holds up a worker's post."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)


class Registry:
    """The workers by id, their health, and the load-balancing choice."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.workers: dict[str, Worker] = {}  # in registration order
        self._turn: dict[str | None, int] = {}  # round-robin position per model

    # ---- what workers tell us ----------------------------------------------------------------
    def register(self, body: dict[str, Any]) -> Worker:
        """A new worker, or the one already known at this URL (it keeps its id)."""
        fields = registration_fields(body)
        url = fields.pop("url")
        worker = next((w for w in self.workers.values() if w.url == url), None)
        if worker is None:
            worker = Worker(id=uuid.uuid4().hex[:12], url=url, **fields,
                            last_heartbeat=fields["registered_at"], last_seen=time.monotonic(),
                            logs=deque(maxlen=self.config.log_lines))
            self.workers[worker.id] = worker
            again = ""
        else:  # the same object: requests in flight keep counting against it
            for name, value in fields.items():
                setattr(worker, name, value)
            self.heartbeat(worker, worker.load)
            again = " again"
        logger.info("worker %s registered%s: %s serving %s (heartbeat every %g s)", worker.id,
                    again, url, ", ".join(worker.models), worker.heartbeat_interval)
        return worker

    def heartbeat(self, worker: Worker, load: dict[str, Any]) -> None:
        worker.load = load
        worker.last_heartbeat, worker.last_seen = time.time(), time.monotonic()
        if worker.status != HEALTHY:
            logger.info("worker %s (%s) is healthy again", worker.id, worker.url)
            worker.status = HEALTHY

    def remove(self, worker: Worker, why: str) -> None:
        self.workers.pop(worker.id, None)
        for queue in worker.followers:
            _put_dropping_oldest(queue, None)  # ends each live log stream
        logger.info("worker %s (%s) removed: %s", worker.id, worker.url, why)

    def add_logs(self, worker: Worker, lines: list[str], dropped: int) -> None:
        """Keep the worker's newest lines (each cut to `MAX_LOG_LINE_CHARS`) and pass them on."""
        lines = lines[-self.config.log_lines:]  # only the newest would be kept anyway
        lines = [cut_line(line) for line in lines]
        worker.logs.extend(lines)
        worker.dropped_log_lines += dropped
        for queue in worker.followers:
            for line in lines:
                _put_dropping_oldest(queue, line)

    # ---- health ------------------------------------------------------------------------------
    def mark_unhealthy(self, worker: Worker, why: str) -> None:
        if worker.status == HEALTHY:
            logger.warning("worker %s (%s) is unhealthy: %s", worker.id, worker.url, why)
        worker.status = UNHEALTHY

    def sweep(self) -> None:
        """Mark silent workers unhealthy and drop those silent for much longer."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            silent = (now - worker.last_seen) / worker.heartbeat_interval
            if silent > self.config.remove_after:
                self.remove(worker, f"no heartbeat for {silent:.1f} intervals")
            elif silent > self.config.unhealthy_after and worker.status == HEALTHY:
                self.mark_unhealthy(worker, f"no heartbeat for {silent:.1f} intervals")

    def sweep_period(self) -> float:
        """How often to sweep: a tenth of the shortest interval, within [0.05, 1] seconds
        (0.1 s while no worker is known, so that a new one with a short interval is not late)."""
        shortest = min((w.heartbeat_interval for w in self.workers.values()), default=1.0)
        return min(1.0, max(0.05, shortest / 10))

    # ---- routing -----------------------------------------------------------------------------
    def healthy(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.status == HEALTHY]

    def candidates(self, model: str | None, exclude: set[str] = frozenset()) -> list[Worker]:
        """The healthy workers serving `model` (any model, for None), in registration order."""
        serving = [w for w in self.workers.values() if model is None or model in w.models]
        if not serving and model is None:
            raise NoWorker("No worker is registered with the Gateway.", 503)
        if not serving:
            raise NoWorker(f"The model `{model}` does not exist.", 404)
        found = [w for w in serving if w.status == HEALTHY and w.id not in exclude]
        if not found:
            what = f"the model `{model}`" if model is not None else "any model"
            raise NoWorker(f"No healthy worker serves {what}; try again later.", 503)
        return found

    def pick(self, model: str | None, exclude: set[str] = frozenset()) -> Worker:
        """The worker for a request, by the load-balance method (raises `NoWorker`)."""
        found = self.candidates(model, exclude)
        turn = self._turn.get(model, 0)
        self._turn[model] = turn + 1
        rotated = [found[(turn + i) % len(found)] for i in range(len(found))]
        if self.config.load_balance_method == "shortest_queue":
            return min(rotated, key=Worker.queue_length)  # ties: the round-robin order
        return rotated[0]
