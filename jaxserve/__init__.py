"""jaxserve: an LLM inference server on JAX/XLA.

`from jaxserve import LLM, SamplingParams`. The names load lazily, so that host-only modules
(`jaxserve.engine.scheduler`, `jaxserve.engine.block_manager`) import without jax.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"


def _add_source_tree_folders() -> None:
    """From a source checkout, let `jaxserve.models`, `jaxserve.sharding` and
    `jaxserve.kernels_pallas` resolve to the top-level `models/`, `sharding/` and `kernels_pallas/`.

    pyproject's `package-dir` maps them there; an installed wheel holds them inside this package
    and the editable install's finder maps them, but Python run from the checkout's root finds this
    folder through the working directory first, and nothing maps the three then.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if (not os.path.isdir(os.path.join(here, "models"))
            and os.path.isfile(os.path.join(root, "models", "__init__.py"))
            and os.path.isfile(os.path.join(root, "pyproject.toml"))
            and root not in __path__):
        __path__.append(root)  # NOTE: only the three folders are packages there


_add_source_tree_folders()

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
