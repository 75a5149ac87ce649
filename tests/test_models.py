"""Model parity: our Flax models give `transformers`' logits on tiny random configs."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.models.registry import get_model_class
from jaxserve.models.weights import abstract_model, load_params
from tiny_models import (ARCHITECTURES, hf_logits, hf_state_items, jax_logits, random_prompts,
                         tiny_hf_model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(arch):
    hf = tiny_hf_model(arch)
    cfg = ModelConfig.from_hf(hf.config)
    model = abstract_model(cfg, jnp.float32)
    load_params(model, hf_state_items(hf), jnp.float32)
    # Two uneven prompts in one ragged stream, both longer than the 8-token sliding window.
    prompts = random_prompts(0, [13, 21])
    np.testing.assert_allclose(jax_logits(model, prompts), hf_logits(hf, prompts), atol=2e-5,
                               rtol=1e-4)


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
