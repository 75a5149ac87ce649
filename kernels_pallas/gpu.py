"""The `gpu` backend: ragged paged attention (mixed prefill + decode) as a Pallas kernel that
lowers through Triton.

Lowering. The project's direction is Mosaic GPU on Hopper. This kernel uses the portable Pallas
subset that lowers through **Triton** instead (`pltriton.CompilerParams`), because in jax 0.10.2
a Mosaic GPU kernel cannot be checked on a CPU: the Mosaic GPU interpreter has no rule for
`plgpu.layout_cast` (which score masks built from iota need), its `wgmma` rejects
`plgpu.transpose_ref` operands (needed for Q @ K^T), and it only understands plain indexing of
shared memory, not the tiling and swizzle transforms that real wgmma operands need. A Mosaic GPU
kernel that ran here would not be the one that runs on an H100. `interpret=True` runs this kernel
with Pallas' generic interpreter on CPU.

Layout. The step's tokens form one ragged stream (see `ref`). For KV head `k` the kernel sees
the q rows of that head's query group, token-major: row `t * G + g` is token `t`, query head
`k * G + g` (G = N // K). The wrapper lays q out as `f[K, rows, H]` and gives each row its
sequence and position (`i32[rows]`; sequence -1 marks a padded token or padded row). The grid
is (row blocks, KV heads). A program holds a block of `block_rows` rows (a power of two >= 16,
any G: a block may start mid-token) and:

1. finds the sequences its rows belong to (`min`/`max` of the row sequences);
2. for each of them, the positions its rows need: from the earliest row's window start to the
   latest row's position, and loops over exactly those positions in kv blocks of `block_kv =
   min(default_block_kv(H, dtype), page_size)` slots (a page, or a slice of one; 64, or 32 for
   float32 at head_dim 256): the page id comes from `page_indices[s * P + j]` (a scalar load),
   then the block's keys `cache[page, slots, k, :]` and values `cache[page, slots, K + k, :]`
   (each `[block_kv, H]`, strided in the cache) are loaded straight from the full cache in HBM;
3. scores `[block_rows, block_kv]` = q @ K^T (tensor cores for bfloat16, IEEE float32 for a
   float32 cache), optional tanh soft cap, masked to the sequence's rows, causality and the
   window; an online softmax in float32 across every kv block of every sequence of the block (a
   row only ever sees its own sequence, so one running max/sum per row suffices);
4. masked probabilities are set to 0 and value rows outside the needed positions are zeroed
   before P @ V, so the NaN that unused slots may hold never reaches the output.

Head dims that are not a power of two (multiples of 16, e.g. 80 or 96) are processed as a sum
of power-of-two chunks (80 = 64 + 16), since Triton tensors must have power-of-two sizes. A
stacked cache `f[L, pages, ...]` is viewed as `f[L * pages, ...]` and the layer becomes an
offset added to every page id, so `layer` may be traced.

A quantised cache (int8, float8_e4m3fn or float8_e5m2 data, one float32 scale per token and
head) is read as its data converted to the MMA dtype, with the key scales applied to the score
columns and the value scales to the probability columns, so no dequantised page is ever built.
The MMA dtype is the cache's for a float cache; for a quantised one, bfloat16 when q is bfloat16
and float32 otherwise. New K/V are written by `ref.write_kv` first; the kernel only reads the cache.

What compiles where (deviceless: XLA GPU, Triton and ptxas from jax-cuda12-plugin 0.10.2 for an
H100 target; `pytest -m aot`, `scripts/aot_sweep.py`, docs/performance.md): float32, bfloat16,
int8, float8_e4m3fn and float8_e5m2 caches, head dims 64, 128 and 256, GQA ratios 1, 2, 3, 4 and
8, 1 to 4 KV heads per shard (one per shard over two H100s), page sizes 16 (the default), 32 and
64, sliding window, soft cap, stacked caches and every batch kind. H200 is the same SM 9.0 part.

Known limits: numbers are checked in interpret mode on CPU and builds by the H100 target's
compiler, not yet run on a GPU; speed is unmeasured. The block size and warp/stage counts are
untuned defaults. Page sizes must be powers of two in [16, 256] and head dims multiples of 16
(a ValueError names the value otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxserve.kernels_pallas.quant import QuantizedKVCache, is_quantized_dtype
from jaxserve.kernels_pallas.ref import token_layout, validate_inputs, write_kv

DEFAULT_PAGE_SIZE = 16
QUANTIZED_KV = True  # reads int8/fp8 caches
CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 16, 256
# NOTE: "no window"; positions stay far below 2**30, so `pos - kv_pos < _NO_WINDOW` always holds
# and `pos - window + 1` cannot overflow.
_NO_WINDOW = 1 << 30
_KV_TILE_BYTES = 32 << 10  # at most one K (or V) tile of block_kv x head_dim in shared memory


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _head_chunks(head_dim: int) -> tuple[tuple[int, int], ...]:
    """(start, size) power-of-two chunks covering head_dim, largest first: 80 -> (0,64), (64,16)."""
    chunks, start = [], 0
    for bit in reversed(range(head_dim.bit_length())):
        size = 1 << bit
        if head_dim & size:
            chunks.append((start, size))
            start += size
    return tuple(chunks)


def default_block_kv(head_dim: int, dot_dtype) -> int:
    """Cache slots per inner step: 64, fewer where one `[block_kv, head_dim]` tile of the MMA
    dtype would pass 32 KiB. Triton pipelines the K and V tiles in shared memory, and for float32
    at head_dim 256 with 32 rows per program 64 slots need more than an H100 has per block (232
    KiB: the compiler says RESOURCE_EXHAUSTED)."""
    fit = _KV_TILE_BYTES // (pl.next_power_of_2(head_dim) * jnp.dtype(dot_dtype).itemsize)
    return int(max(16, min(64, fit)))


def default_block_rows(group: int) -> int:
    """q rows (token, query head of the group) per program: room for 4 tokens' groups, 16..64."""
    return int(min(64, max(16, pl.next_power_of_2(4 * group))))


