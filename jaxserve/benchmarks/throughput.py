"""`jaxserve bench throughput`: offline throughput of `LLM.generate`, after `vllm bench
throughput`, with the offline peers (`--peer hf`, `--peer vllm`) on the same prompts.
`scripts/bench_offline.py` runs this same code.

N prompts (the random or ShareGPT dataset, as token ids), `ignore_eos=True`, `max_tokens` = each
request's output length, temperature 1.0 unless `--temperature`, all given to one `generate`: that
call is the timed region (start-up, the engine's load and compile, is timed and reported apart).
It prints vLLM's lines, then (`--single`) a single-request run: TPOT = (t_N - t_1) / (N - 1).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from jaxserve.benchmarks import common, peers
from jaxserve.benchmarks.datasets import build_requests, length_range

logger = logging.getLogger(__name__)

PAGE = 16  # --max-model-len defaults to the longest request rounded up to a multiple of this


def add_bench_throughput_args(p: argparse.ArgumentParser) -> None:
    """Dataset, measuring and peer flags, then one flag per `EngineArgs` field."""
    from jaxserve.cli import _add_engine_args

    p.add_argument("--dataset-name", choices=("random", "sharegpt"), default="random")
    p.add_argument("--dataset-path", help="ShareGPT-format JSON file (--dataset-name sharegpt)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128,
                   help="output length (for ShareGPT too, where it replaces the gpt turn's)")
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests first (0: none)")
    p.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                   help="also time single requests for TPOT")
    p.add_argument("--single-repeats", type=int, default=3)
    p.add_argument("--skip-jaxserve", action="store_true", help="run only the peers")
    p.add_argument("--peer", action="append", default=[], metavar="{none,hf,vllm}",
                   help="a peer run after jaxserve; repeat it or give a comma list")
    p.add_argument("--peer-dtype", "--vllm-dtype", dest="peer_dtype", default="bfloat16",
                   help="dtype of the vllm peer")
    p.add_argument("--hf-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="torch dtype of the hf peer")
    p.add_argument("--peer-threads", type=int, default=os.cpu_count(),
                   help="torch threads of the hf peer")
    p.add_argument("--vllm-python", default=None,
                   help=f"Python with vLLM (default: {common.DEFAULT_VLLM_PYTHON} if it exists)")
    p.add_argument("--peer-model-dir", default=None,
                   help="where a GGUF model is exported as an HF folder for vLLM")
    p.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds per peer")
    p.add_argument("--output-json", "--json", dest="output_json", metavar="OUT",
                   help="write the results, the command line and the machine here")
    _add_engine_args(p)
    p.set_defaults(max_num_seqs=32)


def check_args(ns: argparse.Namespace) -> None:
    """Validate in place; ValueError names the flag."""
    chosen = [n.strip() for value in ns.peer for n in value.split(",") if n.strip()]
    bad = sorted(set(chosen) - {"none", "hf", "vllm"})
    if bad:
        raise ValueError(f"--peer takes none, hf or vllm, got {bad}")
    ns.peer = list(dict.fromkeys(n for n in chosen if n != "none"))
    for name in ("num_prompts", "input_len", "output_len", "max_num_seqs", "single_repeats"):
        if getattr(ns, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    longest = (length_range(ns.input_len, ns.random_range_ratio)[1] + ns.random_prefix_len
               + length_range(ns.output_len, ns.random_range_ratio)[1])
    if ns.max_model_len is None and ns.dataset_name == "random":
        ns.max_model_len = -(-longest // PAGE) * PAGE
    if ns.vllm_python is None:
        ns.vllm_python = common.default_vllm_python()


def make_spec(ns: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """The timed prompts (token ids) and output lengths; warm-up and single-request prompts are
    drawn with other seeds, so the timed ones do not depend on --warmup or --single-repeats."""
    def draw(n: int, seed: int) -> list:
        return build_requests(tokenizer, dataset_name=ns.dataset_name, num_prompts=n,
                              input_len=ns.input_len, output_len=ns.output_len,
                              range_ratio=ns.random_range_ratio, prefix_len=ns.random_prefix_len,
                              dataset_path=ns.dataset_path, sharegpt_output_len=ns.output_len,
                              seed=seed) if n else []

    timed = draw(ns.num_prompts, ns.seed)
    lens = [s.output_len for s in timed]
    spec: dict[str, Any] = {
        "prompts": [s.prompt_token_ids for s in timed], "output_len": ns.output_len,
        "warmup_prompts": [s.prompt_token_ids for s in draw(ns.warmup, ns.seed + 1)],
        "warmup_output_len": ns.output_len,
        "single_prompts": [s.prompt_token_ids
                           for s in draw(2 * ns.single_repeats if ns.single else 0, ns.seed + 2)],
    }  # fmt: skip
    if set(lens) != {ns.output_len}:
        spec["output_lens"] = lens
    return spec


def run_jaxserve(ns: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Build `LLM` from the engine flags (the start-up), then the harness on it."""
    import dataclasses

    import jax
    import numpy as np

    import jaxserve
    from jaxserve import LLM, SamplingParams
    from jaxserve.cli import _engine_args

    peers.log("jaxserve: building the engine (load + compile)")
    start = time.perf_counter()
    llm = LLM(**dataclasses.asdict(_engine_args(ns)))
    startup = time.perf_counter() - start
    engine = llm.engine
    runners = [r.runner for r in engine.replicas]  # one per data-parallel replica
    compiled = sum(r.num_compiled for r in runners)

    def generate(prompts: list[list[int]], max_tokens: int | list[int]) -> list[int]:
        lens = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else max_tokens
        params = [SamplingParams(temperature=ns.temperature, top_p=1.0, ignore_eos=True,
                                 max_tokens=n) for n in lens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    result = peers.run_benchmark(generate, spec)
    result.update(
        name="jaxserve", startup_s=startup, dtype=str(np.dtype(engine.dtype)),
        kv_cache_dtype=str(np.dtype(engine.runner.kv_cache.dtype)),
        max_num_batched_tokens=engine.scheduler_config.max_num_batched_tokens,
        kv_pages=sum(r.num_pages for r in runners), buckets=list(engine.runner.buckets),
        recompiles=sum(r.num_compiled for r in runners) - compiled,
        versions={"jaxserve": jaxserve.__version__, "jax": jax.__version__},
    )  # fmt: skip
    return result


def run_offline_peer(kind: str, ns: argparse.Namespace, spec: dict[str, Any], source
                     ) -> dict[str, Any] | None:
    """Peer `kind` in its own process on `spec`; None (the reason on stderr) if it cannot run."""
    spec = dict(spec, hf_dtype=ns.hf_dtype, hf_threads=ns.peer_threads, vllm_dtype=ns.peer_dtype)
    python, env = sys.executable, dict(os.environ)
    if kind == "hf" and spec.get("output_lens"):
        print("The hf peer runs static batches of one output length: skipped (give "
              "--random-range-ratio 0 and the random dataset).", file=sys.stderr)
        return None
    if kind == "vllm":
        python = ns.vllm_python
        if not common.has_vllm(python):
            print(common.vllm_missing_message(python), file=sys.stderr)
            return None
        env = {**common.VLLM_ENV_DEFAULTS, **env}
        spec["hf_folder"] = str(common.hf_folder(source, ns.peer_model_dir))
    return common.run_peer(kind, spec, python, ns.peer_timeout, env)


def report(r: dict[str, Any], input_len: int) -> None:
    print(f"\n=== {r['name']} (dtype {r.get('dtype')}; start-up {r['startup_s']:.1f} s, "
          f"timed region {r['elapsed_s']:.2f} s) ===")
    print("\n".join(peers.throughput_lines(r)))
    if "warning" in r:
        print(f"WARNING: {r['warning']}")
    if r.get("recompiles"):
        print(f"WARNING: {r['recompiles']} executables compiled after start-up")
    if "single" in r:
        s = r["single"]
        print(f"Single request ({input_len} in, {s['output_len']} out): median TPOT "
              f"{s['tpot_ms']:.2f} ms, time to 1 token {s['ttft_ms']:.1f} ms")


def run_bench_throughput(ns: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The whole offline benchmark; results to stdout, progress to stderr."""
    from jaxserve.models.source import resolve_model

    check_args(ns)
    command = shlex.join([sys.executable, *sys.argv] if argv is None else argv)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    source = resolve_model(ns.model, download_dir=ns.download_dir, revision=ns.revision)
    tokenizer = source.load_tokenizer(ns.tokenizer)
    spec = make_spec(ns, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spec.update(
        temperature=ns.temperature, seed=ns.seed, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, pad_token_id=pad,
        max_model_len=ns.max_model_len or int(source.hf_config.get("max_position_embeddings",
                                                                   2048)),
        model_path=source.path,
    )  # fmt: skip
    machine = common.machine_info()
    results: dict[str, dict[str, Any]] = {}
    if not ns.skip_jaxserve:
        results["jaxserve"] = run_jaxserve(ns, spec)
        gc.collect()  # free the engine's weights and KV cache before a peer starts
        report(results["jaxserve"], ns.input_len)
        if spec["max_num_batched_tokens"] is None:
            spec["max_num_batched_tokens"] = results["jaxserve"]["max_num_batched_tokens"]
    if spec["max_num_batched_tokens"] is None:
        spec["max_num_batched_tokens"] = max(512, ns.max_num_seqs)  # jaxserve's CPU default
    for kind in ns.peer:
        result = run_offline_peer(kind, ns, spec, source)
        if result is not None:
            results[kind] = result
            report(result, ns.input_len)
    ratios = {}
    for kind in (k for k in ns.peer if k in results and "jaxserve" in results):
        ours, theirs = peers.rates(results["jaxserve"]), peers.rates(results[kind])
        ratios[kind] = {k: v / theirs[k] for k, v in ours.items() if k.endswith("_per_second")}
        line = f"jaxserve / {kind}: {ratios[kind]['output_tokens_per_second']:.2f}x output tokens/s"
        if "single" in results["jaxserve"] and "single" in results[kind]:
            a, b = results["jaxserve"]["single"]["tpot_ms"], results[kind]["single"]["tpot_ms"]
            ratios[kind]["tpot"] = a / b
            line += f"; single-request TPOT {a:.2f} ms vs {b:.2f} ms"
        print(line)
    machine["loadavg_end"] = os.getloadavg()
    for r in results.values():
        r.update(peers.rates(r))
    if ns.output_json:
        out = {"command": command, "date": date, "machine": machine,
               "args": {k: v for k, v in vars(ns).items() if k != "func"}, "results": results,
               "ratios_jaxserve_over_peer": ratios}
        Path(ns.output_json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"\nwrote {ns.output_json}")
    return 0
