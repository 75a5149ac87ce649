"""Time the ragged paged attention backends on this platform, against its own measured peaks.

    python scripts/bench_kernels.py                      # the backends native to this platform
    python scripts/bench_kernels.py --backends ref,cpu --decode 16x1024 --prefill 2x512
    python scripts/bench_kernels.py --kv-cache-dtype bfloat16 --json out.json

Decode (one new token per sequence, default 64 sequences x 2048 context) is reported as achieved
bandwidth: bytes of K/V read (values and, for int8/fp8 caches, scales), plus q read, the new K/V
written and out written, over the kernel's time. Prefill (default 8 x 2048 new tokens, causal)
is reported as FLOP/s: 4 * heads * head_dim per (query, key) pair the causal mask keeps. Each is
also a fraction of the device's copy bandwidth (a jitted copy of a 1 GiB array: read + write)
and matmul rate (a jitted square matmul in the compute dtype), measured in the same run.

Pallas backends are timed only on their own platform (`tpu` on TPU, `gpu` on GPU): in
interpret mode on CPU they measure the interpreter, not the kernel. Shapes follow Llama-3-8B's
attention (32 query heads, 8 KV heads, head_dim 128) unless told otherwise; on CPU the defaults
are smaller (16 x 1024 decode, 2 x 512 prefill) so a run takes a minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.args import KV_CACHE_DTYPES
from jaxserve.kernels_pallas import (QuantizedKVCache, default_backend, default_page_size,
                                     init_kv_cache, is_quantized_dtype, ragged_paged_attention)
from jaxserve.kernels_pallas.quant import kv_bytes_per_token_head


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` over `repeats` runs after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(repeats: int) -> float:
    """Bytes/s of a jitted copy (read + write) of a 1 GiB array (256 MiB on CPU)."""
    nbytes = (256 << 20) if jax.default_backend() == "cpu" else (1 << 30)
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)  # a multiply XLA cannot elide
    return 2 * nbytes / timed(copy, x, repeats=repeats)


def matmul_rate(dtype, repeats: int) -> float:
    """FLOP/s of a jitted n x n x n matmul in `dtype` (n = 8192 on accelerators, 2048 on CPU)."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
    return 2 * n**3 / timed(mm, a, b, repeats=repeats)


