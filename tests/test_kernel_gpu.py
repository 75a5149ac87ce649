"""The `gpu` backend (Pallas, Triton lowering) against the dense oracle of tests/kernel_cases.py,
in Pallas' interpret mode on CPU, with NaN in every slot the kernel must not read and the cache
checked page by page after the write. One more test lowers the kernel to Triton IR for CUDA (no
GPU needed) and verifies the module, so a shape or op Triton cannot take fails here too.

Interpret mode compiles each configuration (about 2 s), so the matrix covers every feature at
least once rather than crossing them all: cases, window and soft cap, GQA ratios, head dims with
page sizes, dtypes, stacked caches, row and kv blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels_pallas import QuantizedKVCache, gpu, ragged_paged_attention
from kernel_cases import CASES, check_cache, check_output, make_case, run

# Pages of 16 (the backend's minimum) and 2 per sequence hold every context of CASES (<= 32).
SMALL = dict(page_size=16, P=2)


def _to_numpy(out, cache):
    if isinstance(cache, QuantizedKVCache):
        cache = (np.asarray(cache.data), np.asarray(cache.scale))
    else:
        cache = np.asarray(cache.astype(jnp.float32))
    return np.asarray(out.astype(jnp.float32)), cache


def _check(c, out, cache, **kw):
    check_output(c, out, **kw)
    check_cache(c, cache)


@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_oracle(name):
    q_lens, kv_lens = CASES[name]
    c = make_case(np.random.default_rng(0), q_lens, kv_lens, num_slots=len(q_lens) + 1, **SMALL)
    out, cache = run(c, "gpu", interpret=True)
    _check(c, out, cache)


@pytest.mark.parametrize("window,soft_cap", [(5, None), (3, 30.0)])
def test_window_and_soft_cap(window, soft_cap):
    q_lens, kv_lens = CASES["mixed"]
    c = make_case(np.random.default_rng(1), q_lens, kv_lens, num_slots=5, **SMALL)
    out, cache = run(c, "gpu", window=window, soft_cap=soft_cap, interpret=True)
    _check(c, out, cache, window=window, soft_cap=soft_cap)


@pytest.mark.parametrize("N,K", [(2, 2), (8, 2), (6, 2)], ids=["G1", "G4", "G3"])
def test_gqa_ratio(N, K):
    q_lens, kv_lens = CASES["mixed"]
    c = make_case(np.random.default_rng(2), q_lens, kv_lens, N=N, K=K, **SMALL)
    out, cache = run(c, "gpu", interpret=True)
    _check(c, out, cache)


@pytest.mark.parametrize("H,page_size,N,K", [(64, 256, 4, 2), (128, 64, 8, 1), (256, 16, 4, 2),
                                             (80, 32, 4, 2)])
def test_head_dim_and_page_size(H, page_size, N, K):
    """80 is not a power of two: the kernel sums over 64 + 16 column chunks. 8 query heads to 1
    KV head is the widest group."""
    c = make_case(np.random.default_rng(3), [1, 7, 3], [40, 7, 70], N=N, K=K, H=H,
                  page_size=page_size, P=max(1, 80 // page_size + 1), num_slots=4)
    sm_scale = H ** -0.5
    out, cache = run(c, "gpu", sm_scale=sm_scale, window=33, interpret=True)
    _check(c, out, cache, sm_scale=sm_scale, window=33)


@pytest.mark.parametrize("cache_dtype,input_dtype", [
    ("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16"),
    ("float8_e4m3fn", "float32"), ("int8", "bfloat16")])
def test_dtypes(cache_dtype, input_dtype):
    """int8 with float32 q runs in the stacked-cache test below."""
    q_lens, kv_lens = CASES["mixed"]
    c = make_case(np.random.default_rng(4), q_lens, kv_lens, num_slots=5, H=64,
                  cache_dtype=cache_dtype, input_dtype=input_dtype, **SMALL)
    out, cache = run(c, "gpu", sm_scale=0.125, soft_cap=10.0, interpret=True)
    _check(c, out, cache, sm_scale=0.125, soft_cap=10.0)


def test_stacked_cache_static_layer():
    c = make_case(np.random.default_rng(5), [2, 1, 5], [6, 9, 12], num_layers=3, layer=1, **SMALL)
    out, cache = run(c, "gpu", interpret=True)
    _check(c, out, cache)


def test_stacked_quantized_cache_traced_layer_and_window():
    """layer and sliding_window as traced i32 under jit: one executable for every layer."""
    c = make_case(np.random.default_rng(6), [1, 4, 6], [20, 9, 30], num_layers=3, layer=2,
                  cache_dtype="int8", **SMALL)
    fn = jax.jit(lambda layer, window, *args: ragged_paged_attention(
        *args, sm_scale=0.25, sliding_window=window, layer=layer, backend="gpu",
        interpret=True))
    out, cache = _to_numpy(*fn(jnp.int32(2), jnp.int32(7), *c.device_args()))
    _check(c, out, cache, window=7)


@pytest.mark.parametrize("block_rows,block_kv", [(16, 16), (64, 64)])
def test_row_and_kv_blocks(block_rows, block_kv):
    """Eight sequences, prefill chunks longer than a row block and decodes sharing one: the row
    blocks cut sequences apart and hold several, kv blocks of 16 cut pages of 32 in two; the
    answer depends on neither."""
    q_lens = [1, 19, 1, 1, 8, 1, 33, 2]
    kv_lens = [30, 19, 64, 3, 40, 17, 60, 2]
    c = make_case(np.random.default_rng(7), q_lens, kv_lens, N=4, K=2, page_size=32, P=2,
                  num_slots=9)
    fn = jax.jit(lambda *args: gpu.ragged_paged_attention(
        *args, sm_scale=0.25, sliding_window=20, interpret=True, block_rows=block_rows,
        block_kv=block_kv))
    out, cache = _to_numpy(*fn(*c.device_args()))
    _check(c, out, cache, window=20)


@pytest.mark.parametrize("cache_dtype,H,page_size,soft_cap,layered", [
    ("float32", 64, 16, None, False), ("bfloat16", 128, 256, 30.0, True),
    ("bfloat16", 80, 32, None, False), ("int8", 256, 64, None, True),
    ("float8_e4m3fn", 64, 128, None, False)])
def test_lowers_to_triton_ir(monkeypatch, cache_dtype, H, page_size, soft_cap, layered):
    """Export for CUDA runs the Pallas -> Triton lowering on CPU; the Triton module verifies."""
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    lower = registration.lowering.lower_jaxpr_to_triton_module
    verified = []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    c = make_case(np.random.default_rng(8), [1, 5], [20, 5], N=8, K=2, H=H, page_size=page_size,
                  P=max(1, 32 // page_size), cache_dtype=cache_dtype,
                  num_layers=2 if layered else None)
    fn = jax.jit(lambda *args: gpu.ragged_paged_attention(
        *args, sm_scale=0.1, soft_cap=soft_cap, sliding_window=8, layer=c.layer,
        num_warps=8, num_stages=3))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*c.device_args())
    text = exported.mlir_module()
    assert verified == [True]
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "num_warps = 8" in text and "num_stages = 3" in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(page_size=8), "page size"), (dict(page_size=24), "page size"),
    (dict(H=24), "head_dim"), (dict(cache_dtype="float16"), "caches")])
def test_refuses_unsupported_shapes(kwargs, match):
    c = make_case(np.random.default_rng(9), [1], [3], **{"page_size": 16, **kwargs})
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*c.device_args(), sm_scale=0.25, backend="gpu", interpret=True)


def test_default_page_size_is_the_minimum_block():
    assert gpu.DEFAULT_PAGE_SIZE == 16
