"""Tensor and expert parallelism on eight CPU devices (conftest sets
XLA_FLAGS=--xla_force_host_platform_device_count=8): greedy tokens identical to one device, and
weights and KV cache split as sharding/rules.py says."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.sharding.mesh import ParallelConfig, make_mesh
from jaxserve.sharding.placement import Placement
from jaxserve.sharding.rules import TPLayout, param_spec
from tiny_models import hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")

# Small enough to trace in a few seconds: buckets compile as steps need them.
ENGINE = dict(max_model_len=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, seed=0,
              enforce_eager=True)
# 8 query heads over 2 KV heads (tp 4 and 8 repeat KV heads); 130 tokens (tp 4 and 8 pad it).
DENSE = dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=130)
PROMPTS = random_prompts(11, [3, 17, 9, 30])
NEW_TOKENS = 10


def _greedy(llm):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def single_device(tiny_model_dir):
    """make(arch, **hf_overrides) -> (folder, hf model, greedy tokens on one device)."""
    made = {}

    def make(arch, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            folder, hf = tiny_model_dir(arch, **overrides)
            made[key] = (folder, hf, _greedy(LLM(model=folder, **ENGINE)))
        return made[key]

    return make


def _spec(array) -> P:
    return array.sharding.spec


def _state(llm) -> dict:
    return {".".join(map(str, k)): v.get_value() for k, v in
            nnx.to_flat_state(llm.engine.runner.state)}


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_greedy_equals_one_device(single_device, tp):
    folder, hf, want = single_device("LlamaForCausalLM", **DENSE)
    assert want[0] == hf_greedy(hf, PROMPTS[0], NEW_TOKENS)
    llm = LLM(model=folder, tensor_parallel_size=tp, **ENGINE)
    assert _greedy(llm) == want
    runner = llm.engine.runner
    assert dict(runner.mesh.shape) == {"data": 1, "pipe": 1, "model": tp}
    state = _state(llm)
    H = llm.engine.model_config.head_dim
    # Column-parallel q/k/v and gate/up, row-parallel o/down, vocabulary over the model axis.
    q = state["model.layers.0.self_attn.q_proj.kernel"]
    assert _spec(q) == P(None, "model")
    assert {s.data.shape for s in q.addressable_shards} == {(64, 8 * H // tp)}
    assert _spec(state["model.layers.1.mlp.down_proj.kernel"]) == P("model", None)
    assert _spec(state["model.layers.1.mlp.up_proj.kernel"]) == P(None, "model")
    assert _spec(state["model.layers.0.input_layernorm.weight"]) == P()
    embed = state["model.embed_tokens.weight"]
    assert _spec(embed) == P("model", None)
    assert embed.shape[0] == -(-130 // tp) * tp  # padded to a multiple of tp
    # KV heads: split when tp <= 2, each of the 2 repeated tp/2 times beyond.
    k = state["model.layers.0.self_attn.k_proj.kernel"]
    assert k.shape == (64, max(2, tp) * H)
    assert {s.data.shape for s in k.addressable_shards} == {(64, max(2, tp) * H // tp)}
    cache = runner.kv_cache
    assert _spec(cache) == P(None, None, None, "model")
    assert cache.shape[3] == 2 * max(2, tp)
    assert {s.data.shape[3] for s in cache.addressable_shards} == {2 * max(2, tp) // tp}


@pytest.mark.parametrize("arch,tp,ep", [("MixtralForCausalLM", 2, False),
                                        ("MixtralForCausalLM", 4, True),
                                        ("Qwen3MoeForCausalLM", 2, True)])
def test_moe_tensor_and_expert_parallel_greedy_equals_one_device(single_device, arch, tp, ep):
    folder, hf, want = single_device(arch)
    assert want[1] == hf_greedy(hf, PROMPTS[1], NEW_TOKENS)
    llm = LLM(model=folder, tensor_parallel_size=tp, enable_expert_parallel=ep, **ENGINE)
    assert _greedy(llm) == want
    state = _state(llm)
    moe_layer = 1  # the tiny Qwen3-MoE's layer 0 is dense
    gate_up = state[f"model.layers.{moe_layer}.mlp.experts.gate_proj.kernel"]
    down = state[f"model.layers.{moe_layer}.mlp.experts.down_proj.kernel"]
    E = gate_up.shape[0]
    if ep:  # whole experts per device
        assert _spec(gate_up) == _spec(down) == P("model", None, None)
        assert {s.data.shape[0] for s in down.addressable_shards} == {E // tp}
    else:  # every expert's hidden size split
        assert _spec(gate_up) == P(None, None, "model")
        assert _spec(down) == P(None, "model", None)
    assert _spec(state[f"model.layers.{moe_layer}.mlp.gate.kernel"]) == P()  # the router


def test_weights_load_slice_by_slice():
    """Each device reads only its slice of a checkpoint tensor (never the whole on one)."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=130, hidden_size=64,
                      intermediate_size=96, num_layers=1, num_heads=8, num_kv_heads=2,
                      head_dim=8)
    placement = Placement.create(cfg, ParallelConfig(model=4))
    seen = []

    class Recorder(np.ndarray):
        def __getitem__(self, index):
            seen.append(index)
            return np.asarray(self).__getitem__(index)

    value = np.arange(64 * 96, dtype=np.float32).reshape(64, 96).view(Recorder)
    array = placement.put(("model", "layers", 0, "mlp", "up_proj", "kernel"), value, np.float32)
    assert len(seen) == 4 and all(np.asarray(value)[i].shape == (64, 24) for i in seen)
    np.testing.assert_array_equal(np.asarray(array), np.asarray(value))


