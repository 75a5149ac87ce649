"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE): pre-norm blocks, RoPE,
GQA, SwiGLU.

The members differ only in what `ModelConfig` records: qkv bias (Qwen2), q/k norm (Qwen3),
sliding windows (Mistral, Qwen2 with `use_sliding_window`), rope scaling (Llama 3), and a sparse
mixture of experts in place of the MLP on the layers `moe_layers` marks (Mixtral, Qwen3-MoE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.layers import (MLP, Attention, AttentionMetadata, Embedding, LayerContext,
                                    Linear, RMSNorm, rope_cos_sin, rope_inv_freq, run_layers)
from jaxserve.models.moe import SparseMoeBlock


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        mlp_cls = SparseMoeBlock if cfg.moe_layers[layer_idx] else MLP
        self.mlp = mlp_cls(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, h, ctx: LayerContext, kv_cache, layer, window):
        attn, kv_cache = self.self_attn(self.input_layernorm(h), ctx, kv_cache, layer, window)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, kv_cache


class LlamaModel(nnx.Module):
    layer_cls = LlamaDecoderLayer
    norm_plus_one = False

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, attention_backend: str):
        self.attention_backend = nnx.static(attention_backend)
        self.embed_tokens = Embedding(cfg.vocab_rows, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([self.layer_cls(cfg, idx, dtype=dtype, rngs=rngs)
                                for idx in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
                            plus_one=self.norm_plus_one)
        self.inv_freq = nnx.static(tuple(float(f) for f in rope_inv_freq(cfg)))
        self.windows = nnx.static(tuple(cfg.sliding_windows))

    def embed(self, token_ids):
        return self.embed_tokens(token_ids)

    def context(self, positions, md: AttentionMetadata) -> LayerContext:
        """What every layer of a step shares (a pipeline stage builds its own)."""
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return LayerContext(cos=cos, sin=sin, md=md, backend=self.attention_backend)

    def __call__(self, token_ids, positions, kv_cache, md: AttentionMetadata):
        """token_ids i32[T], positions i32[T] -> (hidden f[T, D], kv_cache)."""
        h = self.embed(token_ids)
        h, kv_cache = run_layers(self.layers, h, self.context(positions, md), kv_cache,
                                 self.windows)
        return self.norm(h), kv_cache


class LlamaForCausalLM(nnx.Module):
    model_cls = LlamaModel

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 attention_backend: str = "ref"):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = nnx.static(cfg)
        self.model = self.model_cls(cfg, dtype=dtype, rngs=rngs,
                                    attention_backend=attention_backend)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_rows, bias=False, dtype=dtype,
                                  rngs=rngs)

    def __call__(self, token_ids, positions, kv_cache, md: AttentionMetadata):
        """Forward the step's tokens. Returns (kv_cache, hidden f[T, D])."""
        h, kv_cache = self.model(token_ids, positions, kv_cache, md)
        return kv_cache, h

    def compute_logits(self, h) -> jax.Array:
        """f[S, D] -> f32[S, V]."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        logits = logits[:, :self.config.vocab_size].astype(jnp.float32)  # drop tp's padding
        cap = self.config.final_logit_softcap
        if cap:
            logits = jnp.tanh(logits / cap) * cap
        return logits
