"""Sparse mixture of experts (Mixtral, Qwen3-MoE) against `transformers` on tiny random configs:
the router, the MoE block, whole-model logits, greedy tokens through the engine, Qwen3's
`norm_topk_prob`, and experts loaded from one tensor per expert (Hub checkpoints) as well as from
`transformers`' fused state dict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import jax.numpy as jnp
from flax import nnx

from jaxserve import SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.models.loader import load_model
from jaxserve.models.moe import route
from jaxserve.models.source import resolve_model
from jaxserve.models.weights import abstract_model, dummy_params, load_params
from tiny_models import (MOE_ARCHITECTURES, hf_greedy, hf_logits, hf_state_items, jax_logits,
                         random_prompts, tiny_hf_config, tiny_hf_model)

# Mixtral always renormalises the top k weights; Qwen3-MoE only under `norm_topk_prob`.
CASES = [("MixtralForCausalLM", {}), ("Qwen3MoeForCausalLM", {"norm_topk_prob": True}),
         ("Qwen3MoeForCausalLM", {"norm_topk_prob": False})]
CASE_IDS = ["mixtral", "qwen3_moe-norm", "qwen3_moe-no-norm"]
SPARSE_LAYER = 1  # a MoE layer in both tiny models (Qwen3-MoE's layer 0 is dense)


def _ours(hf) -> nnx.Module:
    cfg = ModelConfig.from_hf(hf.config)
    model = abstract_model(cfg, jnp.float32)
    load_params(model, hf_state_items(hf), jnp.float32)
    return model


@pytest.mark.parametrize("arch,overrides", CASES, ids=CASE_IDS)
def test_route_matches_transformers_router(arch, overrides):
    hf = tiny_hf_model(arch, **overrides)
    cfg = ModelConfig.from_hf(hf.config)
    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, want_weights, want_experts = hf.model.layers[SPARSE_LAYER].mlp.gate(x)
    got = route(jnp.asarray(logits.numpy()), cfg.num_experts_per_tok, cfg.norm_topk_prob)
    np.testing.assert_array_equal(np.asarray(got.experts), want_experts.numpy())
    np.testing.assert_allclose(np.asarray(got.weights), want_weights.numpy(), rtol=1e-6,
                               atol=1e-7)
    sums = np.asarray(got.weights).sum(-1)
    assert np.allclose(sums, 1.0) == cfg.norm_topk_prob


@pytest.mark.parametrize("arch,overrides", CASES, ids=CASE_IDS)
def test_moe_block_matches_transformers(arch, overrides):
    hf = tiny_hf_model(arch, **overrides)
    block = _ours(hf).model.layers[SPARSE_LAYER].mlp
    hf_block = hf.model.layers[SPARSE_LAYER].mlp
    for T in (3, 40):  # 3 tokens x 2 choices leave some of the 8 experts without rows
        x = torch.randn(1, T, hf.config.hidden_size, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            want = hf_block(x)[0].numpy()
            chosen = hf_block.gate(x[0])[2]
        assert (len(set(chosen.flatten().tolist())) < 8) == (T == 3)
        got = np.asarray(block(jnp.asarray(x[0].numpy())))
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,overrides", CASES, ids=CASE_IDS)
def test_logits_match_transformers(arch, overrides):
    hf = tiny_hf_model(arch, **overrides)
    # Two uneven prompts in one ragged stream, both longer than Mixtral's 8-token sliding window.
    prompts = random_prompts(0, [13, 21])
    np.testing.assert_allclose(jax_logits(_ours(hf), prompts), hf_logits(hf, prompts),
                               atol=2e-5, rtol=1e-4)


def test_norm_topk_prob_changes_the_logits():
    """Parity holds only when the model honours the flag: renormalising weights that HF leaves as
    they are moves the logits far beyond the parity tolerance."""
    hf = tiny_hf_model("Qwen3MoeForCausalLM", norm_topk_prob=False)
    prompts = random_prompts(0, [13, 21])
    want = hf_logits(hf, prompts)
    model = _ours(hf)
    assert not model.config.norm_topk_prob
    np.testing.assert_allclose(jax_logits(model, prompts), want, atol=2e-5, rtol=1e-4)
    renormalised = abstract_model(model.config.replace(norm_topk_prob=True), jnp.float32)
    load_params(renormalised, hf_state_items(hf), jnp.float32)
    assert np.abs(jax_logits(renormalised, prompts) - want).max() > 1e-2


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_greedy_matches_transformers(tiny_llm, arch):
    """Through the engine, from a folder `save_pretrained` wrote (one tensor per expert). Buckets
    compile on first use (`enforce_eager`): only the two shapes these prompts need, to keep the
    file fast; compiling every bucket at start-up is test_engine_parity's concern."""
    llm, hf = tiny_llm(arch, enforce_eager=True)
    prompts = random_prompts(1, [3, 11, 20, 7])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 12) for p in prompts]


