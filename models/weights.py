"""Put HF-named tensors into a Flax model: the one mapping table between checkpoints and modules.

Modules mirror HF names, so the table is short: linear `weight f[out, in]` becomes our `kernel
f[in, out]`, and `model.layers.{i}.*` fills row i of the stacked layer parameters.
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

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF tensors that carry no parameters of ours.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def abstract_model(cfg: ModelConfig, dtype) -> nnx.Module:
    """The model's structure with shape-only parameters (no memory, no init cost)."""
    cls = get_model_class(cfg.architecture)
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def _target(hf_name: str) -> tuple[tuple[str, ...], int | None, bool]:
    """HF name -> (our parameter path, layer index or None, transpose?)."""
    layer = None
    m = _LAYER.match(hf_name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        parts = ["model", "layers", *rest.split(".")]
    else:
        parts = hf_name.split(".")
    transpose = False
    if parts[-1] == "weight" and parts[-2].endswith("_proj") or parts[-2:] == ["lm_head", "weight"]:
        parts[-1], transpose = "kernel", True
    return tuple(parts), layer, transpose


def load_params(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], dtype) -> None:
    """Fill `model` (abstract or concrete) with HF-named tensors, in place."""
    cfg: ModelConfig = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    stacks: dict[tuple, np.ndarray] = {}
    filled: dict[tuple, set[int] | None] = {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    for name, array in tensors:
        if _IGNORED.search(name):
            continue
        path, layer, transpose = _target(name)
        if path not in flat:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ValueError(f"checkpoint tensor {name!r} has no place in "
                             f"{cfg.architecture} (looked for {'.'.join(path)})")
        if transpose:
            array = array.T
        want = flat[path].shape
        if layer is None:
            if tuple(array.shape) != tuple(want):
                raise ValueError(f"{name}: checkpoint shape {array.shape}, model expects {want}")
            stacks[path] = np.ascontiguousarray(array, dtype=np_dtype)
            filled[path] = None
            continue
        if tuple(array.shape) != tuple(want[1:]):
            raise ValueError(f"{name}: checkpoint shape {array.shape}, model expects {want[1:]}")
        if path not in stacks:
            stacks[path] = np.empty(want, np_dtype)
            filled[path] = set()
        stacks[path][layer] = array
        filled[path].add(layer)
    missing = [".".join(p) for p in flat if p not in stacks]
    partial = [".".join(p) for p, s in filled.items() if s is not None and len(s) != cfg.num_layers]
    if missing or partial:
        raise ValueError(f"checkpoint lacks tensors for {missing + partial}")
    for path, array in stacks.items():
        flat[path].set_value(jnp.asarray(array))
    nnx.update(model, nnx.from_flat_state(flat))


def dummy_params(model: nnx.Module, seed: int = 0) -> None:
    """Random weights of the right shapes (`--load-format dummy`), small enough to stay finite."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(sorted(flat.items())):
        shape, dtype = var.shape, var.dtype
        if path[-2].endswith("norm"):
            value = jnp.ones(shape, dtype) if not model.config.query_pre_attn_scalar else \
                jnp.zeros(shape, dtype)
        elif path[-1] == "bias":
            value = jnp.zeros(shape, dtype)
        else:
            value = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
                     * 0.02).astype(dtype)
        var.set_value(value)
    nnx.update(model, nnx.from_flat_state(flat))
