"""Ragged paged attention: one ABI, several backends (see DESIGN.md, "Attention ABI").

- `ref`: pure jnp, the oracle for every other backend; runs anywhere.
- `cpu`: a C++ kernel called through XLA's FFI, the engine's default on CPU (float32).
- `tpu`: Pallas Mosaic TPU (`interpret=True`: under `pltpu.force_tpu_interpret_mode()` on CPU).
- `gpu`: Pallas for GPU (`interpret=True`: Pallas' interpreter on CPU).

Every backend writes the step's new K/V through `ref.write_kv` (a scatter XLA performs in place
on the donated cache) and differs only in how it attends.
"""

from __future__ import annotations

import importlib

import jax

from jaxserve.kernels_pallas import ref
from jaxserve.kernels_pallas.quant import QuantizedKVCache, is_quantized_dtype

BACKENDS = ("ref", "cpu", "tpu", "gpu")
PALLAS_BACKENDS = ("tpu", "gpu")
init_kv_cache = ref.init_kv_cache


def backend_module(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available; choose from {BACKENDS}")
    return importlib.import_module(f"jaxserve.kernels_pallas.{backend}")


def default_backend(platform: str | None = None) -> str:
    """The attention backend for a JAX platform: `tpu` on TPU, `gpu` on CUDA/ROCm, `cpu` else
    (the engine falls back to `ref` where the cpu kernel cannot serve a dtype)."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "cpu"


def default_page_size(backend: str) -> int:
    """Tokens per KV page the backend is tuned for (`--block-size` overrides)."""
    return backend_module(backend).DEFAULT_PAGE_SIZE


def reads_quantized(backend: str) -> bool:
    """Whether the backend reads int8/fp8 KV caches (`QuantizedKVCache`)."""
    return backend_module(backend).QUANTIZED_KV


def target_platform(platform: str | None = None) -> str:
    """The platform a computation is built for: `platform` when given, else that of the mesh
    being traced under (`jax.set_mesh`: a deviceless compile for a TPU slice on a CPU host
    traces under a TPU mesh), else JAX's default backend."""
    if platform:
        return platform
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def runs_interpreted(backend: str, platform: str | None = None) -> bool:
    """Whether a Pallas backend runs in interpret mode (checked, not fast): when the platform it
    is built for (`target_platform(platform)`) is not its own. Decided per trace, so a TPU
    target compiled on a CPU host gets the Mosaic kernel, not the interpreter."""
    return backend in PALLAS_BACKENDS and default_backend(target_platform(platform)) != backend


def ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *,
                           sm_scale: float, sliding_window=None, soft_cap=None,
                           backend: str = "ref", interpret: bool = False, layer=None):
    """Write the new K/V into `kv_cache`, then attend. Returns (out f[T, N, H], kv_cache).

    q f[T, N, H]; k, v f[T, K, H]; kv_cache f[(L,) pages, page_size, 2K, H] (or a
    `QuantizedKVCache`); kv_lens i32[S]; page_indices i32[S*P]; cu_q_lens i32[S+1];
    distribution i32[3]. `layer` selects a layer of a stacked cache.
    """
    module = backend_module(backend)
    if interpret and backend not in PALLAS_BACKENDS:
        raise ValueError(f"interpret mode applies to Pallas backends {PALLAS_BACKENDS}, not "
                         f"{backend!r}")
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, layer=layer)
    if backend in PALLAS_BACKENDS:
        kwargs["interpret"] = interpret
    return module.ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens,
                                         distribution, **kwargs)


__all__ = ["BACKENDS", "PALLAS_BACKENDS", "QuantizedKVCache", "default_backend",
           "default_page_size", "init_kv_cache", "is_quantized_dtype", "ragged_paged_attention",
           "reads_quantized", "runs_interpreted", "target_platform"]