def make_batch(num_seqs: int, q_len: int, context: int, *, num_heads: int, num_kv_heads: int,
               head_dim: int, page_size: int, dtype, kv_dtype, seed: int = 0):
    """Every sequence `context` long with its last `q_len` tokens new; pages shuffled."""
    pages_per_seq = -(-context // page_size)
    num_pages = num_seqs * pages_per_seq
    rng = np.random.default_rng(seed)
    T = num_seqs * q_len
    key = jax.random.key(seed)
    kq, kk, kv, kc = jax.random.split(key, 4)
    q = jax.random.normal(kq, (T, num_heads, head_dim), dtype)
    k = jax.random.normal(kk, (T, num_kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (T, num_kv_heads, head_dim), dtype)
    cache = init_kv_cache(num_pages, page_size, num_kv_heads, head_dim, kv_dtype)
    shape = (num_pages, page_size, 2 * num_kv_heads, head_dim)
    if isinstance(cache, QuantizedKVCache):
        cache = QuantizedKVCache(jax.random.randint(kc, shape, -100, 100).astype(kv_dtype),
                                 jnp.full(shape[:-1], 0.01, jnp.float32))
    else:
        cache = jax.random.normal(kc, shape, kv_dtype)
    pages = rng.permutation(num_pages).astype(np.int32)
    kv_lens = np.full(num_seqs, context, np.int32)
    cu = np.arange(num_seqs + 1, dtype=np.int32) * q_len
    decodes = num_seqs if q_len == 1 else 0
    dist = np.array([decodes, decodes, num_seqs], np.int32)
    return (q, k, v, cache, jnp.asarray(kv_lens), jnp.asarray(pages), jnp.asarray(cu),
            jnp.asarray(dist))


def decode_bytes(num_seqs, context, *, num_heads, num_kv_heads, head_dim, dtype, kv_dtype) -> int:
    kv_read = num_seqs * context * 2 * num_kv_heads * kv_bytes_per_token_head(head_dim, kv_dtype)
    itemsize = jnp.dtype(dtype).itemsize
    q_and_out = 2 * num_seqs * num_heads * head_dim * itemsize
    new_kv = num_seqs * 2 * num_kv_heads * kv_bytes_per_token_head(head_dim, kv_dtype)
    return kv_read + q_and_out + new_kv


def prefill_flops(num_seqs, q_len, context, *, num_heads, head_dim) -> int:
    """4 * N * H per (query, key) pair under the causal mask (QK^T and PV, 2 FLOPs a MAC)."""
    start = context - q_len
    pairs = sum(start + i + 1 for i in range(q_len))
    return 4 * num_heads * head_dim * pairs * num_seqs


def parse_shape(text: str) -> tuple[int, int]:
    a, b = text.lower().split("x")
    return int(a), int(b)


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: ref and this platform's kernel)")
    p.add_argument("--decode", type=parse_shape, default=(16, 1024) if on_cpu else (64, 2048),
                   help="SEQSxCONTEXT of the decode batch")
    p.add_argument("--prefill", type=parse_shape, default=(2, 512) if on_cpu else (8, 2048),
                   help="SEQSxTOKENS of the prefill batch")
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=None, help="default: the backend's own")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   default="float32" if on_cpu else "bfloat16")
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                   help="default: --dtype")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    dtype = KV_CACHE_DTYPES[args.dtype]
    kv_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype or args.dtype]
    native = default_backend()
    backends = args.backends.split(",") if args.backends else ["ref", native]
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform}: {device.device_kind} "
          f"({len(jax.devices())} devices, host {platform.node()})")
    bandwidth = copy_bandwidth(args.repeats)
    flops_peak = matmul_rate(dtype, args.repeats)
    print(f"measured peaks: copy {bandwidth / 1e9:.1f} GB/s, {args.dtype} matmul "
          f"{flops_peak / 1e12:.2f} TFLOP/s")
    heads = dict(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim)
    results = {"device": device.device_kind, "platform": device.platform,
               "jax": jax.__version__, "args": vars(args), "copy_bytes_per_s": bandwidth,
               "matmul_flops_per_s": flops_peak, "backends": {}}
    for backend in backends:
        if backend in ("tpu", "gpu") and backend != native:
            print(f"{backend}: skipped (a Pallas kernel times only on its own platform; "
                  f"this is {native})")
            continue
        if is_quantized_dtype(kv_dtype) and backend == "cpu":
            print("cpu: skipped (reads float caches only)")
            continue
        page_size = args.page_size or default_page_size(backend)
        row = {"page_size": page_size}

        def attention(*a, backend=backend):
            return ragged_paged_attention(*a, sm_scale=args.head_dim ** -0.5, backend=backend)

        fn = jax.jit(attention, donate_argnums=(3,))
        seqs, context = args.decode
        batch = make_batch(seqs, 1, context, page_size=page_size, dtype=dtype, kv_dtype=kv_dtype,
                           **heads)
        seconds = _timed_threaded(fn, batch, args.repeats)
        moved = decode_bytes(seqs, context, dtype=dtype, kv_dtype=kv_dtype, **heads)
        row["decode"] = {"seqs": seqs, "context": context, "seconds": seconds,
                         "bytes": moved, "bytes_per_s": moved / seconds,
                         "fraction_of_copy": moved / seconds / bandwidth}
        seqs, tokens = args.prefill
        batch = make_batch(seqs, tokens, tokens, page_size=page_size, dtype=dtype,
                           kv_dtype=kv_dtype, **heads)
        seconds = _timed_threaded(fn, batch, args.repeats)
        flops = prefill_flops(seqs, tokens, tokens, num_heads=args.num_heads,
                              head_dim=args.head_dim)
        row["prefill"] = {"seqs": seqs, "tokens": tokens, "seconds": seconds, "flops": flops,
                          "flops_per_s": flops / seconds,
                          "fraction_of_matmul": flops / seconds / flops_peak}
        results["backends"][backend] = row
        d, f = row["decode"], row["prefill"]
        print(f"{backend:>4} (page {page_size:3d}): decode {d['seqs']}x{d['context']} "
              f"{d['seconds'] * 1e3:8.2f} ms {d['bytes_per_s'] / 1e9:7.1f} GB/s "
              f"({d['fraction_of_copy']:6.1%} of copy) | prefill {f['seqs']}x{f['tokens']} "
              f"{f['seconds'] * 1e3:8.2f} ms {f['flops_per_s'] / 1e12:7.3f} TFLOP/s "
              f"({f['fraction_of_matmul']:6.1%} of matmul)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")


def _timed_threaded(fn, batch, repeats: int) -> float:
    """Median seconds of the attention call, feeding each call the cache the last one returned
    (the cache argument is donated, as in the engine's step)."""
    q, k, v, cache, *rest = batch
    out, cache = fn(q, k, v, cache, *rest)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, cache = fn(q, k, v, cache, *rest)
        jax.block_until_ready((out, cache))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


if __name__ == "__main__":
    main()
