"""Every attention backend against a dense numpy oracle, with NaN in unused pages."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.kernels_pallas import init_kv_cache, ragged_paged_attention


def _backends():
    from jaxserve.kernels_pallas import cpu

    return ["ref", pytest.param("cpu", marks=pytest.mark.skipif(
        not cpu.available(), reason="no C++ compiler for the cpu kernel"))]


def _case(rng, q_lens, kv_lens, *, N=4, K=2, H=16, page_size=4, P=8, num_pages=40, S=None):
    """Random ragged batch; returns inputs plus the contexts (old K/V) each sequence already has."""
    S = S or len(q_lens)
    num_seqs = len(q_lens)
    T_real = sum(q_lens)
    T = T_real + 3  # padded tokens that must be ignored
    cache = np.full((num_pages, page_size, 2 * K, H), np.nan, np.float32)
    pages = rng.permutation(num_pages)[: S * P].reshape(S, P)
    contexts = []
    for s in range(num_seqs):
        old = kv_lens[s] - q_lens[s]
        ctx = rng.standard_normal((old, 2 * K, H)).astype(np.float32)
        for p in range(old):
            cache[pages[s, p // page_size], p % page_size] = ctx[p]
        contexts.append(ctx)
    q = rng.standard_normal((T, N, H)).astype(np.float32)
    k = rng.standard_normal((T, K, H)).astype(np.float32)
    v = rng.standard_normal((T, K, H)).astype(np.float32)
    cu = np.zeros(S + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = T_real
    lens = np.zeros(S, np.int32)
    lens[:num_seqs] = kv_lens
    num_decodes = sum(1 for n in q_lens if n == 1)
    dist = np.array([num_decodes, num_decodes, num_seqs], np.int32)
    return dict(q=q, k=k, v=v, cache=cache, lens=lens, pages=pages, cu=cu, dist=dist,
                contexts=contexts, page_size=page_size)


def _oracle(c, sm_scale, window=None, soft_cap=None):
    q, k, v, cu = c["q"], c["k"], c["v"], c["cu"]
    N, K = q.shape[1], k.shape[1]
    G = N // K
    out = np.zeros_like(q)
    for s, ctx in enumerate(c["contexts"]):
        a, b = cu[s], cu[s + 1]
        keys = np.concatenate([ctx[:, :K], k[a:b]], 0)  # [L, K, H]
        vals = np.concatenate([ctx[:, K:], v[a:b]], 0)
        L = keys.shape[0]
        for i in range(b - a):
            qpos = L - (b - a) + i
            for n in range(N):
                sc = keys[:qpos + 1, n // G] @ q[a + i, n] * sm_scale
                if soft_cap:
                    sc = np.tanh(sc / soft_cap) * soft_cap
                kv_pos = np.arange(qpos + 1)
                if window:
                    sc = np.where(qpos - kv_pos < window, sc, -np.inf)
                p = np.exp(sc - sc.max())
                out[a + i, n] = (p / p.sum()) @ vals[:qpos + 1, n // G]
    return out


CASES = {
    "decode_only": ([1, 1, 1], [5, 17, 32]),
    "prefill_only": ([7, 12], [7, 12]),
    "mixed": ([1, 1, 9, 4], [9, 30, 9, 20]),
    "chunked_prefill_cross_pages": ([6], [23]),
    "empty_slot": ([3, 0, 2], [3, 5, 6]),
}


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("window,soft_cap", [(None, None), (5, None), (None, 20.0)])
def test_backend_matches_oracle(backend, name, window, soft_cap):
    rng = np.random.default_rng(0)
    q_lens, kv_lens = CASES[name]
    c = _case(rng, q_lens, kv_lens, S=len(q_lens) + 1)
    sm_scale = 0.25
    attend = jax.jit(lambda *a: ragged_paged_attention(
        *a, sm_scale=sm_scale, sliding_window=window, soft_cap=soft_cap, backend=backend))
    out, cache = attend(
        jnp.asarray(c["q"]), jnp.asarray(c["k"]), jnp.asarray(c["v"]), jnp.asarray(c["cache"]),
        jnp.asarray(c["lens"]), jnp.asarray(c["pages"].reshape(-1)), jnp.asarray(c["cu"]),
        jnp.asarray(c["dist"]))
    T_real = int(c["cu"][len(q_lens)])
    want = _oracle(c, sm_scale, window, soft_cap)
    np.testing.assert_allclose(np.asarray(out)[:T_real], want[:T_real], atol=2e-5, rtol=2e-5)
    # The cache, page by page: new K/V landed at their positions; nothing else changed.
    cache = np.asarray(cache)
    expect = c["cache"].copy()
    K = c["k"].shape[1]
    ps = c["page_size"]
    for s in range(len(q_lens)):
        a, b = c["cu"][s], c["cu"][s + 1]
        for i in range(b - a):
            pos = kv_lens[s] - (b - a) + i
            page = c["pages"][s, pos // ps]
            expect[page, pos % ps, :K] = c["k"][a + i]
            expect[page, pos % ps, K:] = c["v"][a + i]
    np.testing.assert_array_equal(cache, expect)  # NaN == NaN in assert_array_equal


@pytest.mark.parametrize("backend", _backends())
def test_stacked_cache_writes_only_its_layer(backend):
    rng = np.random.default_rng(1)
    c = _case(rng, [2, 1], [6, 9])
    stacked = np.stack([c["cache"], c["cache"] + 1.0, c["cache"] + 2.0])
    args = (jnp.asarray(c["lens"]), jnp.asarray(c["pages"].reshape(-1)), jnp.asarray(c["cu"]),
            jnp.asarray(c["dist"]))
    out1, cache1 = ragged_paged_attention(jnp.asarray(c["q"]), jnp.asarray(c["k"]),
                                          jnp.asarray(c["v"]), jnp.asarray(stacked[1]), *args,
                                          sm_scale=0.3)
    out_s, cache_s = ragged_paged_attention(jnp.asarray(c["q"]), jnp.asarray(c["k"]),
                                            jnp.asarray(c["v"]), jnp.asarray(stacked), *args,
                                            sm_scale=0.3, layer=1, backend=backend)
    np.testing.assert_allclose(np.asarray(out_s)[:3], np.asarray(out1)[:3], atol=1e-6)
    cache_s = np.asarray(cache_s)
    np.testing.assert_array_equal(cache_s[1], np.asarray(cache1))
    np.testing.assert_array_equal(cache_s[0], stacked[0])
    np.testing.assert_array_equal(cache_s[2], stacked[2])


@pytest.mark.parametrize("backend", _backends())
def test_bfloat16_cache_matches_ref(backend):
    """A bfloat16 cache: every backend stores the same rounded K/V and attends alike."""
    rng = np.random.default_rng(2)
    c = _case(rng, [1, 1, 9, 4], [9, 30, 9, 20], S=5)
    cache = jnp.asarray(c["cache"]).astype(jnp.bfloat16)
    args = (jnp.asarray(c["q"]), jnp.asarray(c["k"]), jnp.asarray(c["v"]), cache,
            jnp.asarray(c["lens"]), jnp.asarray(c["pages"].reshape(-1)), jnp.asarray(c["cu"]),
            jnp.asarray(c["dist"]))
    want_out, want_cache = ragged_paged_attention(*args, sm_scale=0.25, backend="ref")
    out, got_cache = jax.jit(lambda *a: ragged_paged_attention(
        *a, sm_scale=0.25, backend=backend))(*args)
    T = int(c["cu"][4])
    np.testing.assert_allclose(np.asarray(out)[:T], np.asarray(want_out)[:T], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_cache, np.float32),
                                  np.asarray(want_cache, np.float32))
    oracle = _oracle(c, 0.25)
    np.testing.assert_allclose(np.asarray(out)[:T], oracle[:T], atol=5e-2)


def test_init_kv_cache_shape():
    cache = init_kv_cache(10, 16, 2, 64, jnp.float32, num_layers=3)
    assert cache.shape == (3, 10, 16, 4, 64)
