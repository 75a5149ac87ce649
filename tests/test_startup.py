"""Start-up: executables come back from the executable cache (same tokens, no tracing), a torn
entry is compiled again, and the CPU KV cache starts as zeros without writing them."""

from __future__ import annotations

import glob
import logging
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_ENGINE
from jaxserve import LLM, SamplingParams
from jaxserve.kernels_pallas import init_kv_cache

PROMPTS = [[1, 5, 9, 13, 21], [2, 7, 7, 30]]


def _generate(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture
def engine_args(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir("LlamaForCausalLM")
    return dict(model=folder, **{**TINY_ENGINE, "max_num_batched_tokens": 16},
                compilation_cache_dir=str(tmp_path / "xla"))


def test_second_start_loads_every_executable(engine_args, tmp_path):
    first = LLM(**engine_args)
    runner = first.engine.runner
    assert runner.num_loaded == 0
    expected = _generate(first)
    files = glob.glob(str(tmp_path / "xla" / "executables" / "*" / "*.pkl"))
    assert len(files) == len(runner._forward_exe) + len(runner._sample_exe)

    second = LLM(**engine_args)
    assert second.engine.runner.num_loaded == len(files)
    assert second.engine.runner.executable_cache.key == runner.executable_cache.key
    assert _generate(second) == expected
    # nothing was traced for a bucket: every step ran a loaded executable
    assert second.engine.runner._jit_forward._cache_size() == 0


def test_executables_are_keyed_by_their_own_shapes(engine_args):
    """--max-num-seqs changes the rows of the larger buckets only: the others still load (the
    KV cache keeps its size here; on CPU its default size follows --max-num-seqs)."""
    engine_args = {**engine_args, "num_gpu_blocks_override": 192}
    first = LLM(**engine_args)
    expected = _generate(first)
    llm = LLM(**{**engine_args, "max_num_seqs": 4})
    runner = llm.engine.runner
    assert runner.executable_cache.key == first.engine.runner.executable_cache.key
    # forward-1/2/4 and sample-1/2/4 have the shapes they had; forward-8/16 do not
    assert runner.num_loaded == 6
    assert _generate(llm) == expected


def test_executables_built_by_other_versions_are_compiled_again(engine_args, monkeypatch,
                                                                 caplog):
    from jaxserve.engine import executable_cache

    expected = _generate(LLM(**engine_args))
    real = executable_cache.versions()
    monkeypatch.setattr(executable_cache, "versions", lambda: {**real, "jax": "0.0.1"})
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine.executable_cache"):
        llm = LLM(**engine_args)
    assert "it was built by" in caplog.text and "0.0.1" in caplog.text
    assert llm.engine.runner.num_loaded == 0
    assert _generate(llm) == expected
    # stored again by this version: the next start (same version) loads them all
    again = LLM(**engine_args)
    assert again.engine.runner.num_loaded == len(again.engine.runner._forward_exe) + len(
        again.engine.runner._sample_exe)


def test_a_torn_entry_is_compiled_again(engine_args, tmp_path, caplog):
    expected = _generate(LLM(**engine_args))
    victim = sorted(glob.glob(str(tmp_path / "xla" / "executables" / "*" / "forward-*.pkl")))[0]
    with open(victim, "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine.executable_cache"):
        llm = LLM(**engine_args)
    assert "ignoring cached executable" in caplog.text
    runner = llm.engine.runner
    assert runner.num_loaded == len(runner._forward_exe) + len(runner._sample_exe) - 1
    assert _generate(llm) == expected
    assert os.path.getsize(victim) > 100  # stored again


def test_the_cache_can_be_turned_off(engine_args, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_EXECUTABLE_CACHE", "0")
    llm = LLM(**engine_args)
    assert llm.engine.runner.executable_cache is None
    assert not glob.glob(str(tmp_path / "xla" / "executables" / "*" / "*.pkl"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_kv_cache_is_zero_and_updates_in_place(dtype):
    import jax

    cache = init_kv_cache(64, 4, 2, 8, dtype, num_layers=3)
    assert cache.shape == (3, 64, 4, 4, 8) and cache.dtype == dtype
    assert not np.asarray(cache, np.float32).any()
    step = jax.jit(lambda c: c.at[1, 5].set(1.0), donate_argnums=0)
    out = step(cache)
    host = np.asarray(out, np.float32)
    assert host[1, 5].all() and host.sum() == 4 * 4 * 8


def test_executables_jax_already_cached_are_stored_whole(engine_args, monkeypatch):
    """JAX's persistent cache holds the step (an earlier start without our cache): what we store
    must still run after loading (XLA:CPU re-serialises a JAX-cache hit without its kernels)."""
    monkeypatch.setenv("JAXSERVE_EXECUTABLE_CACHE", "0")
    expected = _generate(LLM(**engine_args))
    monkeypatch.delenv("JAXSERVE_EXECUTABLE_CACHE")
    assert _generate(LLM(**engine_args)) == expected  # compiled, stored
    llm = LLM(**engine_args)
    assert llm.engine.runner.num_loaded > 0
    assert _generate(llm) == expected
    # and the sampler's other paths (sampling, logprobs) run from the loaded executables too
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=4, logprobs=2)
    assert llm.generate(PROMPTS, params, use_tqdm=False)[0].outputs[0].logprobs


def test_old_key_folders_are_pruned_least_recently_used_first(tmp_path):
    from jaxserve.engine.executable_cache import ExecutableCache

    root = tmp_path / "executables"
    for i, age in enumerate([50, 40, 30, 20, 10]):  # seconds ago
        folder = root / f"old{i}"
        folder.mkdir(parents=True)
        os.utime(folder, (time.time() - age, time.time() - age))
    cache = ExecutableCache(str(root), {"model": "m"})
    os.makedirs(cache.folder)
    cache.prune(keep=3)
    assert sorted(p.name for p in root.iterdir()) == sorted([cache.key, "old3", "old4"])
