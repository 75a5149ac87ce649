"""Randomised ragged batches for the attention backends, a dense numpy oracle, and the checks
every backend's tests share (output against the oracle, the cache page by page).

A case's cache holds each sequence's old context in its pages, and NaN everywhere else (unused
pages, slots past a sequence's context, the pages of other layers are filled with distinct
finite values), so a backend that reads what it must not turns the output NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kernels_pallas import (QuantizedKVCache, is_quantized_dtype, quant,
                                     ragged_paged_attention)

# Jitted: one compile per shape, where eager dispatch compiled each op per shape (most of a
# quantised test's time).
quantize = jax.jit(quant.quantize, static_argnums=1)
dequantize = jax.jit(quant.dequantize)

# (q_lens, kv_lens) per sequence: kv_len counts the new tokens too; q_len 0 is an empty slot.
CASES = {
    "decode_only": ([1, 1, 1], [5, 17, 32]),
    "prefill_only": ([7, 12], [7, 12]),
    "mixed": ([1, 1, 9, 4], [9, 30, 9, 20]),
    "chunked_prefill_cross_pages": ([6], [23]),
    "empty_slot": ([3, 0, 2], [3, 5, 6]),
}

# Output tolerance (atol = rtol) against the float64 oracle, keyed by the cache's dtype. The
# oracle reads the cache's stored values, so the tolerance covers the kernel's arithmetic only.
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "int8": 2e-5, "float8_e4m3fn": 2e-5,
             "float8_e5m2": 2e-5}
# q/k/v in bfloat16 round the inputs and the output too.
INPUT_TOLERANCE = {"float32": 0.0, "bfloat16": 3e-2}


@dataclasses.dataclass
class Case:
    q: np.ndarray  # f32[T, N, H] (rounded to the input dtype)
    k: np.ndarray  # f32[T, K, H]
    v: np.ndarray
    cache: object  # np f[(L,) pages, page_size, 2K, H], or (data, scale) numpy pair
    lens: np.ndarray  # i32[S]
    pages: np.ndarray  # i32[S, P]
    cu: np.ndarray  # i32[S+1]
    dist: np.ndarray  # i32[3]
    contexts: list  # per real sequence: f32[old_len, 2K, H], the values the cache returns
    q_lens: list
    kv_lens: list
    page_size: int
    cache_dtype: str
    input_dtype: str
    layer: int | None

    @property
    def num_tokens(self) -> int:
        return int(self.cu[len(self.q_lens)])

    def device_args(self):
        """The positional arguments of `ragged_paged_attention` as device arrays."""
        dt = jnp.dtype(self.input_dtype)
        if isinstance(self.cache, tuple):
            cache = QuantizedKVCache(jnp.asarray(self.cache[0]), jnp.asarray(self.cache[1]))
        else:
            cache = jnp.asarray(self.cache).astype(self.cache_dtype)
        return (jnp.asarray(self.q, dt), jnp.asarray(self.k, dt), jnp.asarray(self.v, dt), cache,
                jnp.asarray(self.lens), jnp.asarray(self.pages.reshape(-1)),
                jnp.asarray(self.cu), jnp.asarray(self.dist))


def _round(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))


def make_case(rng, q_lens, kv_lens, *, N=4, K=2, H=16, page_size=4, P=8, num_pages=None,
              num_slots=None, pad_tokens=3, cache_dtype="float32", input_dtype="float32",
              num_layers=None, layer=None) -> Case:
    """A random ragged batch. `num_slots` > len(q_lens) leaves empty sequence slots at the end;
    `pad_tokens` padded tokens follow the real ones; `num_layers` stacks the cache."""
    S = num_slots or len(q_lens)
    num_seqs = len(q_lens)
    num_pages = num_pages or S * P + 3
    assert all(kv <= P * page_size for kv in kv_lens), "a context does not fit its page table"
    T_real = sum(q_lens)
    T = T_real + pad_tokens
    quantized = is_quantized_dtype(cache_dtype)
    shape = (num_pages, page_size, 2 * K, H)
    pages = rng.permutation(num_pages)[: S * P].reshape(S, P).astype(np.int32)

    contexts = []
    raw = [rng.standard_normal((kv - q, 2 * K, H)).astype(np.float32)
           for q, kv in zip(q_lens, kv_lens)]
    # Drawn before anything dtype-specific: the same seed gives the same batch in every dtype.
    q = _round(rng.standard_normal((T, N, H)), input_dtype)
    k = _round(rng.standard_normal((T, K, H)), input_dtype)
    v = _round(rng.standard_normal((T, K, H)), input_dtype)
    if quantized:
        # Unused slots: arbitrary values with NaN scales, so reading them poisons the output.
        data = np.array(jnp.asarray(rng.standard_normal(shape) * 50).astype(cache_dtype))
        scale = np.full(shape[:-1], np.nan, np.float32)
        for s, ctx in enumerate(raw):
            d, sc = quantize(jnp.asarray(ctx), cache_dtype)
            d, sc = np.asarray(d), np.asarray(sc)
            for p in range(ctx.shape[0]):
                data[pages[s, p // page_size], p % page_size] = d[p]
                scale[pages[s, p // page_size], p % page_size] = sc[p]
            contexts.append(np.asarray(dequantize(jnp.asarray(d), jnp.asarray(sc))))
        layer_cache = (data, scale)
    else:
        layer_cache = np.full(shape, np.nan, np.float32)
        for s, ctx in enumerate(raw):
            ctx = _round(ctx, cache_dtype)
            for p in range(ctx.shape[0]):
                layer_cache[pages[s, p // page_size], p % page_size] = ctx[p]
            contexts.append(ctx)
    cache = layer_cache
    if num_layers is not None:
        layer = 0 if layer is None else layer

        def stack(x, fill):
            return np.stack([x if i == layer else np.full_like(x, fill) for i in range(num_layers)])

        if quantized:
            cache = (stack(layer_cache[0], 0), stack(layer_cache[1], 1e4))
        else:
            # Finite, far off (and exact in bfloat16): reading another layer shows.
            cache = stack(layer_cache, 1024.0)

    cu = np.zeros(S + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = T_real
    lens = np.zeros(S, np.int32)
    lens[:num_seqs] = kv_lens
    num_decodes = sum(1 for n in q_lens if n == 1)
    dist = np.array([num_decodes, num_decodes, num_seqs], np.int32)
    return Case(q=q, k=k, v=v, cache=cache, lens=lens, pages=pages, cu=cu, dist=dist,
                contexts=contexts, q_lens=list(q_lens), kv_lens=list(kv_lens),
                page_size=page_size, cache_dtype=jnp.dtype(cache_dtype).name,
                input_dtype=jnp.dtype(input_dtype).name,
                layer=layer if num_layers is not None else None)


def _stored(c: Case, x: np.ndarray) -> np.ndarray:
    """What the cache returns for new K/V `x f[..., H]` written into it."""
    if is_quantized_dtype(c.cache_dtype):
        return np.asarray(dequantize(*quantize(jnp.asarray(x), c.cache_dtype)))
    return _round(x, c.cache_dtype)


def oracle(c: Case, sm_scale, window=None, soft_cap=None) -> np.ndarray:
    """Dense float64 attention of every real token: f64[T_real, N, H]."""
    N, K = c.q.shape[1], c.k.shape[1]
    G = N // K
    out = np.zeros((c.num_tokens, *c.q.shape[1:]))
    for s, ctx in enumerate(c.contexts):
        a, b = c.cu[s], c.cu[s + 1]
        new = _stored(c, np.concatenate([c.k[a:b], c.v[a:b]], 1))
        kv = np.concatenate([ctx, new], 0).astype(np.float64)  # [L, 2K, H]
        L = kv.shape[0]
        for i in range(b - a):
            qpos = L - (b - a) + i
            kv_pos = np.arange(qpos + 1)
            for n in range(N):
                sc = kv[:qpos + 1, n // G] @ c.q[a + i, n].astype(np.float64) * sm_scale
                if soft_cap:
                    sc = np.tanh(sc / soft_cap) * soft_cap
                if window:
                    sc = np.where(qpos - kv_pos < window, sc, -np.inf)
                p = np.exp(sc - sc.max())
                out[a + i, n] = (p / p.sum()) @ kv[:qpos + 1, K + n // G]
    return out


def run(c: Case, backend: str, *, sm_scale=0.25, window=None, soft_cap=None, interpret=False,
        jit=True):
    """Call the backend on the case: (out np f32[T, N, H], cache as numpy)."""
    fn = lambda *a: ragged_paged_attention(  # noqa: E731
        *a, sm_scale=sm_scale, sliding_window=window, soft_cap=soft_cap, backend=backend,
        interpret=interpret, layer=c.layer)
    out, cache = (jax.jit(fn) if jit else fn)(*c.device_args())
    if isinstance(cache, QuantizedKVCache):
        cache = (np.asarray(cache.data), np.asarray(cache.scale))
    else:
        cache = np.asarray(cache.astype(jnp.float32))
    return np.asarray(out.astype(jnp.float32)), cache


def check_output(c: Case, out, *, sm_scale=0.25, window=None, soft_cap=None) -> None:
    want = oracle(c, sm_scale, window, soft_cap)
    tol = TOLERANCE[c.cache_dtype] + INPUT_TOLERANCE[c.input_dtype]
    got = out[: c.num_tokens]
    assert np.isfinite(got).all(), "output has NaN/inf: a backend read an unused slot"
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def expected_cache(c: Case):
    """The case's cache after the step's K/V are written (numpy, same structure as `c.cache`)."""
    quantized = isinstance(c.cache, tuple)
    if quantized:
        data, scale = (x.copy() for x in c.cache)
    else:
        data = c.cache.copy()
    for s in range(len(c.q_lens)):
        a, b = c.cu[s], c.cu[s + 1]
        for i in range(b - a):
            pos = c.kv_lens[s] - (b - a) + i
            idx = (c.pages[s, pos // c.page_size], pos % c.page_size)
            if c.layer is not None:
                idx = (c.layer, *idx)
            new = np.concatenate([c.k[a + i], c.v[a + i]], 0)  # [2K, H]
            if quantized:
                d, sc = quantize(jnp.asarray(new), c.cache_dtype)
                data[idx] = np.asarray(d)
                scale[idx] = np.asarray(sc)
            else:
                data[idx] = _round(new, c.cache_dtype)
    return (data, scale) if quantized else data


def check_cache(c: Case, cache) -> None:
    """Page by page: the new K/V landed at their positions, nothing else changed (bit for bit;
    NaN equals NaN)."""
    want = expected_cache(c)
    pairs = zip(cache, want) if isinstance(want, tuple) else [(cache, want)]
    for got_part, want_part in pairs:
        got_part = np.asarray(got_part).astype(np.float32)
        want_part = np.asarray(want_part).astype(np.float32)
        assert got_part.shape == want_part.shape
        layers = range(got_part.shape[0]) if c.layer is not None else [None]
        for li in layers:
            g = got_part if li is None else got_part[li]
            w = want_part if li is None else want_part[li]
            for page in range(g.shape[0]):
                np.testing.assert_array_equal(
                    g[page], w[page], err_msg=f"layer {li} page {page} differs after the write")