# How Hub checkpoints name one expert's tensors: (MoE module, (gate, up, down)).
HUB_NAMES = {"MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2")),
             "Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def _hub_tensors(arch: str, state: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`transformers`' fused expert tensors split into the per-expert names of Hub checkpoints."""
    module, (gate, up, down) = HUB_NAMES[arch]
    out = {}
    for name, array in state:
        layer, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":  # f[E, 2F, D]: gate rows, then up rows
            for e, (g, u) in enumerate(zip(*np.split(array, 2, axis=1))):
                out[f"{layer}.{module}.experts.{e}.{gate}.weight"] = g
                out[f"{layer}.{module}.experts.{e}.{up}.weight"] = u
        elif rest == "experts.down_proj":  # f[E, D, F]
            for e, d in enumerate(array):
                out[f"{layer}.{module}.experts.{e}.{down}.weight"] = d
        elif rest == "gate.weight":
            out[f"{layer}.{module}.gate.weight"] = array
        else:
            out[name] = array
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_loads_per_expert_checkpoint(tmp_path, arch):
    hf = tiny_hf_model(arch)
    tensors = _hub_tensors(arch, hf_state_items(hf))
    assert f"model.layers.1.{HUB_NAMES[arch][0]}.experts.7.{HUB_NAMES[arch][1][2]}.weight" \
        in tensors and not any("gate_up_proj" in k for k in tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    cfg = ModelConfig.from_hf(hf.config)
    loaded = load_model(resolve_model(str(tmp_path)), cfg, jnp.float32)
    fused = _ours(hf)
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    for path, want in nnx.to_flat_state(nnx.state(fused, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(want[...]),
                                      err_msg=str(path))


def test_missing_expert_is_an_error():
    hf = tiny_hf_model("MixtralForCausalLM")
    tensors = _hub_tensors("MixtralForCausalLM", hf_state_items(hf))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    model = abstract_model(ModelConfig.from_hf(hf.config), jnp.float32)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.up_proj\.kernel \(experts \[5\]"):
        load_params(model, tensors.items(), jnp.float32)


def test_config_normalisation():
    mixtral = ModelConfig.from_hf(tiny_hf_config("MixtralForCausalLM", norm_topk_prob=False))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok) == (8, 2)
    assert mixtral.moe_intermediate_size == mixtral.intermediate_size == 96
    assert mixtral.norm_topk_prob  # Mixtral has no such flag: it always renormalises
    assert mixtral.moe_layers == (True, True) and mixtral.sliding_windows == (8, 8)
    qwen = ModelConfig.from_hf(tiny_hf_config("Qwen3MoeForCausalLM", num_hidden_layers=6,
                                              decoder_sparse_step=2, mlp_only_layers=[3]))
    assert qwen.moe_layers == (False, True, False, False, False, True)
    assert qwen.qk_norm and qwen.moe_intermediate_size == 32 and qwen.norm_topk_prob
    assert qwen.sliding_windows == (0,) * 6
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        qwen.replace(num_experts_per_tok=9)


def test_dummy_params_fill_experts_and_router():
    """`--load-format dummy` covers the stacked experts; their paths are what sharding rules
    match (E first)."""
    cfg = ModelConfig.from_hf(tiny_hf_config("Qwen3MoeForCausalLM"))
    model = abstract_model(cfg, jnp.float32)
    dummy_params(model)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    moe = {p[3:]: v.shape for p, v in flat.items() if p[:3] == ("model", "layers", 1)
           and p[3] == "mlp"}
    assert moe == {("mlp", "gate", "kernel"): (64, 8),
                   ("mlp", "experts", "gate_proj", "kernel"): (8, 64, 32),
                   ("mlp", "experts", "up_proj", "kernel"): (8, 64, 32),
                   ("mlp", "experts", "down_proj", "kernel"): (8, 32, 64)}
    assert ("model", "layers", 0, "mlp", "gate_proj", "kernel") in flat  # the dense layer
    for path, var in flat.items():
        value = np.asarray(var[...])
        assert np.isfinite(value).all() and value.std() > 0 or "norm" in str(path), path
    logits = jax_logits(model, random_prompts(0, [5, 9]))
    assert np.isfinite(logits).all() and logits.std() > 0
