"""Tiny random HF models of every supported architecture, built locally for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "Gemma2ForCausalLM"]


def tiny_hf_config(arch: str, **overrides):
    """2 layers, GQA (4 query heads over 2 KV heads), a small vocabulary."""
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
    # Random norms and biases too, so a swapped or skipped tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
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
