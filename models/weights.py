"""Put HF-named tensors into a Flax model: the one mapping table between checkpoints and modules.

Modules mirror HF names, so the table is short: a linear layer's `weight f[out, in]` becomes our
`kernel f[in, out]`; experts' weights are stacked into `experts.*.kernel f[E, in, out]`, whether a
checkpoint stores one tensor per expert (Hub safetensors) or all experts fused (`transformers`' own
state dict); every other tensor keeps its name and layout.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.registry import get_model_class
from jaxserve.sharding.placement import Placement

logger = logging.getLogger(__name__)

# HF tensors that carry no parameters of ours.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")

# How a checkpoint tensor lands in our parameters.
SAME = "same"  # as is
LINEAR = "linear"  # HF f[..., out, in] -> our f[..., in, out]
EXPERT = "expert"  # one expert's f[out, in] -> row `e` of a stacked f[E, in, out]
FUSED = "fused"  # f[..., n*out, in] -> n parameters f[..., in, out] (chunks along HF's out axis)

# (HF name, our parameter name(s), layout); the first full match wins. Named group `e` is the
# expert's row.
_TABLE: list[tuple[re.Pattern, tuple[str, ...], str]] = [(re.compile(p), t, lay) for p, t, lay in [
    # Mixtral on the Hub: `block_sparse_moe`, experts' w1 (gate), w3 (up), w2 (down).
    (r"(.+)\.block_sparse_moe\.gate\.weight", (r"\1.mlp.gate.kernel",), LINEAR),
    (r"(.+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.w1\.weight",
     (r"\1.mlp.experts.gate_proj.kernel",), EXPERT),
    (r"(.+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.w3\.weight",
     (r"\1.mlp.experts.up_proj.kernel",), EXPERT),
    (r"(.+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.w2\.weight",
     (r"\1.mlp.experts.down_proj.kernel",), EXPERT),
    # Qwen3-MoE on the Hub: one tensor per expert and projection.
    (r"(.+)\.experts\.(?P<e>\d+)\.(\w+_proj)\.weight", (r"\1.experts.\3.kernel",), EXPERT),
    # `transformers` 5 state dicts: all experts in one tensor, gate and up fused.
    (r"(.+)\.experts\.gate_up_proj", (r"\1.experts.gate_proj.kernel", r"\1.experts.up_proj.kernel"),
     FUSED),
    (r"(.+)\.experts\.down_proj", (r"\1.experts.down_proj.kernel",), LINEAR),
    (r"(.+\.mlp\.gate|.+_proj|(?:.+\.)?lm_head)\.weight", (r"\1.kernel",), LINEAR),
    (r"(.+)", (r"\1",), SAME),
]]


class Target(NamedTuple):
    """Where one checkpoint tensor (or one chunk of it) goes."""

    path: tuple  # our parameter path, e.g. ('model', 'layers', 3, 'mlp', 'up_proj', 'kernel')
    layout: str  # SAME, LINEAR, EXPERT or FUSED
    expert: int | None = None  # EXPERT: the row of the stacked parameter
    chunk: tuple[int, int] | None = None  # FUSED: (i, n), the i-th of n chunks


def _path(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def targets(hf_name: str) -> list[Target]:
    """HF name -> where its data goes: `model.layers.3.mlp.up_proj.weight` -> `model.layers.3.mlp.
    up_proj.kernel` (LINEAR); `model.layers.3.block_sparse_moe.experts.5.w3.weight` -> row 5 of
    `model.layers.3.mlp.experts.up_proj.kernel` (EXPERT)."""
    for pattern, names, layout in _TABLE:
        m = pattern.fullmatch(hf_name)
        if m is None:
            continue
        expert = int(m["e"]) if layout == EXPERT else None
        return [Target(_path(m.expand(t)), layout, expert,
                       (i, len(names)) if layout == FUSED else None)
                for i, t in enumerate(names)]
    raise AssertionError(f"the mapping table's catch-all missed {hf_name!r}")


def _to_ours(array: np.ndarray, t: Target) -> np.ndarray:
    if t.layout == SAME:
        return array
    array = np.swapaxes(array, -1, -2)
    if t.layout == FUSED:
        i, n = t.chunk
        return np.split(array, n, axis=-1)[i]
    return array


def abstract_model(cfg: ModelConfig, dtype, attention_backend: str = "ref") -> nnx.Module:
    """The model's structure with shape-only parameters (no memory, no init cost)."""
    cls = get_model_class(cfg.architecture)
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                      attention_backend=attention_backend))


def load_params(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], dtype,
                placement: Placement | None = None) -> None:
    """Fill `model` (abstract or concrete) with HF-named tensors, in place; with a `placement`,
    each parameter goes straight into its sharding over the mesh."""
    cfg: ModelConfig = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    loaded: set[tuple] = set()
    # Stacked expert parameters being filled one row at a time: path -> (host buffer, rows seen).
    stacking: dict[tuple, tuple[np.ndarray, set[int]]] = {}

    def put(path: tuple, value: np.ndarray) -> None:
        if placement is None:
            flat[path].set_value(jnp.asarray(value, dtype=dtype))
        else:
            flat[path].set_value(placement.put(path, value, dtype))
        loaded.add(path)

    for name, array in tensors:
        if _IGNORED.search(name):
            continue
        for t in targets(name):
            if t.path not in flat:
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no place in {cfg.architecture} "
                                 f"(looked for {'.'.join(map(str, t.path))})")
            value = _to_ours(np.asarray(array), t)
            if placement is not None:
                value = placement.adapt(t.path, value, cfg.head_dim)
            want = tuple(flat[t.path].shape)
            if t.layout == EXPERT:
                if not 0 <= t.expert < want[0] or value.shape != want[1:]:
                    raise ValueError(f"{name}: checkpoint shape {array.shape} for expert "
                                     f"{t.expert}, model expects {want[1:]} for each of "
                                     f"{want[0]} experts")
                buf, rows = stacking.setdefault(t.path, (np.empty(want, value.dtype), set()))
                buf[t.expert] = value
                rows.add(t.expert)
                if len(rows) == want[0]:
                    put(t.path, stacking.pop(t.path)[0])
                continue
            if value.shape != want:
                raise ValueError(f"{name}: checkpoint shape {array.shape}, model expects {want}")
            put(t.path, value)
    missing = [".".join(map(str, p)) for p in flat if p not in loaded and p not in stacking]
    missing += [f"{'.'.join(map(str, p))} (experts {sorted(set(range(len(buf))) - rows)})"
                for p, (buf, rows) in stacking.items()]
    if missing:
        raise ValueError(f"checkpoint lacks tensors for {missing}")
    nnx.update(model, nnx.from_flat_state(flat))


def dummy_params(model: nnx.Module, seed: int = 0, placement: Placement | None = None) -> None:
    """Random weights of the right shapes (`--load-format dummy`), small enough to stay finite;
    with a `placement`, each device generates only its own slice."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(sorted(flat.items())):
        shape, dtype = var.shape, var.dtype
        if str(path[-2]).endswith("norm"):
            fill = 0.0 if model.config.query_pre_attn_scalar else 1.0
            make = functools.partial(jnp.full, shape, fill, dtype)
        elif path[-1] == "bias":
            make = functools.partial(jnp.zeros, shape, dtype)
        else:
            make = functools.partial(_normal, jax.random.fold_in(key, i), shape, dtype)
        if placement is None:
            var.set_value(make())
        else:
            var.set_value(jax.jit(make, out_shardings=placement.sharding(path))())
    nnx.update(model, nnx.from_flat_state(flat))


def _normal(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
