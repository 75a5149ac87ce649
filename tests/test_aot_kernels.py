"""The attention kernels compile for the chips they claim, deviceless (`pytest -m aot`).

Each test compiles a set of `kernels_pallas.aot` cases for one target with the real compiler
(Mosaic through libtpu for TPU v5e, v6e and v5p; XLA GPU with Triton and ptxas for an H100),
several cases per child process (`aot_runner`), and fails listing every case that failed or
aborted the compiler. Together they cover every value of every dimension (cache dtype, head
dim, GQA ratio, KV heads per shard, tensor parallelism, window, soft cap, batch kind, page size,
stacked cache) on each TPU generation, and every pair of values on v6e and the H100.
The shapes are tiny: this checks that the kernels build, not their speed.

Without libtpu or the CUDA plugin the tests skip and say what to install; with `CI` set they fail
instead, since CI installs both. `scripts/aot_sweep.py` is the full sweep.
"""

from __future__ import annotations

import os

import pytest

from jaxserve.engine.targets import get_target, plugin_versions
from jaxserve.kernels_pallas import aot, aot_runner

pytestmark = pytest.mark.aot

_QUANTIZED = ("int8", "float8_e4m3fn", "float8_e5m2")
# Every value of every dimension on each TPU generation; every pair of values on v6e (whose
# Mosaic is the strictest about packed layouts) and on the H100.
TARGET_CASES = {
    "v6e-1": lambda: aot.covering_cases("v6e-1") + smollm_shaped("v6e-1"),
    # v5e has no float8 hardware: each 8-bit format at each head dim.
    "v5e-1": lambda: aot.each_value_cases("v5e-1") + smollm_shaped("v5e-1") + [
        aot.KernelCase("v5e-1", cache_dtype=d, head_dim=h, group=4, kv_heads=1, window=16)
        for d in _QUANTIZED for h in (64, 256)],
    "v5p-8": lambda: aot.each_value_cases("v5p-8"),
    "v6e-4": lambda: aot.tp_cases("v6e-4", 4)[:3],  # one KV head per shard, 4 shards
    "v5e-4": lambda: aot.tp_cases("v5e-4", 4)[3:],
    # + the shape that once ran out of shared memory (float32, head_dim 256, 32 rows, 64 slots).
    "h100": lambda: aot.covering_cases("h100") + [aot.KernelCase(
        "h100", "float32", head_dim=256, group=8, kv_heads=4, page_size=64, window=16)],
    "h100x2": lambda: aot.tp_cases("h100x2", 2)[1:3],
}


def smollm_shaped(target: str) -> list[aot.KernelCase]:
    """The default model's attention (3 KV heads of 64, 9 query heads), in bfloat16 and with an
    int8 cache under float32 activations."""
    return [aot.KernelCase(target, cache_dtype=d, head_dim=64, group=3, kv_heads=3, stacked=True,
                           input_dtype=q, page_size=16) for d, q in (("bfloat16", None),
                                                                     ("int8", "float32"))]


def require_plugin(target: str) -> None:
    """Skip (fail under CI) when the target's compiler plugin is not installed."""
    versions = plugin_versions()
    if get_target(target).platform == "tpu":
        missing = [] if versions["libtpu"] else ["libtpu (pip install 'jax[tpu]==<jax version>')"]
    else:
        missing = [] if versions["jax-cuda12-plugin"] or versions["jax-cuda13-plugin"] else [
            "the CUDA plugin (pip install 'jax-cuda12-plugin==<jax version>')"]
        if not versions["nvidia-cuda-nvcc-cu12"]:
            missing.append("ptxas (pip install nvidia-cuda-nvcc-cu12)")
    if missing:
        why = f"compiling for {target} needs {' and '.join(missing)}: the project's aot extra"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the aot group must run: {why}")
        pytest.skip(why)


def check(results: list[aot_runner.Result]) -> None:
    bad = [r for r in results if r.status != "ok"]
    assert not bad, (f"{len(bad)} of {len(results)} cases did not compile:\n"
                     + aot_runner.summary(bad))


@pytest.mark.parametrize("target", list(TARGET_CASES))
def test_kernel_compiles(target):
    require_plugin(target)
    cases = TARGET_CASES[target]()
    assert cases and all(c.target == target for c in cases)
    check(aot_runner.run_cases(cases))


def test_cases_cover_every_value():
    """Every value of every dimension is compiled on each TPU generation and the H100, and every
    pair of values on v6e and the H100."""
    for target in ("v6e-1", "v5e-1", "v5p-8", "h100"):
        cases = TARGET_CASES[target]()
        for name, values in aot.dimensions(aot.platform_of(target)).items():
            seen = {getattr(c, name) for c in cases}
            assert seen >= set(values), (target, name, set(values) - seen)
    for target in ("v6e-1", "h100"):
        cases = TARGET_CASES[target]()
        dims = aot.dimensions(aot.platform_of(target))
        pairs = {((a, getattr(c, a)), (b, getattr(c, b))) for c in cases
                 for a in dims for b in dims if a < b}
        want = {((a, x), (b, y)) for a in dims for b in dims if a < b
                for x in dims[a] for y in dims[b]}
        assert pairs >= want, (target, sorted(want - pairs, key=str)[:5])
    tp = [c for cases in TARGET_CASES.values() for c in cases() if c.tp > 1]
    assert {c.cache_dtype for c in tp} == set(aot.CACHE_DTYPES)
    assert all(c.kv_heads == 1 for c in tp)


def test_runner_resumes_after_an_abort(monkeypatch):
    """A child that dies mid-case: that case is recorded as an abort with the signal, and a new
    child compiles the cases after it."""
    require_plugin("v6e-1")
    cases = [aot.KernelCase("v6e-1", page_size=p) for p in (16, 32, 64)]
    monkeypatch.setenv("JAXSERVE_AOT_ABORT_ON", cases[1].name)
    seen = []
    results = aot_runner.run_cases(cases, on_result=seen.append)
    assert [r.status for r in results] == ["ok", "abort", "ok"]
    assert "SIGABRT" in results[1].error
    assert [r.case for r in seen] == cases


def test_missing_plugin_skips_or_fails_under_ci(monkeypatch):
    """Without the plugins the group skips and names what to install; under CI it fails."""
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "plugin_versions", lambda: dict.fromkeys(
        ("libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin", "nvidia-cuda-nvcc-cu12")))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="libtpu"):
        require_plugin("v5e-1")
    with pytest.raises(pytest.skip.Exception, match="CUDA plugin.*ptxas"):
        require_plugin("h100")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_plugin("v6e-1")
