"""The `tpu` backend: ragged paged attention as a Pallas Mosaic TPU kernel.

Layout of the kernel:

- Grid: one program per block of `bq` tokens of the ragged stream (`"parallel"`: programs share
  no state, so megacore chips may split them). A program handles every KV head: q arrives
  rearranged to `[K, T*G, H]` (row `t*G + g` of head `k` is query head `k*G + g` of token `t`),
  so its block `[K, bq*G, H]` holds, per KV head, the rows (token, group) that share that head's
  keys. The output has the same layout and is put back to `[T, N, H]` in the wrapper.
- Scalar prefetch (SMEM): kv_lens, page_indices, cu_q_lens, the first and end sequence touching
  each token block (computed in the wrapper), and (layer, window).
- The cache stays in HBM (`pl.ANY`). A program walks the work items (sequence, KV block) of the
  sequences that intersect its tokens; a KV block is `pp` pages (`pp * page_size` tokens). Items
  start at the first block the sliding window reaches and stop at the block holding the last
  position any of the program's tokens attends to; pages past that position are not fetched.
  Each page is one DMA of all `2K` heads (`[page_size, 2K, H]`, contiguous in HBM, so one fetch
  serves every KV head). Pages are double-buffered: item i+1's DMAs start, across sequence
  boundaries too, before item i is computed. A quantised cache also fetches the scale pages
  (`f32[page_size, 2K]`) and dequantises in VMEM.
- Compute per item and KV head: scores `[bq*G, pp*page_size]` in float32 (bfloat16 MXU operands
  when q is bfloat16), soft cap, then a mask (row belongs to the sequence, causal, window) and a
  flash-style online softmax in f32 scratch (`m`, `l`: `[K, bq*G, 1]`, `acc`: `[K, bq*G, H]`).
  Masked scores become -inf and their probabilities exactly 0, and values past the fetched
  context are zeroed before the PV matmul, so NaN in unused slots never reaches the output.
  Rows of padded tokens belong to no sequence and come out 0.

New K/V are written by `ref.write_kv` (XLA scatter, in place on the donated cache) before the
kernel runs; the kernel only reads the cache.

Tuning: `block_tokens` (bq, a multiple of 16 so that `bq * G` rows fill Mosaic's sublane
tiles for any GQA ratio; by default 128 / G tokens rounded down to a multiple of 16, at least 16)
and `block_pages` (pp; default 256 tokens of context, capped so the two KV buffers stay under
8 MiB). Neither has been tuned on hardware, nor has DEFAULT_PAGE_SIZE.

MXU precision: float32 operands (a float32 q) ask for `Precision.HIGHEST`; bfloat16 operands
take the default, with float32 accumulation (`preferred_element_type`). Mosaic rejects an
explicit precision on bfloat16 operands ("Bad lhs type").

What compiles where (deviceless, with libtpu 0.0.42.1 and jax 0.10.2: `pytest -m aot`,
`scripts/aot_sweep.py`, docs/performance.md): Mosaic builds this kernel for TPU v5e, v6e and
v5p for float32, bfloat16, int8, float8_e4m3fn and float8_e5m2 caches (bfloat16 q with an 8-bit
or bfloat16 cache, float32 q with a float32 or int8 one), head dims 64, 128 and 256, GQA ratios
1, 2, 3, 4 and 8, 1 to 4 KV heads per shard (one per shard under tensor parallelism), page
sizes 16 to 128, sliding window, soft cap, stacked caches with a traced layer, and decode-only,
prefill-only and mixed batches. An 8-bit cache is converted to float32 in VMEM (the scale is
applied there), so v5e, which has no float8 arithmetic, compiles float8 caches too. Nothing was
padded or refused.

Known limits:
- Never run on a real TPU: numbers are checked in interpret mode on CPU, builds by Mosaic
  deviceless; speed is unmeasured.
- page_indices live in SMEM (`S * P` int32), as do the other prefetched scalars; very large
  batches times page tables may not fit.
- The VMEM page buffer keeps the cache's `[page_size, 2K, H]` layout, and each head is a strided
  load from it: with few KV heads per shard Mosaic may pad the `2K` rows to its sublane tile, so
  VMEM use can exceed the 8 MiB budget, which counts unpadded bytes (not measured).
- A program's first KV block is not prefetched by the previous program.
- Each sequence is computed over all of the program's rows (masked), so a program of `bq`
  decode sequences does `bq` times the MXU work it needs; decode is bound by HBM reads anyway.
- `sm_scale` and `soft_cap` are Python numbers (static); the window and layer may be traced.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxserve.kernels_pallas.quant import QuantizedKVCache
from jaxserve.kernels_pallas.ref import validate_inputs, write_kv

DEFAULT_PAGE_SIZE = 32
QUANTIZED_KV = True  # reads int8/fp8 caches
_ROWS_PER_BLOCK = 128  # target bq*G rows per program
_KV_BLOCK_TOKENS = 256  # target tokens of context per KV block
_KV_BUFFER_BYTES = 8 << 20  # the two KV buffers together stay under this (VMEM)
_NO_WINDOW = 1 << 30


class _Span(NamedTuple):
    """One sequence as seen by one program (i32 scalars)."""

    q_start: jax.Array  # its first token in the stream
    q_end: jax.Array
    ctx: jax.Array  # context before its new tokens
    first_col: jax.Array  # the first position a row of this program attends to
    end_col: jax.Array  # one past the last position a row of this program attends to
    b_lo: jax.Array  # first KV block the window reaches
    b_hi: jax.Array  # end KV block (b_lo == b_hi: no rows in this program)


def block_sizes(num_tokens: int, G: int, P: int, page_size: int, row_bytes: int,
                block_tokens: int | None = None, block_pages: int | None = None):
    """Tokens per program and pages per KV block: (bq, pp). `row_bytes` is one token's K/V of
    every head in the cache (2K * H * itemsize)."""
    if block_tokens is None:
        # NOTE: a multiple of 16 tokens keeps bq * G rows a multiple of Mosaic's sublane tiling.
        block_tokens = max(16, _ROWS_PER_BLOCK // G // 16 * 16)
    bq = min(block_tokens, -(-num_tokens // 16) * 16)
    if block_pages is None:
        fit = _KV_BUFFER_BYTES // (2 * page_size * row_bytes)
        block_pages = max(1, min(_KV_BLOCK_TOKENS // page_size, fit))
    return bq, max(1, min(block_pages, P))


def ragged_paged_attention(
    q,  # f[T, N, H]
    k,  # f[T, K, H]
    v,  # f[T, K, H]
    kv_cache,  # f[(L,) pages, page_size, 2K, H] or QuantizedKVCache
    kv_lens,  # i32[S]
    page_indices,  # i32[S*P]
    cu_q_lens,  # i32[S+1]
    distribution,  # i32[3]
    *,
    sm_scale: float,
    sliding_window=None,  # int, or a traced i32[] (0 or None: full attention)
    soft_cap: float | None = None,
    layer=None,  # None, or the layer of a stacked cache (int or traced i32[])
    interpret: bool = False,
    block_tokens: int | None = None,  # tuning: tokens per program (multiple of 16)
    block_pages: int | None = None,  # tuning: pages per KV block
):
    """Write the new K/V into the cache, then attend. Returns (out f[T, N, H], kv_cache)."""
    validate_inputs(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
    for name, x in (("sm_scale", sm_scale), ("soft_cap", soft_cap)):
        if x is not None and not isinstance(x, numbers.Real):
            raise TypeError(f"the tpu kernel needs a Python number for {name}, got {x!r}")
    if block_tokens is not None and (block_tokens <= 0 or block_tokens % 16):
        raise ValueError(f"block_tokens must be a positive multiple of 16, got {block_tokens=}")
    kv_cache = write_kv(k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution,
                        layer=layer)
    window = jnp.int32(0) if sliding_window is None else jnp.asarray(sliding_window, jnp.int32)
    window = jnp.where(window > 0, window, _NO_WINDOW)
    params = jnp.stack([jnp.asarray(0 if layer is None else layer, jnp.int32), window])
    out = _attend(q, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, params,
                  K=k.shape[1], stacked=layer is not None, sm_scale=float(sm_scale),
                  soft_cap=None if soft_cap is None else float(soft_cap), interpret=interpret,
                  block_tokens=block_tokens, block_pages=block_pages)
    return out, kv_cache


@functools.partial(jax.jit, static_argnames=("K", "stacked", "sm_scale", "soft_cap", "interpret",
                                             "block_tokens", "block_pages"))
def _attend(q, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, params, *, K, stacked,
            sm_scale, soft_cap, interpret, block_tokens, block_pages):
    T, N, H = q.shape
    G = N // K
    S = kv_lens.shape[0]
    P = page_indices.shape[0] // S
    quantized = isinstance(kv_cache, QuantizedKVCache)
    data = kv_cache.data if quantized else kv_cache
    page_size = data.shape[-3]
    bq, pp = block_sizes(T, G, P, page_size, 2 * K * H * data.dtype.itemsize, block_tokens,
                         block_pages)
    num_blocks = -(-T // bq)
    R = bq * G

    # q f[T, N, H] -> f[K, Tp*G, H]: the rows of one KV head, token-major.
    qk = q.reshape(T, K, G, H).transpose(1, 0, 2, 3)
    qk = jnp.pad(qk, ((0, 0), (0, num_blocks * bq - T), (0, 0), (0, 0)))
    qk = qk.reshape(K, num_blocks * R, H)

    # The sequences touching token block i are [lo, hi) (cu_q_lens is non-decreasing).
    num_seqs = distribution[2]
    real = jnp.arange(S) < num_seqs
    t0 = jnp.arange(num_blocks, dtype=jnp.int32)[:, None] * bq
    lo = jnp.sum(real & (cu_q_lens[1:] <= t0), axis=1)
    hi = jnp.sum(real & (cu_q_lens[:-1] < t0 + bq), axis=1)
    block_seqs = jnp.stack([lo, hi], axis=1).reshape(-1).astype(jnp.int32)

    mxu_dtype = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
    # NOTE: Mosaic takes an explicit precision only on float32 operands ("Bad lhs type").
    precision = lax.Precision.HIGHEST if mxu_dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(
        _kernel, K=K, G=G, bq=bq, pp=pp, page_size=page_size, P=P, sm_scale=sm_scale,
        soft_cap=soft_cap, stacked=stacked, quantized=quantized, mxu_dtype=mxu_dtype,
        precision=precision)
    block = pl.BlockSpec((K, R, H), lambda i, *_: (0, i, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    scratch = [pltpu.VMEM((2, pp, page_size, 2 * K, H), data.dtype)]
    if quantized:
        scratch.append(pltpu.VMEM((2, pp, page_size, 2 * K), jnp.float32))
    scratch += [
        pltpu.SemaphoreType.DMA((2, 2)),  # [data | scale, buffer slot]
        pltpu.VMEM((K, R, 1), jnp.float32),  # m: running max
        pltpu.VMEM((K, R, 1), jnp.float32),  # l: running sum
        pltpu.VMEM((K, R, H), jnp.float32),  # acc
    ]
    cache_args = (kv_cache.data, kv_cache.scale) if quantized else (kv_cache,)
    args = (kv_lens, page_indices, cu_q_lens, block_seqs, params, qk, *cache_args)
    # NOTE: pallas_call reads the interpret mode when it is built, not when it is called.
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(qk.shape, q.dtype),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=5, grid=(num_blocks,),
                in_specs=[block, *[hbm] * len(cache_args)], out_specs=block,
                scratch_shapes=scratch),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
            name="jaxserve_ragged_paged_attention",
        )(*args)
    out = out.reshape(K, num_blocks * bq, G, H).transpose(1, 0, 2, 3)
    return out[:T].reshape(T, N, H)


def _kernel(
    kv_lens_ref,  # i32[S] (SMEM)
    page_indices_ref,  # i32[S*P]
    cu_q_lens_ref,  # i32[S+1]
    block_seqs_ref,  # i32[2 * num_blocks]: first and end sequence of each token block
    params_ref,  # i32[2]: layer, window (_NO_WINDOW for full attention)
    q_ref,  # f[K, R, H] (VMEM block)
    *refs,  # data_hbm f[(L,) pages, page_size, 2K, H], (scale_hbm f32[..., 2K]), o_ref f[K, R, H],
    #         kv_buf [2, pp, page_size, 2K, H], (scale_buf), sems DMA[2, 2], m, l, acc
    K, G, bq, pp, page_size, P, sm_scale, soft_cap, stacked, quantized, mxu_dtype, precision,
):
    if quantized:
        data_hbm, scale_hbm, o_ref, kv_buf, scale_buf, sems, m_ref, l_ref, acc_ref = refs
    else:
        data_hbm, o_ref, kv_buf, sems, m_ref, l_ref, acc_ref = refs
        scale_hbm = scale_buf = None
    R = bq * G
    C = pp * page_size
    i = pl.program_id(0)
    t0 = i * bq
    seq_lo, seq_hi = block_seqs_ref[2 * i], block_seqs_ref[2 * i + 1]
    layer, window = params_ref[0], params_ref[1]

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def span(s) -> _Span:
        """Sequence s (clamped to a real slot) within this program's tokens."""
        s = jnp.clip(s, 0, kv_lens_ref.shape[0] - 1)
        q_start, q_end = cu_q_lens_ref[s], cu_q_lens_ref[s + 1]
        ctx = kv_lens_ref[s] - (q_end - q_start)
        lo_tok, hi_tok = jnp.maximum(q_start, t0), jnp.minimum(q_end, t0 + bq)
        end_col = ctx + hi_tok - q_start
        first_col = jnp.maximum(ctx + lo_tok - q_start - window + 1, 0)
        live = hi_tok > lo_tok
        # NOTE: lax.div truncates, which is floor division for these non-negative operands.
        b_lo = jnp.where(live, lax.div(first_col, C), 0)
        b_hi = jnp.where(live, lax.div(end_col + C - 1, C), 0)
        return _Span(q_start, q_end, ctx, first_col, end_col, b_lo, b_hi)

    def first_item(s):
        """The first (sequence, KV block) at or after sequence s with work, or (seq_hi, 0)."""

        def idle(s):
            sp = span(s)
            return (s < seq_hi) & (sp.b_hi <= sp.b_lo)

        s = lax.while_loop(idle, lambda s: s + 1, s)
        return s, jnp.where(s < seq_hi, span(s).b_lo, 0)

    def each_page(sp: _Span, s, b, slot, method: str):
        """Start or wait for the DMAs of item (s, b), a page each into buffer `slot`; pages
        wholly outside [first_col, end_col) are not fetched (nor their page table entries read).
        """
        first = jnp.maximum(lax.div(sp.first_col, page_size) - b * pp, 0)
        end = jnp.minimum(lax.div(sp.end_col + page_size - 1, page_size) - b * pp, pp)

        @pl.loop(first, end)
        def _(j):
            phys = page_indices_ref[s * P + b * pp + j]
            where = (layer, phys) if stacked else (phys,)
            getattr(pltpu.make_async_copy(data_hbm.at[where], kv_buf.at[slot, j],
                                          sems.at[0, slot]), method)()
            if quantized:
                getattr(pltpu.make_async_copy(scale_hbm.at[where], scale_buf.at[slot, j],
                                              sems.at[1, slot]), method)()

    def compute(sp: _Span, b, slot):
        q_start, q_end, ctx = sp.q_start, sp.q_end, sp.ctx
        tok = t0 + lax.div(lax.broadcasted_iota(jnp.int32, (R, 1), 0), G)
        q_pos = ctx + tok - q_start  # i32[R, 1]
        col = b * C + lax.broadcasted_iota(jnp.int32, (1, C), 1)
        mask = ((tok >= q_start) & (tok < q_end)
                & (col <= q_pos) & (q_pos - col < window))  # bool[R, C]
        # NOTE: slots outside [first_col, end_col) are stale or unused and may hold NaN.
        col_v = b * C + lax.broadcasted_iota(jnp.int32, (C, 1), 0)
        v_ok = (col_v >= sp.first_col) & (col_v < sp.end_col)
        for h in range(K):
            kk = kv_buf[slot, :, :, h, :]  # [pp, page_size, H]
            vv = kv_buf[slot, :, :, K + h, :]
            if quantized:
                kk = kk.astype(jnp.float32) * scale_buf[slot, :, :, h:h + 1]
                vv = vv.astype(jnp.float32) * scale_buf[slot, :, :, K + h:K + h + 1]
            kk = kk.reshape(C, -1).astype(mxu_dtype)
            vv = jnp.where(v_ok, vv.reshape(C, -1).astype(jnp.float32), 0.0).astype(mxu_dtype)
            scores = lax.dot_general(
                q_ref[h].astype(mxu_dtype), kk, (((1,), (1,)), ((), ())),
                precision=precision, preferred_element_type=jnp.float32)
            scores = scores * sm_scale
            if soft_cap is not None:
                scores = jnp.tanh(scores / soft_cap) * soft_cap
            scores = jnp.where(mask, scores, -jnp.inf)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.where(mask, jnp.exp(scores - m_safe), 0.0)
            alpha = jnp.exp(m_prev - m_safe)  # 0 while a row has seen nothing
            l_ref[h] = l_ref[h] * alpha + p.sum(axis=1, keepdims=True)
            acc_ref[h] = acc_ref[h] * alpha + jnp.dot(
                p.astype(mxu_dtype), vv, precision=precision,
                preferred_element_type=jnp.float32)
            m_ref[h] = m_new

    def body(state):
        s, b, slot = state
        sp = span(s)
        s_next, b_next = lax.cond(b + 1 < sp.b_hi, lambda: (s, b + 1),
                                  lambda: first_item(s + 1))

        @pl.when(s_next < seq_hi)
        def _():
            each_page(span(s_next), s_next, b_next, 1 - slot, "start")

        each_page(sp, s, b, slot, "wait")
        compute(sp, b, slot)
        return s_next, b_next, 1 - slot

    s0, b0 = first_item(seq_lo)

    @pl.when(s0 < seq_hi)
    def _():
        each_page(span(s0), s0, b0, 0, "start")

    lax.while_loop(lambda state: state[0] < seq_hi, body, (s0, b0, jnp.int32(0)))

    for h in range(K):
        l = l_ref[h]
        o_ref[h] = (acc_ref[h] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