def _kernel(
    meta_ref,  # i32[2]: window (_NO_WINDOW for none), page offset of the layer
    page_indices_ref,  # i32[S*P]
    row_seq_ref,  # i32[block_rows]: sequence of each row, -1 for padding
    row_pos_ref,  # i32[block_rows]: position of each row's token in its sequence
    q_ref,  # f[block_rows, H]
    cache_ref,  # f[L * pages, page_size, 2K, H] (int8 / fp8 for a quantised cache)
    *refs,  # (scale_ref f32[L * pages, page_size, 2K] if quantised), o_ref f[block_rows, H]
    sm_scale: float,
    soft_cap: float | None,
    num_kv_heads: int,
    pages_per_seq: int,
    head_chunks: tuple[tuple[int, int], ...],
    dot_dtype,
    block_kv: int,
):
    *scale_ref, o_ref = refs
    scale_ref = scale_ref[0] if scale_ref else None
    block_rows = q_ref.shape[0]
    page_size = cache_ref.shape[1]
    # IEEE float32 for a float32 cache (Triton would use TF32 otherwise); bf16 MMAs else.
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    kv_head = pl.program_id(1)
    window = meta_ref[0]
    page_offset = meta_ref[1]

    row_seq = row_seq_ref[...]  # i32[block_rows]
    row_pos = row_pos_ref[...]  # i32[block_rows]
    q = [(q_ref[:, pl.ds(c0, cs)].astype(jnp.float32) * sm_scale).astype(dot_dtype)
         for c0, cs in head_chunks]  # f[block_rows, cs] per chunk
    real = row_seq >= 0
    first_seq = jnp.min(jnp.where(real, row_seq, _NO_WINDOW))
    last_seq = jnp.max(jnp.where(real, row_seq, -1))
    blocks_per_page = page_size // block_kv
    last_block = pages_per_seq * blocks_per_page - 1  # of a sequence's page table
    slot = lax.broadcasted_iota(jnp.int32, (block_kv,), 0)

    def attend_seq(s, carry):
        in_seq = row_seq == s  # bool[block_rows]
        lo_pos = jnp.min(jnp.where(in_seq, row_pos, _NO_WINDOW))
        hi_pos = jnp.max(jnp.where(in_seq, row_pos, -1))  # -1: no rows (an empty slot)
        first_pos = jnp.maximum(lo_pos - window + 1, 0)

        def attend_block(j, carry):
            m, l, acc = carry  # f32[block_rows], f32[block_rows], per chunk f32[block_rows, cs]
            page = page_indices_ref[s * pages_per_seq + j // blocks_per_page] + page_offset
            slots = pl.ds(0 if blocks_per_page == 1 else j % blocks_per_page * block_kv, block_kv)
            kv_pos = j * block_kv + slot  # i32[block_kv]
            scores = None
            for (c0, cs), qc in zip(head_chunks, q):
                kc = cache_ref[page, slots, kv_head, pl.ds(c0, cs)]  # f[block_kv, cs]
                sc = pltriton.dot(qc, kc.astype(dot_dtype), trans_b=True, precision=precision)
                scores = sc if scores is None else scores + sc  # f32[block_rows, block_kv]
            if scale_ref is not None:  # a quantised key is data * scale: scale the scores
                scores = scores * scale_ref[page, slots, kv_head][None, :]
            if soft_cap is not None:
                scores = jnp.tanh(scores / soft_cap) * soft_cap
            mask = (in_seq[:, None]
                    & (kv_pos[None, :] <= row_pos[:, None])
                    & (row_pos[:, None] - kv_pos[None, :] < window))
            scores = jnp.where(mask, scores, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(scores, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing yet
            p = jnp.where(mask, jnp.exp(scores - m_safe[:, None]), 0.0)
            alpha = jnp.exp(jnp.where(m == -jnp.inf, m_safe, m) - m_safe)
            l = l * alpha + jnp.sum(p, axis=1)
            # Slots past the context (or before the window) may hold NaN: zero them for P @ V.
            needed = (kv_pos >= first_pos) & (kv_pos <= hi_pos)  # bool[block_kv]
            if scale_ref is not None:  # a quantised value is data * scale: scale P's columns
                v_scale = scale_ref[page, slots, num_kv_heads + kv_head]  # f32[block_kv]
                p = p * jnp.where(needed, v_scale, 0.0)[None, :]
            p = p.astype(dot_dtype)
            new_acc = []
            for (c0, cs), a in zip(head_chunks, acc):
                vc = cache_ref[page, slots, num_kv_heads + kv_head, pl.ds(c0, cs)]
                # NOTE: convert first: Triton cannot make a float8 zero to select against.
                vc = jnp.where(needed[:, None], vc.astype(dot_dtype), 0)  # f[block_kv, cs]
                new_acc.append(a * alpha[:, None] + pltriton.dot(p, vc, precision=precision))
            return m_new, l, tuple(new_acc)

        # NOTE: clamped to the page table, so a context longer than it cannot read past it.
        stop = jnp.minimum(hi_pos // block_kv, last_block) + 1
        return lax.fori_loop(first_pos // block_kv, stop, attend_block, carry)

    init = (jnp.full((block_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((block_rows,), jnp.float32),
            tuple(jnp.zeros((block_rows, cs), jnp.float32) for _, cs in head_chunks))
    _, l, acc = lax.fori_loop(first_seq, last_seq + 1, attend_seq, init)
    inv = 1.0 / jnp.where(l > 0, l, 1.0)
    for (c0, cs), a in zip(head_chunks, acc):
        o_ref[:, pl.ds(c0, cs)] = (a * inv[:, None]).astype(o_ref.dtype)


def _dot_dtype(q_dtype, cache_dtype):
    """The dtype of both MMA operands: the cache's for a float cache; for a quantised one,
    bfloat16 with bfloat16 q (int8 and e4m3 values are exact in bfloat16), float32 else."""
    if is_quantized_dtype(cache_dtype):
        return jnp.dtype(jnp.bfloat16 if q_dtype == jnp.bfloat16 else jnp.float32)
    return jnp.dtype(cache_dtype)


def _check_supported(q, kv_cache, layer, block_rows, block_kv) -> None:
    dtype = jnp.dtype(kv_cache.dtype)
    if dtype not in CACHE_DTYPES and not is_quantized_dtype(dtype):
        raise ValueError(f"the gpu kernel reads float32, bfloat16, int8 or float8 caches, "
                         f"got {kv_cache.dtype=}; use the ref backend")
    if kv_cache.ndim != (4 if layer is None else 5):
        raise ValueError(f"kv_cache must be f[pages, page_size, 2K, H], or f[L, ...] with layer=; "
                         f"got {kv_cache.shape=} with {layer=}")
    page_size, head_dim = kv_cache.shape[-3], q.shape[-1]
    if not (_is_power_of_two(page_size) and MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE):
        raise ValueError(f"the gpu kernel needs a power-of-two page size in "
                         f"[{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}] (--block-size), got {page_size=}")
    if head_dim % 16:
        raise ValueError(f"the gpu kernel needs head_dim a multiple of 16, got {head_dim=}")
    if not (_is_power_of_two(block_rows) and block_rows >= 16):
        raise ValueError(f"block_rows must be a power of two >= 16, got {block_rows=}")
    if not (_is_power_of_two(block_kv) and block_kv >= 16):
        raise ValueError(f"block_kv must be a power of two >= 16, got {block_kv=}")


def ragged_paged_attention(
    q,  # f[T, N, H]
    k,  # f[T, K, H]
    v,  # f[T, K, H]
    kv_cache,  # f[(L,) pages, page_size, 2K, H] (float32, bfloat16) or a QuantizedKVCache
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
    block_rows: int | None = None,  # q rows per program; default_block_rows(N // K)
    block_kv: int | None = None,  # cache slots per inner step; default_block_kv(H, dtype)
    num_warps: int = 4,
    num_stages: int = 2,
):
    """Write the new K/V into the cache, then attend. Returns (out f[T, N, H], kv_cache)."""
    validate_inputs(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
    T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    block_rows = block_rows or default_block_rows(G)
    block_kv = block_kv or default_block_kv(H, _dot_dtype(q.dtype, kv_cache.dtype))
    _check_supported(q, kv_cache, layer, block_rows, block_kv)
    kv_cache = write_kv(k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution,
                        layer=layer)
    out = _attend(q, kv_cache, kv_lens, page_indices, cu_q_lens, distribution,
                  sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  layer=layer, interpret=interpret, block_rows=block_rows, block_kv=block_kv,
                  num_warps=num_warps, num_stages=num_stages)
    return out, kv_cache


def _attend(q, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *, sm_scale,
            sliding_window, soft_cap, layer, interpret, block_rows, block_kv, num_warps,
            num_stages):
    T, N, H = q.shape
    K = kv_cache.shape[-2] // 2
    G = N // K
    S = kv_lens.shape[0]
    P = page_indices.shape[0] // S
    num_pages = kv_cache.shape[-4]
    rows = T * G
    num_blocks = pl.cdiv(rows, block_rows)
    pad = num_blocks * block_rows - rows

    seq, pos, valid = token_layout(kv_lens, cu_q_lens, distribution, T)
    row_seq = jnp.pad(jnp.repeat(jnp.where(valid, seq, -1), G), (0, pad), constant_values=-1)
    row_pos = jnp.pad(jnp.repeat(pos, G), (0, pad))
    q_rows = q.reshape(T, K, G, H).transpose(1, 0, 2, 3).reshape(K, rows, H)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, pad), (0, 0)))  # f[K, rows + pad, H]

    window = jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32)
    window = jnp.where(window > 0, window, _NO_WINDOW)
    page_offset = jnp.asarray(0 if layer is None else layer, jnp.int32) * num_pages
    meta = jnp.stack([window, page_offset]).astype(jnp.int32)
    # Stacked caches are viewed as one of L * pages pages (a free reshape).
    if isinstance(kv_cache, QuantizedKVCache):
        cache = [kv_cache.data.reshape(-1, *kv_cache.shape[-3:]),  # i8|f8[L*pages, page, 2K, H]
                 kv_cache.scale.reshape(-1, *kv_cache.scale.shape[-2:])]  # f32[L*pages, page, 2K]
    else:
        cache = [kv_cache.reshape(-1, *kv_cache.shape[-3:])]  # f[L * pages, page_size, 2K, H]

    kernel = functools.partial(
        _kernel, sm_scale=float(sm_scale), soft_cap=None if not soft_cap else float(soft_cap),
        num_kv_heads=K, pages_per_seq=P, head_chunks=_head_chunks(H),
        dot_dtype=_dot_dtype(q.dtype, kv_cache.dtype),
        block_kv=min(block_kv, kv_cache.shape[-3]))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))  # noqa: E731
    row_block = pl.BlockSpec((block_rows,), lambda i, h: (i,))
    q_block = pl.BlockSpec((None, block_rows, H), lambda i, h: (h, i, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, K),
        in_specs=[whole(meta.shape), whole(page_indices.shape), row_block, row_block, q_block,
                  *(whole(x.shape) for x in cache)],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(meta, page_indices.astype(jnp.int32), row_seq, row_pos, q_rows, *cache)
    out = out[:, :rows].reshape(K, T, G, H).transpose(1, 0, 2, 3)
    return out.reshape(T, N, H)


__all__ = ["DEFAULT_PAGE_SIZE", "default_block_kv", "default_block_rows", "ragged_paged_attention"]
