"""Data parallelism on eight CPU devices (conftest sets
XLA_FLAGS=--xla_force_host_platform_device_count=8): replicas with their own weights, KV cache
and scheduler on their own devices; greedy tokens identical to one device; requests placed on the
least loaded replica and kept there."""

from __future__ import annotations

import jax
import pytest

from jaxserve import LLM, SamplingParams
from tiny_models import random_prompts

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")

# Small enough to trace in a few seconds: buckets compile as steps need them.
ENGINE = dict(max_model_len=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, seed=0,
              enforce_eager=True, compile_sizes=(16,))
# 8 query heads over 2 KV heads, so that tp=2 splits them.
DENSE = dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=130)
PROMPTS = random_prompts(5, [3, 17, 9, 30, 5, 12, 21, 8, 14, 6])
NEW_TOKENS = 8


def _greedy(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _assert_all_pages_free(engine) -> None:
    for r in engine.replicas:
        assert r.block_manager.num_free_pages == r.runner.num_pages, f"replica {r.index}"
        assert r.scheduler.num_running == r.scheduler.num_waiting == 0
    assert engine.kv_cache_usage == 0.0


def _assert_on_own_devices(engine, tp: int) -> None:
    """Replica i's parameters and KV cache live on devices [i*tp, (i+1)*tp) and no others."""
    for r in engine.replicas:
        devices = set(jax.devices()[r.index * tp:(r.index + 1) * tp])
        assert dict(r.runner.mesh.shape) == {"data": 1, "pipe": 1, "model": tp}
        assert set(r.runner.mesh.devices.flat) == devices
        arrays = jax.tree.leaves(r.runner.state) + jax.tree.leaves(r.runner.kv_cache)
        assert arrays
        for a in arrays:
            assert a.sharding.device_set == devices, (r.index, a.shape, a.sharding)


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("LlamaForCausalLM", **DENSE)[0]


@pytest.fixture(scope="module")
def want(folder):
    """Greedy tokens on one device."""
    return _greedy(LLM(model=folder, **ENGINE))


@pytest.fixture(scope="module")
def dp2(folder):
    return LLM(model=folder, data_parallel_size=2, **ENGINE)


def test_data_parallel_greedy_equals_one_device(dp2, want):
    engine = dp2.engine
    assert len(engine.replicas) == 2
    assert engine.runner is engine.replicas[0].runner
    assert _greedy(dp2) == want
    for r in engine.replicas:  # both replicas got requests and ran steps
        assert r.runner.num_steps > 0, f"replica {r.index} never stepped"
        assert r.block_manager.prefix_cache_queries > 0, f"replica {r.index} got no request"
    _assert_on_own_devices(engine, tp=1)
    _assert_all_pages_free(engine)


def test_tensor_times_data_parallel_greedy_equals_one_device(folder, want):
    llm = LLM(model=folder, data_parallel_size=2, tensor_parallel_size=2, **ENGINE)
    assert _greedy(llm) == want
    engine = llm.engine
    assert all(r.runner.num_steps > 0 for r in engine.replicas)
    _assert_on_own_devices(engine, tp=2)
    q = next(a for a in jax.tree.leaves(engine.replicas[1].runner.state)
             if a.sharding.spec == jax.sharding.PartitionSpec(None, "model"))
    assert len({s.device for s in q.addressable_shards}) == 2  # still split over tp=2
    _assert_all_pages_free(engine)


def test_second_start_loads_each_replicas_executables(folder, want, tmp_path):
    """Compiled steps are bound to their devices: each replica stores its own, and a second
    start loads them onto the right devices (no tracing)."""
    # One token bucket (16) and one sampler bucket (8): two executables per replica.
    args = dict(model=folder, data_parallel_size=2,
                **{**ENGINE, "enforce_eager": False, "max_num_batched_tokens": 16},
                compilation_cache_dir=str(tmp_path / "xla"))
    first = LLM(**args)
    assert _greedy(first) == want
    second = LLM(**args)
    runners = [r.runner for r in second.engine.replicas]
    assert len({r.executable_cache.key for r in runners}) == 2
    for r in runners:
        assert r.num_loaded == len(r._forward_exe) + len(r._sample_exe) == 2
    assert _greedy(second) == want
    assert all(r.num_steps > 0 and r._jit_forward._cache_size() == 0 for r in runners)


def test_requests_balance_and_abort_frees_pages_on_its_replica(dp2):
    engine = dp2.engine
    r0, r1 = engine.replicas
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:6]):
        engine.add_request(f"bal-{i}", prompt, params)
    assert (r0.scheduler.num_waiting, r1.scheduler.num_waiting) == (3, 3)
    assert engine.num_waiting == 6
    # Alternating: 0, 2, 4 on replica 0; 1, 3, 5 on replica 1.
    assert engine._replica_of["bal-1"] is r1 and engine._replica_of["bal-2"] is r0
    engine.step()  # every prompt fits one step: all 6 hold pages now
    assert (r0.scheduler.num_running, r1.scheduler.num_running) == (3, 3)
    victim = next(s for s in r1.scheduler.running if s.request_id == "bal-1")
    held = len(victim.block_table)
    assert held > 0
    free0, free1 = r0.block_manager.num_free_pages, r1.block_manager.num_free_pages
    engine.abort_request("bal-1")
    assert victim.is_finished
    assert r1.block_manager.num_free_pages == free1 + held
    assert r0.block_manager.num_free_pages == free0
    assert r1.scheduler.num_running == 2 and "bal-1" not in engine._replica_of
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {f"bal-{i}" for i in (0, 2, 3, 4, 5)}
    assert not engine._replica_of
    _assert_all_pages_free(engine)


def test_n_sequences_stay_on_one_replica(dp2):
    engine = dp2.engine
    r0, r1 = engine.replicas
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("busy", PROMPTS[3], greedy)  # replica 0: now the busier one
    engine.add_request("pair", PROMPTS[1], SamplingParams(n=2, temperature=1.0, max_tokens=6,
                                                          ignore_eos=True, seed=7))
    assert engine._replica_of["busy"] is r0 and engine._replica_of["pair"] is r1
    assert [s.request_id for s in r1.scheduler.waiting] == ["pair", "pair"]
    assert [s.request_id for s in r0.scheduler.waiting] == ["busy"]
    # Fewest sequences wins: replica 1 holds 2 now, so the next request goes to replica 0.
    engine.add_request("third", PROMPTS[2], greedy)
    assert engine._replica_of["third"] is r0
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    assert sorted(outputs) == ["busy", "pair", "third"]
    assert [len(c.token_ids) for c in outputs["pair"].outputs] == [6, 6]
    _assert_all_pages_free(engine)
