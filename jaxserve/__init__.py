"""jaxserve: an LLM inference server on JAX/XLA."""

from __future__ import annotations

__version__ = "0.1.0"
