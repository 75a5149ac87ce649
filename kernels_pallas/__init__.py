"""Ragged paged attention: one ABI, several backends (see DESIGN.md, "Attention ABI").

- `ref`: pure jnp, the oracle for every other backend; runs anywhere.
- `cpu`: a C++ kernel called through XLA's FFI, the engine's default on CPU (float32).
"""

from __future__ import annotations

from jaxserve.kernels_pallas import ref

BACKENDS = ("ref", "cpu")
init_kv_cache = ref.init_kv_cache


def ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *,
                           sm_scale: float, sliding_window=None, soft_cap=None,
                           backend: str = "ref", interpret: bool = False, layer=None):
    """Write the new K/V into `kv_cache`, then attend. Returns (out f[T, N, H], kv_cache).

    q f[T, N, H]; k, v f[T, K, H]; kv_cache f[(L,) pages, page_size, 2K, H]; kv_lens i32[S];
    page_indices i32[S*P]; cu_q_lens i32[S+1]; distribution i32[3]. `layer` selects a layer of
    a stacked cache.
    """
    if backend == "ref":
        fn = ref.ragged_paged_attention
    elif backend == "cpu":
        from jaxserve.kernels_pallas import cpu

        fn = cpu.ragged_paged_attention
    else:
        raise ValueError(f"attention backend {backend!r} is not available; choose from {BACKENDS}")
    if interpret and backend != "ref":
        raise ValueError(f"interpret mode applies to Pallas backends, not {backend!r}")
    return fn(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution,
              sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, layer=layer)


__all__ = ["BACKENDS", "init_kv_cache", "ragged_paged_attention"]
