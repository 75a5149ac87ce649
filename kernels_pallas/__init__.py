"""Ragged paged attention: one ABI, several backends (see DESIGN.md, "Attention ABI").

`ref` is pure jnp: the oracle for every other backend and the CPU path of the engine.
"""

from __future__ import annotations

from jaxserve.kernels_pallas.ref import init_kv_cache, ragged_paged_attention

__all__ = ["init_kv_cache", "ragged_paged_attention"]
