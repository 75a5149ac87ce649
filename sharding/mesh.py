"""The device mesh: axis names, and the mesh for a (dp, pp, tp) layout with errors that say what
would fit.

Axes, outermost first: `data` (independent batches), `pipe` (pipeline stages: layers), `model`
(tensor parallel: attention heads, MLP hidden, vocabulary; experts under expert parallelism).
Expert parallelism (`--enable-expert-parallel`) shards the experts over the `model` axis instead
of each expert's hidden size, as vLLM's EP reuses the TP group, so it adds no axis of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

DATA = "data"
PIPE = "pipe"
MODEL = "model"
AXES = (DATA, PIPE, MODEL)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How many ways each axis splits; `expert_parallel` moves experts onto the model axis."""

    data: int = 1
    pipe: int = 1
    model: int = 1
    expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.data * self.pipe * self.model

    @property
    def is_single_device(self) -> bool:
        return self.world_size == 1

    def __post_init__(self) -> None:
        for name, size in (("data", self.data), ("pipeline", self.pipe),
                           ("tensor", self.model)):
            if size < 1:
                raise ValueError(f"{name} parallel size must be >= 1, got {size}")


def _fits(n: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return f"{n} device(s) here; dp x pp x tp must divide it: e.g. tp in {divisors}"


def make_mesh(parallel: ParallelConfig, devices=None) -> Mesh:
    """A mesh of shape (data, pipe, model) over `devices` (default: all of them).

    The model axis is innermost so that tensor-parallel peers are neighbours (one host's chips,
    one NVLink domain).
    """
    devices = list(jax.devices() if devices is None else devices)
    need = parallel.world_size
    if need > len(devices):
        raise ValueError(f"dp {parallel.data} x pp {parallel.pipe} x tp {parallel.model} = {need} "
                         f"devices, but {_fits(len(devices))}")
    grid = np.array(devices[:need], dtype=object).reshape(parallel.data, parallel.pipe,
                                                          parallel.model)
    return Mesh(grid, AXES)


def submesh(mesh: Mesh, *, data: int | None = None, pipe: int | None = None) -> Mesh:
    """The mesh of one data replica and/or one pipeline stage (those axes kept, size 1)."""
    grid = mesh.devices
    if data is not None:
        grid = grid[data:data + 1]
    if pipe is not None:
        grid = grid[:, pipe:pipe + 1]
    return Mesh(grid, AXES)


def check_divides(what: str, count: int, parallel: ParallelConfig) -> None:
    """`count` (heads, layers, experts...) must split evenly over the model axis."""
    if count % parallel.model:
        fits = [d for d in range(1, count + 1) if count % d == 0]
        raise ValueError(f"{count} {what} do not split over tensor parallel size {parallel.model}; "
                         f"sizes that divide them: {fits}")
