"""Offline throughput of jaxserve's `LLM.generate`, after `vllm bench throughput`.

    python scripts/bench_offline.py --num-prompts 64 --input-len 128 --output-len 128 \
        --max-num-seqs 32 --peer hf,vllm --json results.json

N prompts of random token ids (fixed seed, no special tokens), `ignore_eos=True`,
`max_tokens=output_len`, temperature 1.0 unless `--temperature`, all given to one
`LLM.generate`; that call is the timed region (start-up, the engine's load and compile, is timed and
reported apart). It prints vLLM's lines (`Throughput: X requests/s, Y total tokens/s, Z output
tokens/s`, `Total num prompt tokens:`, `Total num output tokens:`), then a single-request run:
TPOT = (t_N - t_1) / (N - 1) from one prompt generating N tokens and one generating 1.

Peers, run one after the other after jaxserve, each in its own process (scripts/peers.py), on the
same prompts: `--peer hf` (transformers `generate` in static batches of `--max-num-seqs`) and
`--peer vllm` (vLLM's CPU build, offline `vllm.LLM.generate`, on the model written as an HF folder).
The peers are optional extras for measuring, never dependencies of jaxserve. See scripts/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # the sibling module, found through the line above

PEERS = ("hf", "vllm")
DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
PAGE = 16  # --max-model-len defaults to input + output rounded up to a multiple of this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=None, help="model (default: jaxserve's default model)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="default: jaxserve's own default, then passed on to the peers",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help=f"default: input + output rounded up to a multiple of {PAGE}",
    )
    p.add_argument("--dtype", default="auto", help="jaxserve's --dtype (auto: float32 on CPU)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="jaxserve's --kv-cache-dtype (auto: the compute dtype; bfloat16 halves "
                        "the attention's bytes)")
    p.add_argument("--seed", type=int, default=0, help="for the prompts and the engines")
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="requests run before the timed region, not timed (0: none)",
    )
    p.add_argument(
        "--single",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a single request for TPOT",
    )
    p.add_argument(
        "--single-repeats",
        type=int,
        default=3,
        help="runs of each single-request length; their medians give TPOT",
    )
    p.add_argument("--skip-jaxserve", action="store_true", help="run only the peers")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="{none,hf,vllm}",
        help="a peer to run after jaxserve; repeat it or give a comma list",
    )
    p.add_argument(
        "--peer-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="torch dtype of the hf peer",
    )
    p.add_argument(
        "--peer-threads", type=int, default=os.cpu_count(), help="torch threads of the hf peer"
    )
    p.add_argument("--vllm-dtype", default="bfloat16", help="dtype of the vllm peer")
    p.add_argument(
        "--vllm-python",
        default=None,
        help=f"python with vLLM (default: {DEFAULT_VLLM_PYTHON} if it exists, else this python)",
    )
    p.add_argument(
        "--peer-model-dir",
        default=None,
        help="where the vllm peer's HF folder of a GGUF model is written (default: "
        "~/.cache/jaxserve/hf-export/<model>); reused when already there",
    )
    p.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds per peer")
    p.add_argument(
        "--json",
        "--output-json",
        dest="json",
        default=None,
        metavar="OUT",
        help="write the results, the command line and the machine here",
    )
    args = p.parse_args(argv)
    chosen = [name.strip() for value in args.peer for name in value.split(",") if name.strip()]
    bad = sorted(set(chosen) - {"none", *PEERS})
    if bad:
        p.error(f"--peer takes none, hf or vllm, got {bad}")
    args.peer = list(dict.fromkeys(n for n in chosen if n != "none"))
    for name in ("num_prompts", "input_len", "output_len", "max_num_seqs", "single_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_model_len is None:
        args.max_model_len = -(-(args.input_len + args.output_len) // PAGE) * PAGE
    if args.input_len + args.output_len > args.max_model_len:
        p.error(
            f"--input-len + --output-len ({args.input_len + args.output_len}) exceeds "
            f"--max-model-len {args.max_model_len}"
        )
    if args.vllm_python is None:
        args.vllm_python = (
            DEFAULT_VLLM_PYTHON if os.path.exists(DEFAULT_VLLM_PYTHON) else sys.executable
        )
    return args


# ----- prompts -------------------------------------------------------------------------------
def make_prompts(args: argparse.Namespace, vocab_size: int, tokenizer) -> dict[str, Any]:
    """Random token-id prompts from `args.seed`: the timed ones first, so that they do not
    depend on --warmup or --single-repeats; every prompt distinct (no prefix-cache hits)."""
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(min(vocab_size, len(tokenizer))) if i not in special])
    rng = np.random.default_rng(args.seed)

    def draw(n: int) -> list[list[int]]:
        return rng.choice(allowed, size=(n, args.input_len)).tolist()

    singles = 2 * args.single_repeats if args.single else 0
    return {
        "prompts": draw(args.num_prompts),
        "warmup_prompts": draw(args.warmup),
        "single_prompts": draw(singles),
        "warmup_output_len": args.output_len,
    }


# ----- systems -------------------------------------------------------------------------------
def run_jaxserve(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    import jax

    import jaxserve
    from jaxserve import LLM, SamplingParams

    peers.log("jaxserve: building the engine (load + compile)")
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    startup = time.perf_counter() - start
    engine = llm.engine
    compiled = engine.runner.num_compiled

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        params = SamplingParams(
            temperature=args.temperature, top_p=1.0, ignore_eos=True, max_tokens=max_tokens
        )
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    result = peers.run_benchmark(generate, spec)
    result.update(
        name="jaxserve", startup_s=startup, dtype=str(np.dtype(engine.dtype)),
        kv_cache_dtype=str(np.dtype(engine.runner.kv_cache.dtype)),
        max_num_batched_tokens=engine.scheduler_config.max_num_batched_tokens,
        kv_pages=engine.runner.num_pages, buckets=list(engine.runner.buckets),
        recompiles=engine.runner.num_compiled - compiled,
        versions={"jaxserve": jaxserve.__version__, "jax": jax.__version__},
    )  # fmt: skip
    return result  # the engine goes with this frame; main() collects it before the peers


def run_peer(
    kind: str, args: argparse.Namespace, spec: dict[str, Any], source
) -> dict[str, Any] | None:
    """Run peer `kind` in its own process; None (with the reason on stderr) if it cannot run."""
    python = sys.executable
    env = dict(os.environ)
    spec = dict(
        spec, hf_dtype=args.peer_dtype, hf_threads=args.peer_threads, vllm_dtype=args.vllm_dtype
    )
    if kind == "vllm":
        python = args.vllm_python
        if not _has_vllm(python):
            print(peers.VLLM_INSTALL.format(python=python), file=sys.stderr)
            print("Skipping the vllm peer.", file=sys.stderr)
            return None
        env.update({k: v for k, v in peers.VLLM_ENV.items() if k not in env})
        spec["hf_folder"] = str(hf_folder(args, source))
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        cmd = [python, os.path.abspath(peers.__file__), kind, spec_path, out_path]
        peers.log(f"{kind}: {shlex.join(cmd)}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, check=False, env=env, stdout=sys.stderr, timeout=args.peer_timeout
            )
        except subprocess.TimeoutExpired:
            print(
                f"The {kind} peer ran past --peer-timeout {args.peer_timeout:.0f} s: skipped.",
                file=sys.stderr,
            )
            return None
        if proc.returncode != 0 or not os.path.exists(out_path):
            print(
                f"The {kind} peer failed (exit status {proc.returncode}): skipped; its "
                "output is above.",
                file=sys.stderr,
            )
            return None
        with open(out_path) as f:
            result = json.load(f)
    result["process_s"] = time.perf_counter() - start
    return result


def _has_vllm(python: str) -> bool:
    check = (
        "import importlib.metadata as m, importlib.util as u; m.version('vllm'); "
        "assert u.find_spec('vllm')"
    )
    try:
        proc = subprocess.run([python, "-c", check], check=False, capture_output=True)
    except OSError:
        return False
    return proc.returncode == 0


def hf_folder(args: argparse.Namespace, source) -> Path:
    """The model as an HF folder: itself, or the GGUF written out once by `export_hf_folder`."""
    from jaxserve.models.source import export_hf_folder

    if source.format == "hf":
        return Path(source.path)
    gguf = Path(source.path)
    out = Path(args.peer_model_dir or Path.home() / ".cache" / "jaxserve" / "hf-export" / gguf.stem)
    done = out / "model.safetensors"
    if (
        (out / "config.json").is_file()
        and done.is_file()
        and done.stat().st_mtime >= gguf.stat().st_mtime
    ):
        return out
    peers.log(f"writing {gguf.name} as an HF folder in {out}")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    export_hf_folder(source, tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----- report --------------------------------------------------------------------------------
def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n=== {r['name']} (dtype {r.get('dtype')}; start-up {r['startup_s']:.1f} s, "
        f"timed region {r['elapsed_s']:.2f} s) ==="
    )
    print("\n".join(peers.throughput_lines(r)))
    if "warning" in r:
        print(f"WARNING: {r['warning']}")
    if r.get("recompiles"):
        print(f"WARNING: {r['recompiles']} executables compiled after start-up")
    if "single" in r:
        s = r["single"]
        print(
            f"Single request ({args.input_len} in, {s['output_len']} out): median TPOT "
            f"{s['tpot_ms']:.2f} ms, time to 1 token {s['ttft_ms']:.1f} ms"
        )


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "processor": platform.processor(), "machine": platform.machine(),
        "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "platform": platform.platform(), "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }  # fmt: skip
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(
                ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")
            )
        with open("/proc/meminfo") as f:
            info["mem_total"] = next(
                ln.split(":", 1)[1].strip() for ln in f if ln.startswith("MemTotal")
            )
    except (OSError, StopIteration):
        pass
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as e:  # noqa: BLE001 - machine info is best effort
        info["jax_backend"] = f"unavailable: {e}"
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from jaxserve.models.source import resolve_model

    command = shlex.join([sys.executable, *sys.argv])
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    spec = make_prompts(args, int(source.hf_config["vocab_size"]), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spec.update(
        output_len=args.output_len, temperature=args.temperature, seed=args.seed,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, model_path=source.path, pad_token_id=pad,
    )  # fmt: skip
    machine = machine_info()
    results: dict[str, dict[str, Any]] = {}
    if not args.skip_jaxserve:
        results["jaxserve"] = run_jaxserve(args, spec)
        gc.collect()  # free the engine's weights and KV cache before a peer starts
        report(results["jaxserve"], args)
        if spec["max_num_batched_tokens"] is None:
            spec["max_num_batched_tokens"] = results["jaxserve"]["max_num_batched_tokens"]
    if spec["max_num_batched_tokens"] is None:
        spec["max_num_batched_tokens"] = max(512, args.max_num_seqs)  # jaxserve's CPU default
    for kind in args.peer:
        result = run_peer(kind, args, spec, source)
        if result is not None:
            results[kind] = result
            report(result, args)
    ratios = {}
    if "jaxserve" in results:
        ours = results["jaxserve"]
        for kind in args.peer:
            if kind not in results:
                continue
            theirs = peers.rates(results[kind])
            ratios[kind] = {
                k: v / theirs[k] for k, v in peers.rates(ours).items() if k.endswith("_per_second")
            }
            line = (
                f"jaxserve / {kind}: {ratios[kind]['output_tokens_per_second']:.2f}x "
                "output tokens/s"
            )
            if "single" in ours and "single" in results[kind]:
                a, b = ours["single"]["tpot_ms"], results[kind]["single"]["tpot_ms"]
                ratios[kind]["tpot"] = a / b
                line += f"; single-request TPOT {a:.2f} ms vs {b:.2f} ms"
            print(line)
    machine["loadavg_end"] = os.getloadavg()
    for r in results.values():
        r.update(peers.rates(r))
    if args.json:
        out = {
            "command": command,
            "date": date,
            "machine": machine,
            "args": vars(args),
            "results": results,
            "ratios_jaxserve_over_peer": ratios,
        }
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
