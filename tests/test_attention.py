"""Every attention backend against a dense numpy oracle, with NaN in unused pages, and the cache
checked page by page after the write (harness: tests/kernel_cases.py).

The Pallas backends run in interpret mode on CPU; their own files test the wider coverage
(head dims, page sizes, quantised caches) that is too slow to cross with every case here.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from jaxserve.kernels_pallas import (QuantizedKVCache, default_backend, init_kv_cache,
                                     ragged_paged_attention, runs_interpreted, target_platform)
from kernel_cases import CASES, check_cache, check_output, make_case, run


def _cpu_param():
    from jaxserve.kernels_pallas import cpu

    return pytest.param("cpu", marks=pytest.mark.skipif(
        not cpu.available(), reason="no C++ compiler for the cpu kernel"))


NATIVE = ["ref", _cpu_param()]  # backends that run for real on CPU


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("window,soft_cap", [(None, None), (5, None), (None, 20.0)])
def test_backend_matches_oracle(backend, name, window, soft_cap):
    q_lens, kv_lens = CASES[name]
    c = make_case(np.random.default_rng(0), q_lens, kv_lens, num_slots=len(q_lens) + 1)
    out, cache = run(c, backend, window=window, soft_cap=soft_cap)
    check_output(c, out, window=window, soft_cap=soft_cap)
    check_cache(c, cache)


@pytest.mark.parametrize("backend", NATIVE)
def test_stacked_cache_writes_only_its_layer(backend):
    c = make_case(np.random.default_rng(1), [2, 1, 5], [6, 9, 12], num_layers=3, layer=1)
    out, cache = run(c, backend)
    check_output(c, out)
    check_cache(c, cache)


@pytest.mark.parametrize("backend", NATIVE)
def test_bfloat16_cache(backend):
    c = make_case(np.random.default_rng(2), [1, 1, 9, 4], [9, 30, 9, 20], num_slots=5,
                  cache_dtype="bfloat16")
    out, cache = run(c, backend)
    check_output(c, out)
    check_cache(c, cache)


@pytest.mark.parametrize("cache_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("name", ["decode_only", "mixed"])
def test_quantized_cache_ref(cache_dtype, name):
    q_lens, kv_lens = CASES[name]
    c = make_case(np.random.default_rng(3), q_lens, kv_lens, num_slots=len(q_lens) + 1,
                  cache_dtype=cache_dtype, num_layers=2, layer=1)
    out, cache = run(c, "ref")
    check_output(c, out)
    check_cache(c, cache)


@pytest.mark.parametrize("cache_dtype,tol", [("int8", 0.05), ("float8_e4m3fn", 0.15)])
def test_quantized_cache_close_to_float(cache_dtype, tol):
    """The quantisation error itself stays small (the oracle above reads the stored values)."""
    q_lens, kv_lens = CASES["mixed"]
    rng = np.random.default_rng(4)
    exact = make_case(rng, q_lens, kv_lens)
    quant = make_case(np.random.default_rng(4), q_lens, kv_lens, cache_dtype=cache_dtype)
    out_exact, _ = run(exact, "ref")
    out_quant, _ = run(quant, "ref")
    T = exact.num_tokens
    err = np.abs(out_quant[:T] - out_exact[:T]).max()
    assert 0 < err < tol


def test_cpu_kernel_refuses_quantized_cache():
    from jaxserve.kernels_pallas import cpu

    if not cpu.available():
        pytest.skip("no C++ compiler for the cpu kernel")
    c = make_case(np.random.default_rng(5), [1], [3], cache_dtype="int8")
    with pytest.raises(ValueError, match="cpu kernel"):
        ragged_paged_attention(*c.device_args(), sm_scale=0.25, backend="cpu")


def test_init_kv_cache_shapes():
    cache = init_kv_cache(10, 16, 2, 64, jnp.float32, num_layers=3)
    assert cache.shape == (3, 10, 16, 4, 64)
    q = init_kv_cache(10, 16, 2, 64, jnp.int8, num_layers=3)
    assert isinstance(q, QuantizedKVCache)
    assert q.data.shape == (3, 10, 16, 4, 64) and q.data.dtype == jnp.int8
    assert q.scale.shape == (3, 10, 16, 4) and q.scale.dtype == jnp.float32


def test_unknown_backend_and_interpret_misuse():
    c = make_case(np.random.default_rng(6), [1], [3])
    with pytest.raises(ValueError, match="not available"):
        ragged_paged_attention(*c.device_args(), sm_scale=0.25, backend="cuda")
    with pytest.raises(ValueError, match="interpret"):
        ragged_paged_attention(*c.device_args(), sm_scale=0.25, backend="ref", interpret=True)


@pytest.mark.parametrize("platform,backend", [("tpu", "tpu"), ("gpu", "gpu"), ("cuda", "gpu"),
                                              ("cpu", "cpu")])
def test_default_backend_by_platform(platform, backend):
    assert default_backend(platform) == backend


def test_interpret_mode_follows_the_platform_compiled_for():
    """A Pallas backend is interpreted only off its own platform, and the platform is the one
    being compiled for: an explicit one, else the mesh traced under, else the default backend
    (CPU here). A deviceless TPU compile on this host traces under a TPU mesh."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh

    assert target_platform() == "cpu"
    assert runs_interpreted("tpu") and runs_interpreted("gpu")
    assert not runs_interpreted("ref") and not runs_interpreted("cpu")
    assert not runs_interpreted("tpu", "tpu") and runs_interpreted("tpu", "cuda")
    assert not runs_interpreted("gpu", "cuda") and not runs_interpreted("gpu", "gpu")
    tpu_mesh = AbstractMesh((1,), ("model",),
                            abstract_device=AbstractDevice("TPU v6 lite", 1, "tpu"))
    with jax.sharding.use_abstract_mesh(tpu_mesh):
        assert target_platform() == "tpu"
        assert not runs_interpreted("tpu") and runs_interpreted("gpu")
        assert runs_interpreted("tpu", "cpu")  # an explicit platform wins
    cpu_mesh = jax.sharding.Mesh(jax.devices()[:1], ("model",))
    with jax.set_mesh(cpu_mesh):
        assert target_platform() == "cpu" and runs_interpreted("tpu")
