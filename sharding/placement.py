"""Placing parameters on the mesh as they load: each device receives only its own slice, read
from the host copy of the checkpoint tensor (memory-mapped for safetensors), so no device ever
holds a whole sharded weight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxserve.config import ModelConfig
from jaxserve.sharding.mesh import ParallelConfig, make_mesh, submesh
from jaxserve.sharding.rules import TPLayout, param_spec
from jaxserve.sharding.stages import stage_bounds, stage_of


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def key_path(path) -> tuple:
    """A pytree key path into an nnx State as our parameter path (`('model', 'layers', 3, ...)`),
    without the Variable's own `value` key."""
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    return tuple(n for n in names if n is not None and n != "value")


@dataclasses.dataclass(frozen=True)
class Placement:
    """The mesh, the parallel sizes, and the model layout they imply."""

    mesh: Mesh
    parallel: ParallelConfig
    layout: TPLayout
    stages: tuple[tuple[int, int], ...]  # each pipeline stage's [start, end) layers

    @classmethod
    def create(cls, cfg: ModelConfig, parallel: ParallelConfig, devices=None) -> Placement:
        stages = tuple(stage_bounds(cfg.num_layers, parallel.pipe))
        return cls(make_mesh(parallel, devices), parallel, TPLayout.plan(cfg, parallel), stages)

    def stage_mesh(self, stage: int) -> Mesh:
        """The devices of one pipeline stage (the whole mesh without pipeline parallelism)."""
        return self.mesh if self.parallel.pipe == 1 else submesh(self.mesh, pipe=stage)

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config to build the model from on this mesh."""
        return self.layout.apply(cfg)

    def sharding(self, path: tuple) -> NamedSharding:
        """Where parameter `path` lives: its pipeline stage's devices, split by the rules."""
        name = dotted(path)
        return NamedSharding(self.stage_mesh(stage_of(name, list(self.stages))),
                             param_spec(name, self.parallel))

    def shardings(self, state):
        """The sharding of every parameter of an nnx State (a tree shaped like it)."""
        return jax.tree_util.tree_map_with_path(lambda path, _: self.sharding(key_path(path)),
                                                state)

    def adapt(self, path: tuple, value: np.ndarray, head_dim: int) -> np.ndarray:
        """A checkpoint tensor (in our layout) reshaped for the mesh: KV heads repeated when tp
        exceeds them, the vocabulary padded to a multiple of tp."""
        name = dotted(path)
        r = self.layout.kv_head_replicas
        if r > 1 and (name.endswith("k_proj.kernel") or name.endswith("v_proj.kernel")):
            d = value.shape[0]
            return np.repeat(value.reshape(d, -1, head_dim), r, axis=1).reshape(d, -1)
        if r > 1 and (name.endswith("k_proj.bias") or name.endswith("v_proj.bias")):
            return np.repeat(value.reshape(-1, head_dim), r, axis=0).reshape(-1)
        rows = self.layout.padded_vocab_size
        if rows and name.endswith("embed_tokens.weight"):
            return np.pad(value, ((0, rows - value.shape[0]), (0, 0)))
        if rows and name.endswith("lm_head.kernel"):
            return np.pad(value, ((0, 0), (0, rows - value.shape[1])))
        return value

    def put(self, path: tuple, value: np.ndarray, dtype) -> jax.Array:
        """The device array of parameter `path`, each device given its own slice only."""
        np_dtype = jnp.dtype(dtype)
        return jax.make_array_from_callback(
            value.shape, self.sharding(path), lambda index: np.asarray(value[index], np_dtype))
