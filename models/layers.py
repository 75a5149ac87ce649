"""Blocks shared by every architecture: norms, rotary embedding, attention, MLP, the layer scan.

Axis letters: T tokens, D model, N query heads, K KV heads, G = N/K, H head dim, F MLP, V vocab.
Every module's attribute names mirror HF checkpoint keys (`q_proj`, `input_layernorm`, ...); the
loader's mapping table (`models/weights.py`) relies on that.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.sharding.attention import attention


class AttentionMetadata(NamedTuple):
    """Per-step layout of the ragged token stream (see DESIGN.md, "Attention ABI")."""

    kv_lens: jax.Array  # i32[S] context length of each sequence, new tokens included
    page_indices: jax.Array  # i32[S*P] flattened page table
    cu_q_lens: jax.Array  # i32[S+1] token offsets of each sequence in the stream
    distribution: jax.Array  # i32[3] cumulative counts: decode, chunked prefill, mixed


def normal_init(rngs: nnx.Rngs, shape, dtype, std: float = 0.02):
    return jax.random.normal(rngs.params(), shape, dtype) * std


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). `kernel f[in, out]` is HF's `weight` transposed."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init(rngs, (din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal_init(rngs, (vocab, dim), dtype))  # f[V, D]

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x):  # tied output projection: f[S, D] -> f[S, V]
        return x @ self.weight[...].T


class RMSNorm(nnx.Module):
    """RMSNorm in float32; Gemma's variant scales by (1 + weight)."""

    def __init__(self, dim: int, *, eps: float, dtype, plus_one: bool = False):
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return (x * (1.0 + w if self.plus_one else w)).astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies f64[H/2] with HF's scaling rules (default, linear, llama3)."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        old_len = rs.original_max_position_embeddings or cfg.max_position_embeddings
        low_wavelen = old_len / rs.low_freq_factor
        high_wavelen = old_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(positions, inv_freq):
    """cos, sin f32[T, H] for HF's rotate-half convention."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):  # x f[T, heads, H]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[:, None, :] + rotated.astype(jnp.float32) * sin[:, None, :]
    return out.astype(x.dtype)


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    return lambda x: jax.nn.gelu(x, approximate=False)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(D, F, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(D, F, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(F, D, bias=False, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):  # f[T, D] -> f[T, D]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LayerContext(NamedTuple):
    """What every layer of one step shares (built once per step, outside the layer scan)."""

    cos: jax.Array  # f32[T, H]
    sin: jax.Array  # f32[T, H]
    md: AttentionMetadata
    backend: str  # attention backend (kernels_pallas.BACKENDS)


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional qkv bias, q/k norm and logit soft-capping."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(D, N * H, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, K * H, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, K * H, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(N * H, D, bias=False, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.shape = (N, K, H)
        self.sm_scale = cfg.sm_scale
        self.soft_cap = cfg.attn_logit_softcap

    def __call__(self, x, ctx: LayerContext, kv_cache, layer, window):
        N, K, H = self.shape
        T = x.shape[0]
        q = self.q_proj(x).reshape(T, N, H)
        k = self.k_proj(x).reshape(T, K, H)
        v = self.v_proj(x).reshape(T, K, H)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        md = ctx.md
        out, kv_cache = attention(
            q, k, v, kv_cache, md.kv_lens, md.page_indices, md.cu_q_lens, md.distribution,
            sm_scale=self.sm_scale, sliding_window=window or None, soft_cap=self.soft_cap,
            backend=ctx.backend, layer=layer)
        return self.o_proj(out.reshape(T, N * H)), kv_cache


def run_layers(layers, h, ctx: LayerContext, kv_cache, windows: tuple[int, ...]):
    """Run the decoder layers in order, threading the hidden state and the stacked KV cache.

    NOTE: the loop is unrolled on purpose. XLA:CPU copies a layer's weights out of stacked
    `f[L, ...]` arrays on every `lax.scan` iteration (about 18 ms per step for this project's
    default model, see docs/performance.md); separate per-layer arrays are read in place.
    """
    for idx, layer in enumerate(layers):
        h, kv_cache = layer(h, ctx, kv_cache, idx, windows[idx])
    return h, kv_cache