def test_kv_heads_repeat_in_query_head_order():
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=16,
                      intermediate_size=8, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=4)
    placement = Placement.create(cfg, ParallelConfig(model=8))
    assert placement.layout == TPLayout(kv_head_replicas=4)
    assert placement.model_config(cfg).num_kv_heads == 8
    k = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)  # [D, 2 heads x 4]
    out = placement.adapt(("model", "layers", 0, "self_attn", "k_proj", "kernel"), k, 4)
    # Query heads 0-3 read KV head 0, 4-7 head 1: shard i holds query head i and its KV head.
    assert [int(out[0, 4 * h]) for h in range(8)] == [0, 0, 0, 0, 4, 4, 4, 4]


def test_partition_rules_table():
    tp = ParallelConfig(model=2)
    ep = ParallelConfig(model=2, expert_parallel=True)
    assert param_spec("model.layers.0.self_attn.o_proj.kernel", tp) == P("model", None)
    assert param_spec("model.layers.0.self_attn.k_proj.bias", tp) == P("model")
    assert param_spec("model.layers.0.self_attn.q_norm.weight", tp) == P()
    assert param_spec("model.layers.0.mlp.experts.up_proj.kernel", tp) == P(None, None, "model")
    assert param_spec("model.layers.0.mlp.experts.up_proj.kernel", ep) == P("model", None, None)
    assert param_spec("lm_head.kernel", ParallelConfig()) == P()


def test_mesh_and_layout_errors_say_what_fits():
    with pytest.raises(ValueError, match=r"= 16 devices, but 8 device\(s\) here"):
        make_mesh(ParallelConfig(model=16))
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64,
                      intermediate_size=96, num_layers=1, num_heads=9, num_kv_heads=3,
                      head_dim=8)
    with pytest.raises(ValueError, match=r"9 query heads do not split over tensor parallel size "
                                         r"2; sizes that divide them: \[1, 3, 9\]"):
        TPLayout.plan(cfg, ParallelConfig(model=2))
    with pytest.raises(ValueError, match="pipeline parallel size 4 exceeds the model's 2 layers"):
        Placement.create(ModelConfig(architecture="LlamaForCausalLM", vocab_size=128,
                                     hidden_size=64, intermediate_size=96, num_layers=2,
                                     num_heads=8, num_kv_heads=2, head_dim=8),
                         ParallelConfig(pipe=4))


@pytest.mark.parametrize("pp,tp", [(2, 1), (2, 2)])
def test_pipeline_parallel_greedy_equals_one_device(single_device, pp, tp):
    folder, _, want = single_device("LlamaForCausalLM", **DENSE)
    llm = LLM(model=folder, pipeline_parallel_size=pp, tensor_parallel_size=tp, **ENGINE)
    assert _greedy(llm) == want
    runner = llm.engine.runner
    assert runner.pipeline is not None and len(runner.kv_cache) == pp
    state = _state(llm)
    stage_devices = [set(runner.placement.stage_mesh(s).devices.flat) for s in range(pp)]
    assert all(len(d) == tp for d in stage_devices) and not stage_devices[0] & stage_devices[1]
    # Each layer's weights and KV cache on its own stage; embedding first, head last.
    assert state["model.layers.0.mlp.up_proj.kernel"].sharding.device_set == stage_devices[0]
    assert state["model.layers.1.mlp.up_proj.kernel"].sharding.device_set == stage_devices[1]
    assert state["model.embed_tokens.weight"].sharding.device_set == stage_devices[0]
    assert state["lm_head.kernel"].sharding.device_set == stage_devices[1]
    assert [c.sharding.device_set for c in runner.kv_cache] == stage_devices
    assert [c.shape[0] for c in runner.kv_cache] == [1, 1]  # one layer per stage


def test_micro_batches_attend_like_the_whole_stream():
    """A step cut into micro-batches (sequences split across them) gives the same attention and
    cache as the whole stream at once."""
    from jaxserve.engine.pipeline import split_micro_batches
    from jaxserve.kernels_pallas import ragged_paged_attention
    from jaxserve.models.layers import AttentionMetadata
    from kernel_cases import make_case

    c = make_case(np.random.default_rng(3), [1, 1, 9, 5], [6, 12, 9, 14], pad_tokens=0,
                  num_slots=6)
    T = c.q.shape[0]  # 16 tokens: micro-batches of 8 cut the 9-token prefill
    q, k, v, cache, lens, pages, cu, dist = c.device_args()
    want, want_cache = ragged_paged_attention(q, k, v, cache, lens, pages, cu, dist, sm_scale=0.3)
    md = AttentionMetadata(c.lens, c.pages.reshape(-1), c.cu, c.dist)
    mbs = split_micro_batches(np.arange(T), np.zeros(T, np.int32), md, 2)
    outs = []
    for mb in mbs:
        a, b = mb.token_ids[0], mb.token_ids[-1] + 1
        md = [jax.numpy.asarray(x) for x in mb.md]
        out, cache = ragged_paged_attention(q[a:b], k[a:b], v[a:b], cache, *md, sm_scale=0.3)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs), np.asarray(want), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(want_cache))
