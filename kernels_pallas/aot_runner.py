"""Compile many `aot.KernelCase`s in child processes, surviving compiler aborts.

A compiler failure can kill the process (libtpu's `Check failed` is a SIGABRT), so cases run in
a child (`python -m jaxserve.kernels_pallas.aot_runner CASES.json`) that compiles them one after
the other and writes one result line per case on stdout as it finishes. The parent reads those
lines as they come. When the child dies before a case's line, that case is recorded as an abort
(with the signal and the last lines of the child's stderr) and a new child takes the cases after
it; a case that runs past `case_timeout` is killed and recorded the same way.

Statuses: `ok`, `failed` (the compiler or the kernel raised: the message is kept), `abort` (the
process died), `timeout`, `missing` (the target's compiler plugin is not installed).
`JAXSERVE_AOT_ABORT_ON=<case name>` makes a child abort on that case (tests of the runner).
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable

from jaxserve.kernels_pallas.aot import KernelCase

_MARK = "AOT_RESULT "
# libtpu and the CUDA plugin need these on a machine without their hardware; several processes
# may load libtpu at once (its lockfile otherwise lets only one).
CHILD_ENV = {"TPU_SKIP_MDS_QUERY": "1", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "JAX_PLATFORMS": "cpu"}


@dataclasses.dataclass
class Result:
    case: KernelCase
    status: str  # ok | failed | abort | timeout | missing
    seconds: float | None = None  # the compile's, for ok
    error: str = ""

    def to_json(self) -> dict:
        return {"name": self.case.name, "case": self.case.to_json(), "status": self.status,
                "seconds": self.seconds, "error": self.error}


def run_cases(cases: Iterable[KernelCase], *, case_timeout: float = 300.0,
              on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Compile every case in child processes; returns one `Result` per case, in order."""
    pending = list(cases)
    results: list[Result] = []
    while pending:
        done = _run_child(pending, case_timeout, on_result)
        results += done
        pending = pending[len(done):]
    return results


def _run_child(cases: list[KernelCase], case_timeout: float, on_result) -> list[Result]:
    """One child over `cases`; returns the results up to and including the case it died on."""
    results: list[Result] = []

    def record(result: Result) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    with tempfile.TemporaryDirectory(prefix="jaxserve-aot-") as tmp:
        spec = os.path.join(tmp, "cases.json")
        with open(spec, "w") as f:
            json.dump([c.to_json() for c in cases], f)
        err_path = os.path.join(tmp, "stderr")
        with open(err_path, "wb") as err:
            child = subprocess.Popen(
                [sys.executable, "-m", "jaxserve.kernels_pallas.aot_runner", spec],
                stdout=subprocess.PIPE, stderr=err, env={**os.environ, **CHILD_ENV})
            sel = selectors.DefaultSelector()
            sel.register(child.stdout, selectors.EVENT_READ)
            buf = b""
            deadline = time.monotonic() + case_timeout
            timed_out = False
            while len(results) < len(cases):
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        child.kill()
                        timed_out = True
                        break
                    continue
                chunk = os.read(child.stdout.fileno(), 1 << 16)
                if not chunk:  # the child exited
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace")
                    if text.startswith(_MARK):
                        d = json.loads(text[len(_MARK):])
                        record(Result(cases[len(results)], d["status"], d.get("seconds"),
                                      d.get("error", "")))
                        deadline = time.monotonic() + case_timeout
            sel.close()
            child.stdout.close()
            code = child.wait()
        if len(results) < len(cases):
            with open(err_path, "rb") as f:
                tail = f.read()[-4000:].decode(errors="replace").strip().splitlines()[-12:]
            if timed_out:
                status, why = "timeout", f"killed after {case_timeout:.0f} s"
            else:
                status = "abort"
                why = (f"killed by {signal.Signals(-code).name}" if code < 0
                       else f"child exited with status {code}")
            record(Result(cases[len(results)], status, None, why + "\n" + "\n".join(tail)))
    return results


def _child(spec_path: str) -> None:
    from jaxserve.engine.targets import PluginMissing
    from jaxserve.kernels_pallas.aot import compile_case

    with open(spec_path) as f:
        cases = [KernelCase.from_json(d) for d in json.load(f)]
    # NOTE: fault injection for the runner's own tests: abort the child on the case so named.
    abort_on = os.environ.get("JAXSERVE_AOT_ABORT_ON")
    for case in cases:
        if case.name == abort_on:
            os.abort()
        try:
            d = {"status": "ok", "seconds": round(compile_case(case), 3)}
        except PluginMissing as e:
            d = {"status": "missing", "error": str(e)}
        except Exception as e:  # noqa: BLE001 - every failure is a result to report
            msg = "".join(traceback.format_exception_only(e)).strip()
            d = {"status": "failed", "error": msg[:2000]}
        sys.stdout.write(_MARK + json.dumps(d) + "\n")
        sys.stdout.flush()


def summary(results: list[Result]) -> str:
    """A table: case, compile seconds, status; failures' first error line."""
    width = max((len(r.case.name) for r in results), default=10)
    lines = [f"{'case':<{width}}  {'seconds':>7}  status"]
    for r in results:
        secs = f"{r.seconds:7.2f}" if r.seconds is not None else "      -"
        lines.append(f"{r.case.name:<{width}}  {secs}  {r.status}")
        if r.status != "ok":
            first = next((ln for ln in r.error.splitlines() if ln.strip()), "")
            lines.append(f"{'':<{width}}    {first[:200]}")
    return "\n".join(lines)


if __name__ == "__main__":
    _child(sys.argv[1])
