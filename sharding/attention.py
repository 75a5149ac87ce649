"""Attention over the mesh: each model-axis shard attends with its own heads and its own slice of
the KV cache (`shard_map`), so every backend, Pallas and FFI kernels included, runs per shard
exactly as on one device.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from jaxserve.kernels_pallas import ragged_paged_attention, runs_interpreted
from jaxserve.sharding.mesh import MODEL
from jaxserve.sharding.rules import kv_cache_spec


def model_axis_size() -> int:
    """The model axis' size in the mesh being traced under (`jax.set_mesh`), else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names:
        return 1
    return mesh.shape[MODEL]


def attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *, sm_scale,
              sliding_window=None, soft_cap=None, backend="ref", interpret=False, layer=None):
    """`kernels_pallas.ragged_paged_attention`, split over the model axis when there is one."""
    interpret = interpret or runs_interpreted(backend)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  backend=backend, interpret=interpret, layer=layer)
    if model_axis_size() == 1:
        return ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens,
                                      distribution, **kwargs)
    heads = P(None, MODEL, None)
    cache = kv_cache_spec(kv_cache, stacked=layer is not None)
    # NOTE: the traced sliding window (a per-layer scalar) and the page metadata are replicated.
    per_shard = jax.shard_map(
        lambda q, k, v, c, *md: ragged_paged_attention(q, k, v, c, *md, **kwargs),
        in_specs=(heads, heads, heads, cache, P(), P(), P(), P()),
        out_specs=(heads, cache), check_vma=False)
    return per_shard(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
