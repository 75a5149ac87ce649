"""Logs of a normal start and stop of `jaxserve serve`: no ERROR, no traceback, no reports of
accelerators that are not there, no cache resets, no progress bars redrawn into a log file."""

from __future__ import annotations

import logging
import os
import signal

import httpx
import pytest

from jaxserve import logs
from jaxserve.progress import LogProgress, progress

pytest_plugins = ["server_utils"]


def test_start_and_stop_log_nothing_alarming(server_model_dir, tmp_path):
    from server_utils import SERVER_ENGINE, ServerProcess

    log_path = str(tmp_path / "serve.log")
    server = ServerProcess(server_model_dir, log_path, **SERVER_ENGINE,
                           gpu_memory_utilization=0.5)
    try:
        server.wait_ready()
        # A client that keeps its connection open across the shutdown (uvicorn then logged
        # "ERROR: Cancel 0 running task(s)").
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            reply = client.post("/v1/completions", json={"model": server_model_dir,
                                                         "prompt": "Hello", "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    with open(log_path, "rb") as f:
        raw = f.read()
    text = raw.decode(errors="replace")
    assert b"\r" not in raw, "a progress bar was drawn into the log file"
    for bad in ("ERROR", "Traceback", "Unable to initialize backend", "Resetting cache",
                "cudart_stub", "Jax plugin configuration error"):
        assert bad not in text, f"{bad!r} in the log:\n{text[-3000:]}"
    assert "Started server process" in text and "Shutting down" in text  # the log is whole
    # --gpu-memory-utilization on CPU says what it means there, in one line.
    lines = [line for line in text.splitlines() if "--gpu-memory-utilization 0.5 on CPU" in line]
    assert len(lines) == 1 and "host RAM" in lines[0], text[-3000:]


def _record(name: str, level: int, msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_probe_filter_keeps_reports_of_attached_accelerators():
    absent = logs._DropProbeNoise(tpu=False, gpu=False)
    attached = logs._DropProbeNoise(tpu=True, gpu=True)
    tpu_line = _record("jax._src.xla_bridge", logging.INFO, "Unable to initialize backend "
                       "'tpu': ABORTED: Internal error when accessing libtpu lockfile")
    cuda_error = _record("jax._src.xla_bridge", logging.ERROR, "Jax plugin configuration error: "
                         "Exception when calling %s.initialize()", "jax_plugins.xla_cuda12")
    reset = _record("jax._src.compilation_cache", logging.INFO, "Resetting cache at %s.", "x")
    assert not absent.filter(tpu_line) and not absent.filter(cuda_error)
    assert attached.filter(tpu_line) and attached.filter(cuda_error)  # a real one is reported
    assert not absent.filter(reset) and not attached.filter(reset)
    other = _record("jax._src.xla_bridge", logging.WARNING, "An NVIDIA GPU may be present")
    assert absent.filter(other)


def test_uvicorn_cancel_is_dropped_only_when_nothing_was_cancelled():
    drop = logs._DropCleanCancel()
    msg = "Cancel %s running task(s), timeout graceful shutdown exceeded"
    assert not drop.filter(_record("uvicorn.error", logging.ERROR, msg, 0))
    assert drop.filter(_record("uvicorn.error", logging.ERROR, msg, 2))


def test_platform_guess_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert logs.platform_guess() == "tpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert logs.platform_guess() == "cpu"


def test_progress_logs_lines_when_stderr_is_not_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    clock = iter(range(0, 1000, 4))  # each reading of the clock is 4 s later
    monkeypatch.setattr("jaxserve.progress.time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger=__name__):
        bar = progress(range(10), desc="Compiling buckets", unit="bucket", every=10.0)
        assert isinstance(bar, LogProgress)
        assert list(bar) == list(range(10))
    lines = [r.getMessage() for r in caplog.records if r.name == __name__]
    assert lines and all(line.startswith("Compiling buckets: ") for line in lines)
    assert lines[-1].startswith("Compiling buckets: 10/10 buckets (100%)")
    assert 2 <= len(lines) <= 5  # periodic, not one per step


def test_quick_progress_logs_nothing(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO):
        with progress(total=3, desc="Loading weights", unit="tensor") as bar:
            for _ in range(3):
                bar.update(1)
        list(progress([1, 2], desc="x", disable=True))
    assert not [r for r in caplog.records if "Loading weights" in r.getMessage()]


@pytest.mark.skipif(not os.isatty(2), reason="stderr is not a terminal")
def test_progress_is_a_bar_on_a_terminal():
    from tqdm.auto import tqdm

    assert isinstance(progress(total=1, desc="x"), tqdm)
