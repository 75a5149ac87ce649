"""Tiny random HF models of every supported architecture, built locally for parity tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxserve.kernels_pallas import init_kv_cache
from jaxserve.models.layers import AttentionMetadata

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "Gemma2ForCausalLM"]
# Sparse mixture of experts: 8 experts, top 2; tested in test_moe.py.
MOE_ARCHITECTURES = ["MixtralForCausalLM", "Qwen3MoeForCausalLM"]


def tiny_hf_config(arch: str, **overrides):
    """2 layers, GQA (4 query heads over 2 KV heads), a small vocabulary. The MoE models route
    each token to 2 of 8 experts; Qwen3-MoE's first layer is a dense MLP (`mlp_only_layers`)."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  architectures=[arch], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "LlamaForCausalLM":
        cfg = transformers.LlamaConfig(
            **common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64})
    elif arch == "MistralForCausalLM":
        cfg = transformers.MistralConfig(**common, sliding_window=8, head_dim=16)
    elif arch == "Qwen2ForCausalLM":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "Qwen3ForCausalLM":
        cfg = transformers.Qwen3Config(**common, head_dim=32)
    elif arch == "MixtralForCausalLM":
        cfg = transformers.MixtralConfig(**common, sliding_window=8, num_local_experts=8,
                                         num_experts_per_tok=2)
    elif arch == "Qwen3MoeForCausalLM":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=16, num_experts=8,
                                          num_experts_per_tok=2, moe_intermediate_size=32,
                                          norm_topk_prob=True, mlp_only_layers=[0])
    elif arch == "Gemma2ForCausalLM":
        cfg = transformers.Gemma2Config(**common, head_dim=16, sliding_window=8,
                                        query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh")
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_hf_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                          attn_implementation="eager")
    # Random norms and biases too, so a swapped or skipped tensor shows; routers' logits of order
    # one, so that no token's k-th and (k+1)-th experts are a rounding error apart.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.3)
    return model.eval()


def hf_state_items(model):
    return [(k, v.detach().float().numpy()) for k, v in model.state_dict().items()]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None,
                             min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def random_prompts(seed: int, lengths: list[int], vocab: int = 128) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def hf_logits(model, prompts: list[list[int]]) -> np.ndarray:
    """f32[sum of lengths, V]: each prompt run alone through the HF model, concatenated."""
    with torch.no_grad():
        return np.concatenate([model(torch.tensor([p])).logits[0].numpy() for p in prompts])


def jax_logits(model, prompts: list[list[int]]) -> np.ndarray:
    """f32[sum of lengths, V]: the prompts' prefill as one ragged stream through our model."""
    cfg = model.config
    page_size, P = 4, 8  # up to 32 tokens a prompt
    S = len(prompts)
    lens = [len(p) for p in prompts]
    cache = init_kv_cache(S * P, page_size, cfg.num_kv_heads, cfg.head_dim, jnp.float32,
                          num_layers=cfg.num_layers)
    ids = np.concatenate(prompts).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    md = AttentionMetadata(jnp.array(lens, jnp.int32), jnp.arange(S * P, dtype=jnp.int32),
                           jnp.array(np.cumsum([0] + lens), jnp.int32),
                           jnp.array([0, 0, S], jnp.int32))
    _, h = model(jnp.asarray(ids), jnp.asarray(pos), cache, md)
    return np.asarray(model.compute_logits(h))
