"""Pure-jnp ragged paged attention: the reference of the attention ABI and the CPU backend.

The step's tokens form one ragged stream: sequence s owns tokens `cu_q_lens[s]:cu_q_lens[s+1]`,
which are the last `q_len` positions of its `kv_lens[s]` context. New K/V are written into their
pages first, then every token attends causally to its sequence's pages, one block of pages at a
time with an online softmax, so work grows with the longest context in the step rather than with
the page table's width.

KV cache layout: `f[pages, page_size, 2K, H]` (keys in heads `[0, K)`, values in `[K, 2K)`), or
with a leading layer axis `f[L, pages, page_size, 2K, H]` when the model passes `layer=`. An int8
or float8 cache is a `QuantizedKVCache` of that layout plus one scale per token and head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.kernels_pallas.quant import QuantizedKVCache, dequantize, is_quantized_dtype, quantize

# NOTE: tokens of context processed per loop iteration of the reference; a multiple of pages.
_BLOCK_TOKENS = 128
DEFAULT_PAGE_SIZE = 16
QUANTIZED_KV = True  # reads int8/fp8 caches


def init_kv_cache(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype,
                  num_layers: int | None = None):
    """A zeroed paged KV cache, `f[(L,) pages, page_size, 2K, H]`; for int8 and float8 dtypes a
    `QuantizedKVCache` (values of that shape, scales f32[(L,) pages, page_size, 2K])."""
    shape = (num_pages, page_size, 2 * num_kv_heads, head_dim)
    if num_layers is not None:
        shape = (num_layers, *shape)
    if is_quantized_dtype(dtype):
        return QuantizedKVCache(jnp.zeros(shape, dtype), jnp.ones(shape[:-1], jnp.float32))
    return jnp.zeros(shape, dtype)


def validate_inputs(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution) -> None:
    """Static shape checks shared by every backend."""
    T, N, H = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != H:
        raise ValueError(f"q, k, v disagree: {q.shape=}, {k.shape=}, {v.shape=}")
    K = k.shape[1]
    if N % K:
        raise ValueError(f"query heads must be a multiple of KV heads: {N=}, {K=}")
    if kv_cache.shape[-2:] != (2 * K, H):
        raise ValueError(f"kv_cache last dims must be (2K, H) = {(2 * K, H)}, got {kv_cache.shape}")
    S = kv_lens.shape[0]
    if cu_q_lens.shape != (S + 1,):
        raise ValueError(f"cu_q_lens must be i32[S+1] with {S=}, got {cu_q_lens.shape}")
    if page_indices.ndim != 1 or page_indices.shape[0] % S:
        raise ValueError(f"page_indices must be i32[S*P], got {page_indices.shape} for {S=}")
    if distribution.shape != (3,):
        raise ValueError(f"distribution must be i32[3], got {distribution.shape}")


def token_layout(kv_lens, cu_q_lens, distribution, num_tokens: int):
    """Per token: its sequence, its position in that sequence, and whether it is real.

    Returns (seq i32[T], pos i32[T], valid bool[T]).
    """
    S = kv_lens.shape[0]
    num_seqs = distribution[2]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, S - 1)
    valid = t < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    return seq, pos, valid


def ragged_paged_attention(
    q,  # f[T, N, H]
    k,  # f[T, K, H]
    v,  # f[T, K, H]
    kv_cache,  # f[(L,) pages, page_size, 2K, H]
    kv_lens,  # i32[S]
    page_indices,  # i32[S*P]
    cu_q_lens,  # i32[S+1]
    distribution,  # i32[3]
    *,
    sm_scale: float,
    sliding_window=None,  # int, or a traced i32[] (0 or None: full attention)
    soft_cap: float | None = None,
    layer=None,  # None, or the layer of a stacked cache (int or traced i32[])
):
    """Write the new K/V into the cache, then attend. Returns (out f[T, N, H], kv_cache)."""
    validate_inputs(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
    kv_cache = write_kv(k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, layer=layer)
    T = q.shape[0]
    K = k.shape[1]
    S = kv_lens.shape[0]
    P = page_indices.shape[0] // S
    page_size = kv_cache.shape[-3]
    seq, pos, valid = token_layout(kv_lens, cu_q_lens, distribution, T)
    out = _attend(q, kv_cache, kv_lens, page_indices, distribution, seq, pos, valid,
                  K=K, P=P, page_size=page_size, sm_scale=sm_scale,
                  sliding_window=sliding_window, soft_cap=soft_cap, layer=layer)
    return out.astype(q.dtype), kv_cache


def write_kv(k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *, layer=None):
    """Scatter the step's new K/V (f[T, K, H] each) into their pages; padded tokens are dropped.

    Every backend writes through this (XLA updates the donated cache in place); the kernels only
    read the cache.
    """
    stacked = layer is not None
    if stacked and kv_cache.ndim != 5:
        raise ValueError(f"layer= needs a stacked cache f[L, pages, page, 2K, H], got {kv_cache.shape}")
    T = k.shape[0]
    S = kv_lens.shape[0]
    P = page_indices.shape[0] // S
    num_pages, page_size = kv_cache.shape[-4], kv_cache.shape[-3]
    seq, pos, valid = token_layout(kv_lens, cu_q_lens, distribution, T)
    # Padded tokens point past the last page, and `mode="drop"` discards their writes.
    page_of_token = page_indices[seq * P + jnp.clip(pos // page_size, 0, P - 1)]
    page_of_token = jnp.where(valid, page_of_token, num_pages)
    slot = pos % page_size
    index = (page_of_token, slot)
    if stacked:
        index = (jnp.full((T,), layer, jnp.int32), *index)
    new_kv = jnp.concatenate([k, v], axis=1)  # f[T, 2K, H]
    if isinstance(kv_cache, QuantizedKVCache):
        data, scale = quantize(new_kv, kv_cache.data.dtype)
        return QuantizedKVCache(kv_cache.data.at[index].set(data, mode="drop"),
                                kv_cache.scale.at[index].set(scale, mode="drop"))
    return kv_cache.at[index].set(new_kv.astype(kv_cache.dtype), mode="drop")


def read_pages(kv_cache, pages, layer=None):
    """Gather pages (i32[...]) of one layer as float32: f32[..., page_size, 2K, H]."""
    if isinstance(kv_cache, QuantizedKVCache):
        if layer is None:
            return dequantize(kv_cache.data[pages], kv_cache.scale[pages])
        return dequantize(kv_cache.data[layer, pages], kv_cache.scale[layer, pages])
    kv = kv_cache[pages] if layer is None else kv_cache[layer, pages]
    return kv.astype(jnp.float32)


def _attend(q, kv_cache, kv_lens, page_indices, distribution, seq, pos, valid, *, K, P, page_size,
            sm_scale, sliding_window, soft_cap, layer):
    T, N, H = q.shape
    G = N // K
    S = kv_lens.shape[0]
    pages_per_block = max(1, min(P, _BLOCK_TOKENS // page_size))
    block = pages_per_block * page_size
    active = jnp.arange(S) < distribution[2]
    max_len = jnp.max(jnp.where(active, kv_lens, 0))
    num_blocks = (max_len + block - 1) // block

    if sliding_window is None:
        window = jnp.int32(0)
    else:
        window = jnp.asarray(sliding_window, jnp.int32)
    # NOTE: window 0 means full attention; positions are < 2**30 so this bound never binds.
    window = jnp.where(window > 0, window, jnp.int32(1 << 30))

    qg = (q.astype(jnp.float32) * sm_scale).reshape(T, K, G, H)  # f32[T, K, G, H]
    seq_row = seq * P  # i32[T]

    def body(j, carry):
        m, l, acc = carry  # f32[T, K, G], f32[T, K, G], f32[T, K, G, H]
        page_ids = jnp.minimum(j * pages_per_block + jnp.arange(pages_per_block), P - 1)
        pages = page_indices[seq_row[:, None] + page_ids[None, :]]  # i32[T, pages_per_block]
        kv = read_pages(kv_cache, pages, layer)  # f32[T, pages_per_block, page_size, 2K, H]
        kv = kv.reshape(T, block, 2 * K, H)
        kk, vv = kv[:, :, :K], kv[:, :, K:]  # f32[T, block, K, H]
        kv_pos = j * block + jnp.arange(block)  # i32[block]
        mask = ((kv_pos[None, :] <= pos[:, None])
                & (pos[:, None] - kv_pos[None, :] < window)
                & valid[:, None])  # bool[T, block]
        s = jnp.einsum("tkgh,tlkh->tkgl", qg, kk)  # f32[T, K, G, block]
        if soft_cap is not None:
            s = jnp.tanh(s / soft_cap) * soft_cap
        mask4 = mask[:, None, None, :]
        s = jnp.where(mask4, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mask4, jnp.exp(s - m_safe[..., None]), 0.0)
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        # Pages beyond a sequence's context may hold anything (NaN included): zero them.
        vv = jnp.where(mask[:, :, None, None], vv, 0.0)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("tkgl,tlkh->tkgh", p, vv)
        return m_new, l, acc

    init = (jnp.full((T, K, G), -jnp.inf, jnp.float32), jnp.zeros((T, K, G), jnp.float32),
            jnp.zeros((T, K, G, H), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(T, N, H)

