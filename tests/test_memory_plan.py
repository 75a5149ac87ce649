"""The per-device memory plan (engine/memory_plan.py): KV pages from what the utilization leaves
after weights, activations and sampler; device memory injected; sharded bytes per device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import TINY_ENGINE
from jaxserve import LLM
from jaxserve.engine import memory_plan
from jaxserve.engine.memory_plan import GiB, OutOfMemoryPlan, StepMemory, plan_memory

PLAN = dict(device="test", capacity=16 * GiB, utilization=0.9, page_size=32, pages_per_seq=128,
            max_num_seqs=256, max_model_len=4096, cpu=False)


def test_pages_are_what_the_utilization_leaves():
    step = StepMemory(activations=1 * GiB, sampler=GiB // 2)
    plan = plan_memory(weights=4 * GiB, step=step, kv_per_page=2 << 20, **PLAN)
    budget = int(16 * GiB * 0.9) - 4 * GiB - GiB - GiB // 2
    assert plan.num_pages == budget // (2 << 20)
    assert plan.total <= 16 * GiB * 0.9
    assert "weights" in plan.describe() and "activations" in plan.describe()


def test_temporaries_that_grow_with_the_cache_are_planned_per_page():
    step = StepMemory(activations=GiB, sampler=0, per_page=2 << 20)  # the cache is copied
    plan = plan_memory(weights=4 * GiB, step=step, kv_per_page=2 << 20, **PLAN)
    assert plan.num_pages == (int(16 * GiB * 0.9) - 5 * GiB) // (4 << 20)
    assert plan.total <= 16 * GiB * 0.9
    assert "cache copies" in plan.describe()


def test_weights_that_do_not_fit_say_what_would():
    with pytest.raises(OutOfMemoryPlan) as e:
        plan_memory(weights=15 * GiB, step=None, kv_per_page=2 << 20, **PLAN)
    msg = str(e.value)
    assert "the weights alone" in msg and "--tensor-parallel-size" in msg
    assert "--kv-cache-dtype" not in msg  # a smaller cache would not help


def test_a_context_that_does_not_fit_suggests_a_shorter_one():
    with pytest.raises(OutOfMemoryPlan) as e:  # 13 GiB of weights leave ~1.4 GiB: 700 pages
        plan_memory(weights=13 * GiB, step=None, kv_per_page=2 << 20,
                    **{**PLAN, "pages_per_seq": 1024, "max_model_len": 32768})
    msg = str(e.value)
    assert "--max-model-len 22" in msg and "--kv-cache-dtype int8" in msg


def test_explicit_sizes_win():
    plan = plan_memory(weights=GiB, step=None, kv_per_page=2 << 20, num_pages_override=300,
                       **PLAN)
    assert plan.num_pages == 300 and "override" in plan.sized_by
    plan = plan_memory(weights=GiB, step=None, kv_per_page=2 << 20,
                       kv_cache_memory_bytes=100 << 20, **PLAN)
    assert plan.num_pages == 50


def test_cpu_caps_the_cache():
    plan = plan_memory(weights=GiB, step=None, kv_per_page=1 << 20,
                       **{**PLAN, "capacity": 64 * GiB, "cpu": True, "max_num_seqs": 8})
    assert plan.num_pages == 8 * 128  # max_num_seqs full sequences, under 4 GiB
    plan = plan_memory(weights=GiB, step=None, kv_per_page=1 << 20,
                       **{**PLAN, "capacity": 64 * GiB, "cpu": True})
    assert plan.num_pages == 4096  # 4 GiB


def test_bytes_per_device_follows_shardings():
    devices = np.array(jax.devices()[:4])
    mesh = Mesh(devices, ("model",))
    split = jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P("model", None)))
    whole = jax.ShapeDtypeStruct((256,), jnp.float32, sharding=NamedSharding(mesh, P()))
    assert memory_plan.bytes_per_device([split, whole]) == 1024 * 256 * 2 // 4 + 256 * 4
    # arrays on two different device sets: the device holding most counts
    other = Mesh(np.array(jax.devices()[4:6]), ("model",))
    more = jax.ShapeDtypeStruct((65536,), jnp.float32, sharding=NamedSharding(other, P()))
    assert memory_plan.bytes_per_device([split, more]) == 65536 * 4


def test_the_engine_sizes_its_cache_from_the_plan(tiny_model_dir, monkeypatch):
    """Device memory injected: the KV cache gets what the plan leaves, and a device too small
    for one sequence is a start-up error that says what would fit."""
    folder, _ = tiny_model_dir("LlamaForCausalLM")
    engine = dict(model=folder, **{**TINY_ENGINE, "max_num_batched_tokens": 16})
    runner = LLM(**engine).engine.runner
    plan = runner.plan
    assert plan.step is not None and plan.step.activations > 0
    assert plan.weights == sum(x.nbytes for x in jax.tree.leaves(runner.state))
    # the smallest capacity that holds weights, step and one sequence at 90 %
    need = plan.weights + plan.step.activations + plan.step.sampler + \
        runner.pages_per_seq * (plan.kv_per_page + plan.step.per_page)
    monkeypatch.setattr(memory_plan, "device_capacity", lambda *_: int(need / 0.9) - 1)
    with pytest.raises(OutOfMemoryPlan, match="does not fit"):
        LLM(**engine)
    monkeypatch.setattr(memory_plan, "device_capacity", lambda *_: int(need / 0.9) + 64 * 1024)
    assert LLM(**engine).engine.runner.num_pages >= runner.pages_per_seq


def test_a_device_reporting_a_little_more_memory_keeps_the_compiled_pages(tiny_model_dir,
                                                                          monkeypatch, tmp_path):
    """The KV pages the stored executables were compiled for are kept when the plan allows a
    few more (a device reporting slightly different memory, or `jaxserve compile`'s table), so
    they load instead of every bucket compiling again."""
    folder, _ = tiny_model_dir("LlamaForCausalLM")
    engine = dict(model=folder, **{**TINY_ENGINE, "max_num_batched_tokens": 16},
                  compilation_cache_dir=str(tmp_path / "xla"))
    runner = LLM(**engine).engine.runner
    plan = runner.plan
    # the budget binds at about 150 pages (below the CPU cap of 8 full sequences, 192 pages)
    capacity = int((plan.weights + plan.step.activations + plan.step.sampler
                    + 150 * plan.kv_per_page) / 0.9)
    monkeypatch.setattr(memory_plan, "device_capacity", lambda *_: capacity)
    first = LLM(**engine).engine.runner
    assert 145 <= first.num_pages <= 150
    monkeypatch.setattr(memory_plan, "device_capacity", lambda *_: int(capacity * 1.01))
    again = LLM(**engine).engine.runner
    assert again.num_pages == first.num_pages
    assert again.num_loaded == len(again._forward_exe) + len(again._sample_exe)
