"""jaxserve: an LLM inference server on JAX/XLA.

`from jaxserve import LLM, SamplingParams`. The names load lazily, so that host-only modules
(`jaxserve.engine.scheduler`, `jaxserve.engine.block_manager`) import without jax.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "LLM": "jaxserve.entrypoints.llm",
    "SamplingParams": "jaxserve.sampling_params",
    "RequestOutputKind": "jaxserve.sampling_params",
    "RequestOutput": "jaxserve.outputs",
    "CompletionOutput": "jaxserve.outputs",
    "EngineArgs": "jaxserve.engine.args",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
