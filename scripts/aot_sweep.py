"""Compile the attention kernels for every kernel shape on every compile target, deviceless.

    python scripts/aot_sweep.py                      # every target, every case (~1 hour on 2 cores)
    python scripts/aot_sweep.py --targets v6e-1 h100 --covering   # the all-pairs subset

Cases (`jaxserve.kernels_pallas.aot.sweep_cases`): cache dtype x head dim x GQA ratio x page size
on one chip of each target, the other dimensions rotating; plus one KV head per shard under
tensor parallelism (`tp_cases`) on 4-chip TPU slices and two H100s. Each runs in a child process
(`aot_runner`), so a compiler abort costs one case, not the sweep. Prints a table (case, compile
seconds, status) and writes the results as JSON (default docs/results/aot_sweep.json) after every
case, so an interrupted sweep keeps what it did. Needs libtpu (`jax[tpu]`) and the CUDA plugin
with ptxas (`jax-cuda12-plugin`, `nvidia-cuda-nvcc-cu12`) at the installed jax's version.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

from jaxserve.engine.targets import plugin_versions
from jaxserve.kernels_pallas import aot, aot_runner

SINGLE = ("v5e-1", "v6e-1", "v5p-8", "h100")
TP = {"v5e-4": 4, "v6e-4": 4, "v5p-8": 4, "h100x2": 2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="*", default=list(dict.fromkeys([*SINGLE, *TP])),
                        help="targets to compile for (one-chip sweeps; the TP ones get tp cases)")
    parser.add_argument("--covering", action="store_true",
                        help="the all-pairs subset instead of the full cross product")
    parser.add_argument("--out", default=os.path.join("docs", "results", "aot_sweep.json"))
    parser.add_argument("--case-timeout", type=float, default=600.0)
    parser.add_argument("--resume", action="store_true",
                        help="keep the ok results already in --out; compile the other cases")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print markdown tables of saved results instead of compiling")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0

    cases = []
    for target in dict.fromkeys(args.targets):
        if target in SINGLE:
            cases += aot.covering_cases(target) if args.covering else aot.sweep_cases(target)
        if target in TP:
            cases += aot.tp_cases(target, TP[target])
    import jax

    meta = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor()}",
            "jax": jax.__version__, "plugins": plugin_versions(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            results = [aot_runner.Result(aot.KernelCase.from_json(d["case"]), d["status"],
                                         d["seconds"], d["error"]) for d in json.load(f)["results"]
                       if d["status"] == "ok"]
        done = {r.case for r in results}
        cases = [c for c in cases if c not in done]
    start = time.perf_counter()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    total = len(results) + len(cases)

    def on_result(r: aot_runner.Result) -> None:
        results.append(r)
        secs = f"{r.seconds:7.2f}" if r.seconds is not None else "      -"
        first = next((ln for ln in r.error.splitlines() if ln.strip()), "")
        print(f"[{len(results)}/{total}] {r.case.name}  {secs}  {r.status}  {first[:160]}",
              flush=True)
        with open(args.out, "w") as f:
            json.dump({**meta, "wall_seconds": round(time.perf_counter() - start, 1),
                       "results": [x.to_json() for x in results]}, f)

    aot_runner.run_cases(cases, case_timeout=args.case_timeout, on_result=on_result)
    print()
    print(aot_runner.summary(results))
    counts = collections.Counter((r.case.target, r.status) for r in results)
    print()
    for target in dict.fromkeys(r.case.target for r in results):
        ok = [r.seconds for r in results if r.case.target == target and r.status == "ok"]
        line = ", ".join(f"{s} {n}" for (t, s), n in sorted(counts.items()) if t == target)
        mean = (f"; compile {min(ok):.1f}-{max(ok):.1f} s, mean {sum(ok) / len(ok):.2f} s"
                if ok else "")
        print(f"{target}: {line}{mean}")
    print(f"wall {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0 if all(r.status == "ok" for r in results) else 1


def summarize(paths: list[str]) -> str:
    """Markdown: per target the counts and compile seconds, then mean seconds per target and
    cache dtype, and per target and head dim; then every case that did not compile."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)["results"]
    targets = list(dict.fromkeys(r["case"]["target"] for r in rows))

    def stats(sel):
        ok = [r["seconds"] for r in sel if r["status"] == "ok"]
        return (f"{sum(ok) / len(ok):.2f}", f"{min(ok):.2f}-{max(ok):.2f}") if ok else ("-", "-")

    out = ["| target | cases | ok | not ok | compile s, mean | min-max |",
           "|---|---|---|---|---|---|"]
    for t in targets:
        sel = [r for r in rows if r["case"]["target"] == t]
        ok = sum(r["status"] == "ok" for r in sel)
        out.append(f"| {t} | {len(sel)} | {ok} | {len(sel) - ok} | "
                   + " | ".join(stats(sel)) + " |")
    for key, values in (("cache_dtype", aot.CACHE_DTYPES), ("head_dim", aot.HEAD_DIMS)):
        out += ["", f"| mean compile s by {key} | " + " | ".join(map(str, values)) + " |",
                "|---|" + "---|" * len(values)]
        for t in targets:
            cells = [stats([r for r in rows if r["case"]["target"] == t
                            and r["case"][key] == v])[0] for v in values]
            out.append(f"| {t} | " + " | ".join(cells) + " |")
    bad = [r for r in rows if r["status"] != "ok"]
    out += ["", f"Not compiled: {len(bad)}"] + [
        f"- {r['name']}: {r['status']}: {r['error'].splitlines()[0][:200] if r['error'] else ''}"
        for r in bad]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
