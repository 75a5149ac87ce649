"""Model parity: our Flax models give `transformers`' logits on tiny random configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.kernels_pallas import init_kv_cache
from jaxserve.models.layers import AttentionMetadata
from jaxserve.models.registry import get_model_class
from jaxserve.models.weights import abstract_model, load_params
from tiny_models import ARCHITECTURES, hf_state_items, random_prompts, tiny_hf_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(arch):
    hf = tiny_hf_model(arch)
    cfg = ModelConfig.from_hf(hf.config)
    model = abstract_model(cfg, jnp.float32)
    load_params(model, hf_state_items(hf), jnp.float32)
    # Two uneven prompts in one ragged stream, both longer than the 8-token sliding window.
    prompts = random_prompts(0, [13, 21])
    page_size, P = 4, 8
    cache = init_kv_cache(2 * P, page_size, cfg.num_kv_heads, cfg.head_dim, jnp.float32,
                          num_layers=cfg.num_layers)
    ids = np.concatenate(prompts).astype(np.int32)
    pos = np.concatenate([np.arange(len(p)) for p in prompts]).astype(np.int32)
    md = AttentionMetadata(jnp.array([13, 21], jnp.int32), jnp.arange(2 * P, dtype=jnp.int32),
                           jnp.array([0, 13, 34], jnp.int32), jnp.array([0, 0, 2], jnp.int32))
    _, h = model(jnp.asarray(ids), jnp.asarray(pos), cache, md)
    logits = np.asarray(model.compute_logits(h))
    with torch.no_grad():
        want = np.concatenate([hf(torch.tensor([p])).logits[0].numpy() for p in prompts])
    np.testing.assert_allclose(logits, want, atol=2e-5, rtol=1e-4)


def test_config_normalisation():
    hf = tiny_hf_model("Gemma2ForCausalLM")
    cfg = ModelConfig.from_hf(hf.config)
    assert cfg.sliding_windows == (8, 0)
    assert cfg.attn_logit_softcap == 50.0 and cfg.final_logit_softcap == 30.0
    assert cfg.sm_scale == 16 ** -0.5 and cfg.hidden_act == "gelu_tanh"
    llama = ModelConfig.from_hf(tiny_hf_model("LlamaForCausalLM").config)
    assert llama.rope_scaling.rope_type == "llama3" and llama.rope_scaling.factor == 8.0
    assert ModelConfig.from_hf(tiny_hf_model("Qwen2ForCausalLM").config).attention_bias
    assert ModelConfig.from_hf(tiny_hf_model("Qwen3ForCausalLM").config).qk_norm


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        get_model_class("NopeForCausalLM")


def test_checkpoint_missing_tensor_is_an_error():
    hf = tiny_hf_model("LlamaForCausalLM")
    cfg = ModelConfig.from_hf(hf.config)
    items = [(k, v) for k, v in hf_state_items(hf) if "layers.1.mlp.up_proj" not in k]
    with pytest.raises(ValueError, match="up_proj"):
        load_params(abstract_model(cfg, jnp.float32), items, jnp.float32)
