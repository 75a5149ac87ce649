"""Attention inside the engine: the Pallas kernels (interpret mode on CPU) give transformers'
greedy tokens, quantised (int8, fp8) KV caches stay close to float32, and the engine picks the
attention backend and page size for the platform and cache dtype."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from jaxserve import SamplingParams
from jaxserve.engine.args import EngineArgs
from jaxserve.engine.model_runner import kv_bytes_per_page
from jaxserve.kernels_pallas import QuantizedKVCache
from tiny_models import hf_greedy, random_prompts


def _prompt_logprobs(llm, prompt):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    return np.array([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])


@pytest.mark.parametrize("backend,kv_dtype", [("tpu", "auto"), ("gpu", "auto"), ("tpu", "int8")])
def test_pallas_backends_in_the_engine_match_transformers(tiny_llm, backend, kv_dtype):
    """The tpu and gpu kernels inside the compiled step (interpret mode here), decode and
    prefill mixed in a batch; a quantised cache through the tpu kernel."""
    llm, hf = tiny_llm("Qwen3ForCausalLM", attention_backend=backend, kv_cache_dtype=kv_dtype,
                       block_size=16, enforce_eager=True)
    assert llm.engine.attention_backend == backend
    prompts = random_prompts(5, [3, 20, 9])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    want = [hf_greedy(hf, p, 5) for p in prompts]
    if kv_dtype == "auto":
        assert got == want
    else:  # int8 values: the first tokens agree
        assert [g[:2] for g in got] == [w[:2] for w in want]


@pytest.mark.parametrize("kv_dtype,tol", [("int8", 0.05), ("fp8", 0.3)])
def test_reduced_kv_cache_stays_close_to_float32(tiny_llm, kv_dtype, tol):
    exact, hf = tiny_llm("LlamaForCausalLM")
    reduced, _ = tiny_llm("LlamaForCausalLM", kv_cache_dtype=kv_dtype, enforce_eager=True)
    runner = reduced.engine.runner
    assert isinstance(runner.kv_cache, QuantizedKVCache)
    assert runner.kv_cache.data.dtype.itemsize == 1
    assert reduced.engine.attention_backend == "ref"  # the cpu kernel reads float caches
    prompt = random_prompts(7, [40])[0]
    # Teacher-forced logprobs over 40 positions read the cache at every context length.
    diff = np.abs(_prompt_logprobs(reduced, prompt) - _prompt_logprobs(exact, prompt)).max()
    assert 0 < diff < tol
    # The first greedy tokens agree with transformers.
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = reduced.generate({"prompt_token_ids": prompt[:12]}, params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == hf_greedy(hf, prompt[:12], 4)


def test_quantized_pages_take_less_memory():
    from jaxserve.config import ModelConfig

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=64,
                      intermediate_size=8, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)
    f32 = kv_bytes_per_page(cfg, 16, jnp.float32)
    i8 = kv_bytes_per_page(cfg, 16, jnp.int8)
    assert f32 == 2 * 16 * 2 * 2 * 64 * 4
    assert i8 == 2 * 16 * 2 * 2 * (64 + 4)  # values and one f32 scale per token and head


def test_kv_cache_dtype_and_backend_choices(monkeypatch):
    with pytest.raises(ValueError, match="--kv-cache-dtype 'int4'"):
        EngineArgs(kv_cache_dtype="int4")
    assert EngineArgs(kv_cache_dtype="fp8").resolve_kv_cache_dtype(jnp.float32) == \
        jnp.float8_e4m3fn
    args = EngineArgs(kv_cache_dtype="int8", attention_backend="cpu")
    with pytest.raises(ValueError, match="--attention-backend cpu does not read"):
        args.resolve_attention_backend(jnp.float32, jnp.int8)
    # On CPU: the cpu kernel for float32 (if it compiles), ref for quantised caches.
    assert EngineArgs().resolve_attention_backend(jnp.float32, jnp.int8) == "ref"
    assert EngineArgs().resolve_attention_backend(jnp.bfloat16) == "ref"
    # On an accelerator the platform's kernel, and the backend's page size.
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert EngineArgs().resolve_attention_backend(jnp.bfloat16) == "tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert EngineArgs().resolve_attention_backend(jnp.bfloat16) == "gpu"
    from jaxserve.kernels_pallas import default_page_size

    assert EngineArgs().cache_config("gpu").block_size == default_page_size("gpu")
    assert EngineArgs(block_size=32).cache_config("gpu").block_size == 32
