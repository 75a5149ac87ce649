"""The `tpu` backend (Pallas Mosaic TPU) in interpret mode on CPU: output against the float64
oracle with NaN in unused pages, and the cache page by page (harness: tests/kernel_cases.py).

Interpret mode compiles slowly (2-3 s per shape), so the matrix is not a cross product: each test
covers a few items, and together they cover every case of CASES, sliding windows (Python and
traced), soft caps, GQA ratios 1/2/4/8, head dims 64/128/256, page sizes 16/64/256, float32,
bfloat16, int8 and float8_e4m3fn caches, bfloat16 inputs, stacked caches (Python and traced layer),
several token and KV blocks per call, and calls with and without jit. No test here needs a TPU;
`test_lowers_to_mosaic` checks that the kernel lowers to Mosaic for one, which interpret mode
never does; tests/test_aot_kernels.py (`-m aot`) has Mosaic itself compile it for TPU v5e, v6e
and v5p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxserve.kernels_pallas import QuantizedKVCache, tpu
from kernel_cases import CASES, check_cache, check_output, make_case, run

SM_SCALE = 0.25


def run_tpu(c, *, window=None, soft_cap=None, traced=False, **tuning):
    """Like `kernel_cases.run(c, "tpu")` under jit, calling the module with tuning arguments;
    `traced=True` passes the window and layer as traced scalars."""

    def fn(window, layer, *args):
        return tpu.ragged_paged_attention(
            *args, sm_scale=SM_SCALE, sliding_window=window, soft_cap=soft_cap, layer=layer,
            interpret=True, **tuning)

    if traced:
        window = jnp.int32(window or 0)
        layer = None if c.layer is None else jnp.int32(c.layer)
        out, cache = jax.jit(fn)(window, layer, *c.device_args())
    else:
        out, cache = jax.jit(fn, static_argnums=(0, 1))(window, c.layer, *c.device_args())
    if isinstance(cache, QuantizedKVCache):
        cache = (np.asarray(cache.data), np.asarray(cache.scale))
    else:
        cache = np.asarray(cache.astype(jnp.float32))
    return np.asarray(out.astype(jnp.float32)), cache


def free_outside_window(c, window: int) -> None:
    """Free each sequence's pages that none of its tokens' windows reach, as an engine may: NaN
    in them (the oracle reads `c.contexts`, which keep the values), and their page table entries
    point past the cache, so reading either fails. Unstacked caches."""
    assert c.layer is None
    num_pages = c.cache[0].shape[-4] if isinstance(c.cache, tuple) else c.cache.shape[-4]
    for s, (q_len, kv_len) in enumerate(zip(c.q_lens, c.kv_lens)):
        first = kv_len - q_len - window + 1  # the window's start for the sequence's first token
        if q_len and first >= c.page_size:
            pages = c.pages[s, :first // c.page_size]
            if isinstance(c.cache, tuple):
                c.cache[1][pages] = np.nan  # scales
            else:
                c.cache[pages] = np.nan
            c.pages[s, :first // c.page_size] = num_pages + 1000


def check(c, out, cache, *, window=None, soft_cap=None) -> None:
    check_output(c, out, sm_scale=SM_SCALE, window=window, soft_cap=soft_cap)
    check_cache(c, cache)


# Every case of the shared harness, each on a different shape (G = N / K).
CASE_SHAPES = {
    "decode_only": dict(N=4, K=2, H=128, page_size=16),  # G 2
    "prefill_only": dict(N=4, K=4, H=64, page_size=16),  # G 1, head_dim 64
    "mixed": dict(N=8, K=2, H=128, page_size=64),  # G 4, page 64
    "chunked_prefill_cross_pages": dict(N=8, K=1, H=256, page_size=16),  # G 8, head_dim 256
    "empty_slot": dict(N=4, K=2, H=128, page_size=16, cache_dtype="bfloat16"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_oracle(name):
    q_lens, kv_lens = CASES[name]
    c = make_case(np.random.default_rng(0), q_lens, kv_lens, num_slots=len(q_lens) + 1,
                  **CASE_SHAPES[name])
    out, cache = run(c, "tpu", sm_scale=SM_SCALE, interpret=True)
    check(c, out, cache)


@pytest.mark.parametrize("window,soft_cap", [(5, None), (None, 20.0), (7, 30.0)])
def test_window_and_soft_cap(window, soft_cap):
    q_lens, kv_lens = CASES["mixed"]
    c = make_case(np.random.default_rng(1), q_lens, kv_lens, num_slots=5, N=4, K=2, H=128,
                  page_size=16)
    out, cache = run(c, "tpu", sm_scale=SM_SCALE, window=window, soft_cap=soft_cap,
                     interpret=True)
    check(c, out, cache, window=window, soft_cap=soft_cap)


def test_long_contexts_page_size_256():
    """Contexts over several 256-token pages; whole KV blocks before the window are skipped
    (the decode token at 699 reaches from 600 on: positions 0-511 hold NaN)."""
    c = make_case(np.random.default_rng(2), [1, 40, 1], [700, 300, 257], N=4, K=2, H=128,
                  page_size=256, P=3)
    free_outside_window(c, 100)
    out, cache = run(c, "tpu", sm_scale=SM_SCALE, window=100, soft_cap=25.0, interpret=True)
    check(c, out, cache, window=100, soft_cap=25.0)


@pytest.mark.parametrize("cache_dtype,input_dtype,name,kwargs", [
    ("int8", "float32", "mixed", dict(page_size=16, num_layers=2, layer=1)),
    ("float8_e4m3fn", "bfloat16", "decode_only", dict(page_size=64)),
])
def test_quantized_cache(cache_dtype, input_dtype, name, kwargs):
    q_lens, kv_lens = CASES[name]
    c = make_case(np.random.default_rng(3), q_lens, kv_lens, num_slots=len(q_lens) + 1, N=4, K=2,
                  H=128, cache_dtype=cache_dtype, input_dtype=input_dtype, **kwargs)
    out, cache = run(c, "tpu", sm_scale=SM_SCALE, window=6, interpret=True)
    check(c, out, cache, window=6)


def test_bfloat16_inputs_and_cache():
    q_lens, kv_lens = CASES["mixed"]
    c = make_case(np.random.default_rng(4), q_lens, kv_lens, num_slots=5, N=8, K=2, H=128,
                  page_size=64, cache_dtype="bfloat16", input_dtype="bfloat16")
    out, cache = run(c, "tpu", sm_scale=SM_SCALE, soft_cap=20.0, interpret=True)
    check(c, out, cache, soft_cap=20.0)


def test_stacked_cache_traced_layer_and_window():
    c = make_case(np.random.default_rng(5), [2, 1, 5], [6, 19, 12], N=4, K=2, H=128,
                  page_size=16, num_layers=3, layer=2)
    out, cache = run_tpu(c, window=4, traced=True)
    check(c, out, cache, window=4)


@pytest.mark.parametrize("cache_dtype,window,block_pages", [("float32", 4, 2), ("int8", None, 1)])
def test_many_token_and_kv_blocks(cache_dtype, window, block_pages):
    """16-token programs and small KV blocks: sequences across program boundaries, several KV
    blocks per sequence prefetched across sequences, an empty slot between real ones, and a
    last program of padding only (whose rows stay finite). With the window, pages no token
    reaches hold NaN, some of them first in a KV block that is fetched."""
    c = make_case(np.random.default_rng(6), [1, 20, 1, 13, 0, 9], [40, 45, 17, 13, 5, 60],
                  num_slots=7, pad_tokens=20, N=4, K=2, H=128, page_size=16, P=4,
                  cache_dtype=cache_dtype)
    if window:
        free_outside_window(c, window)
    out, cache = run_tpu(c, window=window, block_tokens=16, block_pages=block_pages)
    check(c, out, cache, window=window)
    assert np.isfinite(out[c.num_tokens:]).all()


def test_without_jit():
    q_lens, kv_lens = CASES["chunked_prefill_cross_pages"]
    c = make_case(np.random.default_rng(7), q_lens, kv_lens, N=4, K=2, H=128, page_size=16)
    out, cache = run(c, "tpu", sm_scale=SM_SCALE, interpret=True, jit=False)
    check(c, out, cache)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(cache_dtype="bfloat16", input_dtype="bfloat16"),
    dict(cache_dtype="int8", num_layers=2, layer=1),
    dict(cache_dtype="float8_e4m3fn", input_dtype="bfloat16"),
], ids=["float32", "bfloat16", "int8-stacked", "float8"])
def test_lowers_to_mosaic(kwargs):
    """The kernel lowers to a Mosaic TPU custom call (Pallas' lowering rules; Mosaic's own
    compiler only runs on a TPU)."""
    q_lens, kv_lens = CASES["mixed"]
    c = make_case(np.random.default_rng(8), q_lens, kv_lens, N=8, K=2, H=128, page_size=16,
                  **kwargs)
    fn = jax.jit(lambda *a: tpu.ragged_paged_attention(
        *a, sm_scale=SM_SCALE, sliding_window=8, soft_cap=30.0, layer=c.layer))
    device = jax.sharding.AbstractDevice("TPU v5 lite", 1, "tpu")
    with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        exported = export.export(fn, platforms=["tpu"])(*c.device_args())
    assert "tpu_custom_call" in exported.mlir_module()


def test_rejects_traced_soft_cap_and_bad_block():
    c = make_case(np.random.default_rng(9), [1], [3], page_size=16)
    with pytest.raises(TypeError, match="soft_cap"):
        jax.jit(lambda cap, *a: tpu.ragged_paged_attention(
            *a, sm_scale=SM_SCALE, soft_cap=cap, interpret=True))(20.0, *c.device_args())
    with pytest.raises(ValueError, match="block_tokens"):
        tpu.ragged_paged_attention(*c.device_args(), sm_scale=SM_SCALE, block_tokens=20)
