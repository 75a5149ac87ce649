"""Quantised KV caches: int8 or float8 (e4m3, e5m2) values with one float32 scale per token and head.

`--kv-cache-dtype int8 | fp8` halves (bfloat16 models) or quarters (float32 models) the KV
cache's memory. Scales are computed as the K/V are written (absolute maximum of each token's head
over `head_dim`, divided by the format's largest value), so no calibration is needed and a scale
never saturates. Every backend reads values as `data * scale`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


class QuantizedKVCache(NamedTuple):
    """data: int8 | float8_e4m3fn [(L,) pages, page_size, 2K, H]; scale: f32[(L,) pages,
    page_size, 2K] (keys in heads [0, K), values in [K, 2K), as in a float cache)."""

    data: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim


def is_quantized_dtype(dtype) -> bool:
    return jnp.dtype(dtype) in QUANTIZED_DTYPES


def max_value(dtype) -> float:
    """The largest finite value of a quantised format."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return 127.0
    return float(jnp.finfo(dtype).max)


def quantize(x, dtype):
    """f[..., H] -> (data dtype[..., H], scale f32[...]) with x ~= data * scale."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / max_value(dtype), 1.0)
    y = x / scale[..., None]
    if jnp.dtype(dtype) == jnp.int8:
        y = jnp.clip(jnp.round(y), -127, 127)
    return y.astype(dtype), scale


def dequantize(data, scale):
    """(data dtype[..., H], scale f32[...]) -> f32[..., H]."""
    return data.astype(jnp.float32) * scale[..., None].astype(jnp.float32)


def kv_bytes_per_token_head(head_dim: int, dtype) -> int:
    """Bytes one token's key (or value) of one head takes in a cache of `dtype`."""
    itemsize = jnp.dtype(dtype).itemsize
    return head_dim * itemsize + (4 if is_quantized_dtype(dtype) else 0)
