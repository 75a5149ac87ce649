"""Gemma 2: sandwich norms, (1 + w) RMSNorm, scaled embeddings, logit soft-capping, and
sliding-window attention on alternate layers."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.layers import MLP, Attention, LayerContext, RMSNorm
from jaxserve.models.llama import LlamaForCausalLM, LlamaModel


class Gemma2DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(D, eps=eps, dtype=dtype, plus_one=True)
        self.post_attention_layernorm = RMSNorm(D, eps=eps, dtype=dtype, plus_one=True)
        self.pre_feedforward_layernorm = RMSNorm(D, eps=eps, dtype=dtype, plus_one=True)
        self.post_feedforward_layernorm = RMSNorm(D, eps=eps, dtype=dtype, plus_one=True)

    def __call__(self, h, ctx: LayerContext, kv_cache, layer, window):
        attn, kv_cache = self.self_attn(self.input_layernorm(h), ctx, kv_cache, layer, window)
        h = h + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(h))
        h = h + self.post_feedforward_layernorm(mlp)
        return h, kv_cache


class Gemma2Model(LlamaModel):
    layer_cls = Gemma2DecoderLayer
    norm_plus_one = True

    def embed(self, token_ids):
        h = self.embed_tokens(token_ids)
        # NOTE: HF multiplies by sqrt(D) rounded to the activation dtype.
        scale = jnp.asarray(h.shape[-1] ** 0.5, h.dtype)
        return h * scale


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model
