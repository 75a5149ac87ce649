"""The `cpu` backend: ragged paged attention as a C++ kernel that XLA calls through its FFI.

XLA:CPU runs the gathers and reductions of the pure-jnp reference single-threaded at a few GB/s,
so attention over a batch of contexts costs more than the model's matmuls. This kernel reads each
cached key and value once per KV head with OpenMP threads. The source (`csrc/`) is compiled with
the system C++ compiler on first use and cached under `~/.cache/jaxserve/kernels`; where no
compiler works, `available()` says so and the engine falls back to `ref`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kernels_pallas.quant import QuantizedKVCache
from jaxserve.kernels_pallas.ref import validate_inputs

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "paged_attention_cpu.cc")
_TARGETS = {"float32": ("jaxserve_paged_attention_f32", "JaxservePagedAttentionF32"),
            "bfloat16": ("jaxserve_paged_attention_bf16", "JaxservePagedAttentionBF16")}
# NOTE: -ffast-math lets GCC vectorise expf (glibc vector math) and the dot reductions; the
# kernel never relies on inf or NaN (masked positions are never computed).
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DEFAULT_PAGE_SIZE = 16
QUANTIZED_KV = False  # reads int8/fp8 caches


def _cache_dir() -> str:
    return os.environ.get("JAXSERVE_KERNEL_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxserve", "kernels")


@functools.cache
def _library() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX) for the cpu attention kernel")
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, jax.__version__]).encode())
    path = os.path.join(_cache_dir(), f"paged_attention_cpu_{key.hexdigest()[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        logger.info("compiling the cpu attention kernel (once): %s", path)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "lib.so")
            cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling the cpu attention kernel failed:\n{proc.stderr}")
            os.replace(out, path)  # atomic: concurrent processes never load a partial file
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib


@functools.cache
def available() -> bool:
    """True when the kernel compiled and loaded; logs why not otherwise."""
    try:
        _library()
        return True
    except (RuntimeError, OSError) as e:
        logger.warning("cpu attention kernel unavailable, using the jnp reference: %s", e)
        return False


def ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, layer: int | None = None):
    """Same ABI as `ref.ragged_paged_attention`: float32 q/k/v, a float32 or bfloat16 cache;
    `layer` must be a Python int."""
    validate_inputs(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)
    if isinstance(kv_cache, QuantizedKVCache):
        raise ValueError("the cpu kernel does not read quantised (int8/fp8) caches; use the ref "
                         "backend")
    cache_dtype = jnp.dtype(kv_cache.dtype).name
    if q.dtype != jnp.float32 or cache_dtype not in _TARGETS:
        raise ValueError(f"the cpu kernel takes float32 q and a float32 or bfloat16 cache, got "
                         f"{q.dtype=}, {kv_cache.dtype=}")
    if layer is not None and not isinstance(layer, (int, np.integer)):
        raise ValueError("the cpu kernel needs a static layer index")
    if sliding_window is not None and not isinstance(sliding_window, (int, np.integer)):
        raise ValueError("the cpu kernel needs a static sliding window")
    _library()
    call = jax.ffi.ffi_call(
        _TARGETS[cache_dtype][0],
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype)),
        input_output_aliases={3: 1},
    )
    i32 = jnp.int32
    return call(q, k.astype(q.dtype), v.astype(q.dtype), kv_cache, kv_lens.astype(i32),
                page_indices.astype(i32), cu_q_lens.astype(i32), distribution.astype(i32),
                sm_scale=np.float32(sm_scale), sliding_window=np.int32(sliding_window or 0),
                soft_cap=np.float32(soft_cap or 0.0), layer=np.int64(layer or 0))
