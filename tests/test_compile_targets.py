"""`jaxserve compile MODEL --target T`: the engine's step compiled for TPU slices and an H100
without them, and the per-device memory plan (`pytest -m aot`).

Models are config folders shaped like Llama-3-8B and Qwen3-30B-A3B (tests/data/configs); no
weight is read. Each compile runs in a child process (a compiler abort must not take the test run
with it), as a user runs it. The plans are checked against weight sizes computed by hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from test_aot_kernels import require_plugin

pytestmark = pytest.mark.aot

CONFIGS = os.path.join(os.path.dirname(__file__), "data", "configs")
LLAMA = os.path.join(CONFIGS, "llama-3-8b")
QWEN_MOE = os.path.join(CONFIGS, "qwen3-30b-a3b")
GiB = 1 << 30

# Llama-3-8B by hand: embeddings and lm_head, 32 layers of attention (q, o: 4096^2; k, v:
# 4096 x 1024) and MLP (3 x 4096 x 14336), two norms per layer and one at the end; bfloat16.
LLAMA_PARAMS = (2 * 128256 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
                                          + 2 * 4096) + 4096)


def jaxserve_compile(model: str, target: str, *flags: str, cache_dir: str,
                     timeout: int = 900) -> subprocess.CompletedProcess:
    require_plugin(target)
    env = {**os.environ, "JAXSERVE_COMPILATION_CACHE_DIR": cache_dir}
    env.pop("XLA_FLAGS", None)  # the test run's 8 CPU devices are not the target's
    return subprocess.run([sys.executable, "-m", "jaxserve.cli", "compile", model, "--target",
                           target, *flags], capture_output=True, text=True, timeout=timeout,
                          env=env)


def plan_gib(output: str, row: str) -> float:
    m = re.search(rf"^\s*{row}\s+([0-9.]+) GiB", output, re.M)
    assert m, f"no {row!r} row in:\n{output}"
    return float(m.group(1))


def test_llama_8b_does_not_fit_one_v5e_chip(tmp_path):
    out = jaxserve_compile(LLAMA, "v5e-1", cache_dir=str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert "does not fit" in out.stdout and "the weights alone" in out.stdout
    assert "--tensor-parallel-size" in out.stdout  # says what would fit
    assert plan_gib(out.stdout, "weights") == pytest.approx(LLAMA_PARAMS * 2 / GiB, rel=0.02)


def test_llama_8b_fits_v5e_4_at_tp_4_with_room_for_kv(tmp_path):
    """The plan is measured (the step compiled for v5e with the tpu kernel), every bucket
    compiles, and the executables are written where `jaxserve serve` looks."""
    out = jaxserve_compile(LLAMA, "v5e-4", "-tp", "4", "--max-model-len", "4096",
                           "--max-num-batched-tokens", "256", "--max-num-seqs", "16",
                           "--cudagraph-capture-sizes", "16", cache_dir=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    weights = plan_gib(out.stdout, "weights")
    assert weights == pytest.approx(LLAMA_PARAMS * 2 / 4 / GiB, rel=0.02)
    kv = plan_gib(out.stdout, "KV cache")
    # 15.75 GiB x 0.9, less weights and the step: several GiB left for pages
    assert kv > 5, out.stdout
    assert plan_gib(out.stdout, "total") <= 15.75 * 0.9
    assert re.search(r"compiled 3 executables for v5e-4", out.stdout), out.stdout
    written = [n for _, _, files in os.walk(tmp_path / "executables") for n in files
               if n.endswith(".pkl")]
    assert sorted(n.split("-")[0] for n in written) == ["forward", "forward", "sample"]


# The smallest and largest token buckets of the engine step (--cudagraph-capture-sizes 16 and
# --max-num-batched-tokens 256) and their one sampler (16 rows), KV pages fixed so that each is
# compiled once. Four of the model's layers, each of its real shape: the layers are unrolled in
# the step, so compile time grows with their number while what is checked (every layer's code
# builds for the chip) does not; the full-depth plans are the tests above and
# scripts/compile_sweep.py.
BUCKETS = ("--max-model-len", "2048", "--max-num-batched-tokens", "256", "--max-num-seqs", "16",
           "--cudagraph-capture-sizes", "16", "--num-gpu-blocks-override", "512",
           "--hf-overrides", '{"num_hidden_layers": 4}')


@pytest.mark.parametrize("model,target,flags", [
    (LLAMA, "v5e-8", ("-tp", "8")),
    (LLAMA, "v6e-4", ("-tp", "4")),
    (LLAMA, "h100", ()),
    (QWEN_MOE, "v5e-8", ("-tp", "8", "--enable-expert-parallel")),
    (QWEN_MOE, "v6e-4", ("-tp", "4")),
    (QWEN_MOE, "h100", ()),
], ids=["llama-8b-v5e-8-tp8", "llama-8b-v6e-4-tp4", "llama-8b-h100", "qwen3-30b-a3b-v5e-8-tp8-ep",
        "qwen3-30b-a3b-v6e-4-tp4", "qwen3-30b-a3b-h100"])
def test_engine_step_compiles_for_target(model, target, flags, tmp_path):
    out = jaxserve_compile(model, target, *flags, *BUCKETS, cache_dir=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert re.search(rf"compiled 3 executables for {target}", out.stdout), out.stdout
    assert plan_gib(out.stdout, "total") > 0


TINY = ("--max-model-len", "256", "--max-num-batched-tokens", "32", "--max-num-seqs", "8",
        "--cudagraph-capture-sizes", "16")


def tiny_config(tmp_path) -> str:
    """A two-layer Llama config (no weights): these tests check the wiring, not the scale."""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    return str(model)


def test_data_parallel_compiles_each_replica_for_its_devices(tmp_path):
    """-dp 2 on two H100s: each replica's executables, keyed by its own devices, as
    `jaxserve serve -dp 2` looks them up."""
    out = jaxserve_compile(tiny_config(tmp_path), "h100x2", "-dp", "2", *TINY,
                           cache_dir=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "compiled 6 executables for h100x2" in out.stdout, out.stdout
    keys = os.listdir(tmp_path / "cache" / "executables")
    assert len(keys) == 2  # one folder per replica's devices


# NOTE: on TPU a pipeline stage copies its KV cache (XLA TPU asks for four times the cache in
# temporaries): the plan measures that and gives the cache less, so every bucket still fits.
@pytest.mark.parametrize("target,flags", [("h100x2", ("-pp", "2")),
                                          ("v5e-4", ("-pp", "2", "-tp", "2"))])
def test_pipeline_stages_compile_for_target(target, flags, tmp_path):
    """-pp 2: both stages (per micro-batch size) and the head of each token bucket, and the
    sampler: 2 buckets x 3 + 1 executables, each stage on its own devices."""
    out = jaxserve_compile(tiny_config(tmp_path), target, *flags, *TINY,
                           cache_dir=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert f"compiled 7 executables for {target}" in out.stdout, out.stdout
