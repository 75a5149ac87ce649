"""Shared fixtures: tiny model folders (HF format, random weights, the default model's tokenizer)
and engines over them with shapes small enough to compile in a second or two."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Eight CPU devices, for the multi-device tests (tests/test_parallel.py); everything else runs on
# the first. Set before anything imports jax.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

# A private compile cache per test session keeps runs independent of the user's cache.
os.environ.setdefault("JAXSERVE_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "xla"))


@pytest.fixture(scope="session")
def default_tokenizer():
    from jaxserve.models.source import resolve_model

    try:
        source = resolve_model(None)
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")
    return source.load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer):
    """Returns make(arch) -> (folder, hf_model): a saved tiny random model of that architecture."""
    from tiny_models import tiny_hf_model

    made = {}

    def make(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(arch)
            model = tiny_hf_model(arch, **overrides)
            model.save_pretrained(folder)
            default_tokenizer.save_pretrained(folder)
            made[key] = (str(folder), model)
        return made[key]

    return make


TINY_ENGINE = dict(max_model_len=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                   seed=0)


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    """Returns make(arch, **engine_overrides) -> (LLM, hf_model), cached per arguments."""
    from jaxserve import LLM

    made = {}

    def make(arch: str = "LlamaForCausalLM", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            folder, hf = tiny_model_dir(arch)
            made[key] = (LLM(model=folder, **{**TINY_ENGINE, **overrides}), hf)
        return made[key]

    return make
