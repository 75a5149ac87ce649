"""The engine step compiled for TPU slices and NVIDIA GPUs without them: every bucket, the memory
plan and the compile time per (model, target, flags), through `jaxserve compile` (one process
each, so a compiler abort costs one row). Results go to a JSON file (docs/results/ by default).

    python scripts/compile_sweep.py                     # the recorded sweep
    python scripts/compile_sweep.py --only h100 --out /tmp/sweep.json

Needs the `aot` extra (libtpu, the CUDA plugin and ptxas). Models are the config folders in
tests/data/configs (no weights are read).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "data", "configs")

# (model folder, target, flags): the shapes users rent hardware for, at the engine's defaults
# on an accelerator (2048 tokens and 256 sequences per step) and an 8k context.
SWEEP = [
    ("llama-3-8b", "v5e-1", ()),
    ("llama-3-8b", "v5e-4", ("-tp", "4")),
    ("llama-3-8b", "v5e-8", ("-tp", "8")),
    ("llama-3-8b", "v6e-1", ()),
    ("llama-3-8b", "v6e-4", ("-tp", "4")),
    ("llama-3-8b", "v5p-8", ("-tp", "4")),
    ("llama-3-8b", "h100", ()),
    ("llama-3-8b", "h200", ()),
    ("qwen3-30b-a3b", "v5e-8", ("-tp", "8", "--enable-expert-parallel")),
    ("qwen3-30b-a3b", "v6e-4", ("-tp", "4")),
    ("qwen3-30b-a3b", "h100", ()),
    ("qwen3-30b-a3b", "h200", ()),
]
COMMON = ("--max-model-len", "8192")


def run_one(model: str, target: str, flags: tuple[str, ...], timeout: int,
            extra: tuple[str, ...] = ()) -> dict:
    flags = (*flags, *COMMON, *extra)
    cmd = [sys.executable, "-m", "jaxserve.cli", "compile", os.path.join(CONFIGS, model),
           "--target", target, *flags]
    env = {**os.environ, "JAXSERVE_EXECUTABLE_CACHE": "0"}
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, stdout, stderr = out.returncode, out.stdout, out.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", e.stdout or "", e.stderr or ""
    row = {"model": model, "target": target, "flags": " ".join(flags), "rc": rc,
           "wall_s": round(time.perf_counter() - start, 1)}
    for name in ("capacity", "weights", "activations", "logits/sampler", "KV cache", "total"):
        m = re.search(rf"^\s*{re.escape(name)}\s+([0-9.]+) GiB", stdout, re.M)
        if m:
            row[name.replace("/", "_").replace(" ", "_")] = float(m.group(1))
    m = re.search(r"compiled (\d+) executables for \S+ in ([0-9.]+) s", stdout)
    if m:
        row["executables"], row["compile_s"] = int(m.group(1)), float(m.group(2))
    m = re.search(r"\((\d+) pages of (\d+) tokens = (\d+) tokens", stdout)
    if m:
        row["kv_tokens"] = int(m.group(3))
    if rc != 0:
        row["why"] = (stdout.strip().splitlines() or stderr.strip().splitlines()[-1:] or [""])[0]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="targets or models containing this text")
    parser.add_argument("--rows", help="comma-separated row numbers of SWEEP to run (0-based)")
    parser.add_argument("--engine", default="", help="more `jaxserve serve` flags for every row, "
                        "e.g. \"--max-num-batched-tokens 512 --max-num-seqs 64\"")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--out", default=os.path.join(
        ROOT, "docs", "results", f"{datetime.date.today()}-compile-sweep.json"))
    ns = parser.parse_args()
    from jaxserve.engine.executable_cache import versions

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = re.search(r"Model name:\s*(.*)", lscpu)
    machine = {"cpu": cpu.group(1) if cpu else platform.machine(), "cores": os.cpu_count(),
               "python": sys.version.split()[0], **versions()}
    rows = []
    order = [int(i) for i in ns.rows.split(",")] if ns.rows else range(len(SWEEP))
    for i in order:
        model, target, flags = SWEEP[i]
        if ns.only and ns.only not in target and ns.only not in model:
            continue
        row = run_one(model, target, flags, ns.timeout, tuple(ns.engine.split()))
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(ns.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "machine": machine, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
