"""Put HF-named tensors into a Flax model: the one mapping table between checkpoints and modules.

Modules mirror HF names, so the table is short: a linear layer's `weight f[out, in]` becomes our
`kernel f[in, out]`; every other tensor keeps its name and layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.registry import get_model_class

logger = logging.getLogger(__name__)

# HF tensors that carry no parameters of ours.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def abstract_model(cfg: ModelConfig, dtype, attention_backend: str = "ref") -> nnx.Module:
    """The model's structure with shape-only parameters (no memory, no init cost)."""
    cls = get_model_class(cfg.architecture)
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                      attention_backend=attention_backend))


def param_path(hf_name: str) -> tuple[tuple, bool]:
    """HF name -> (our parameter path, transpose?). `model.layers.3.mlp.up_proj.weight` ->
    `('model', 'layers', 3, 'mlp', 'up_proj', 'kernel')`, transposed."""
    parts: list = [int(p) if p.isdigit() else p for p in hf_name.split(".")]
    if parts[-1] == "weight" and (str(parts[-2]).endswith("_proj") or parts[-2] == "lm_head"):
        parts[-1] = "kernel"
        return tuple(parts), True
    return tuple(parts), False


def load_params(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], dtype) -> None:
    """Fill `model` (abstract or concrete) with HF-named tensors, in place."""
    cfg: ModelConfig = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    loaded: set[tuple] = set()
    for name, array in tensors:
        if _IGNORED.search(name):
            continue
        path, transpose = param_path(name)
        if path not in flat:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ValueError(f"checkpoint tensor {name!r} has no place in {cfg.architecture} "
                             f"(looked for {'.'.join(map(str, path))})")
        if transpose:
            array = array.T
        want = tuple(flat[path].shape)
        if tuple(array.shape) != want:
            raise ValueError(f"{name}: checkpoint shape {array.shape}, model expects {want}")
        flat[path].set_value(jnp.asarray(np.asarray(array), dtype=dtype))
        loaded.add(path)
    missing = [".".join(map(str, p)) for p in flat if p not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks tensors for {missing}")
    nnx.update(model, nnx.from_flat_state(flat))


def dummy_params(model: nnx.Module, seed: int = 0) -> None:
    """Random weights of the right shapes (`--load-format dummy`), small enough to stay finite."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(sorted(flat.items())):
        shape, dtype = var.shape, var.dtype
        if str(path[-2]).endswith("norm"):
            value = jnp.ones(shape, dtype) if not model.config.query_pre_attn_scalar else \
                jnp.zeros(shape, dtype)
        elif path[-1] == "bias":
            value = jnp.zeros(shape, dtype)
        else:
            value = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
                     * 0.02).astype(dtype)
        var.set_value(value)
    nnx.update(model, nnx.from_flat_state(flat))
