"""Data-parallel replicas: each is a whole copy of the engine's device state and bookkeeping
(runner with weights and KV cache, block manager, scheduler) on its own slice of the mesh's data
axis. The engine places each request on one replica and steps them all together.

The mesh is (data, pipe, model) = (dp, pp, tp); replica i runs on `submesh(mesh, data=i)`, a
(1, pp, tp) mesh, with its own `Placement`, so its arrays live on its own devices only.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.engine.scheduler import Scheduler
from jaxserve.sharding.mesh import ParallelConfig, make_mesh, submesh
from jaxserve.sharding.placement import Placement

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Replica:
    """One data-parallel replica: its runner, page allocator and scheduler."""

    index: int
    runner: ModelRunner
    block_manager: BlockManager
    scheduler: Scheduler

    @property
    def num_seqs(self) -> int:
        """Sequences running or waiting here (what request placement balances)."""
        return self.scheduler.num_running + self.scheduler.num_waiting


def replica_placements(cfg: ModelConfig, parallel: ParallelConfig,
                       devices=None) -> list[Placement | None]:
    """One `Placement` per data replica, each over its own (1, pp, tp) submesh of `devices`
    (default: all of them); `[None]` for a single device (no mesh at all)."""
    if parallel.is_single_device and not parallel.expert_parallel:
        return [None]
    mesh = make_mesh(parallel, devices)
    per_replica = dataclasses.replace(parallel, data=1)
    placements = [Placement.create(cfg, per_replica, submesh(mesh, data=i).devices.flat)
                  for i in range(parallel.data)]
    logger.info("device mesh %s over %s devices; %s", dict(mesh.shape),
                mesh.devices.flat[0].platform, placements[0].layout)
    if len(placements) > 1:
        logger.info("data parallel: %d replicas; %s", len(placements), "; ".join(
            f"replica {i} on devices {device_ids(p)}" for i, p in enumerate(placements)))
    return placements


def replica_runner_settings(placement: Placement | None, placements: list, attention_backend: str,
                            cache_config, first_runner=None):
    """The executable-cache key and the cache config of one replica's runner: with several
    replicas an executable is bound to its devices (so they are in the key), and every replica
    takes replica 0's page count (`first_runner`'s), so all are alike."""
    cache_key = {"attention_backend": attention_backend}
    if len(placements) > 1:
        cache_key["devices"] = device_ids(placement)
        if first_runner is not None:
            cache_config = dataclasses.replace(cache_config,
                                               num_gpu_blocks_override=first_runner.num_pages)
    return cache_key, cache_config


def device_ids(placement: Placement) -> list[int]:
    """The ids of a placement's devices, in mesh order."""
    return [d.id for d in placement.mesh.devices.flat]


def copy_model(model: nnx.Module, placement: Placement) -> nnx.Module:
    """`model` with every array copied, device to device, into its sharding on `placement`'s
    devices (pipeline stages included): the weights are read from the checkpoint once, for
    replica 0."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, placement.shardings(state)))


def pick_replica(replicas: list[Replica]) -> Replica:
    """Where a new request goes: the fewest running + waiting sequences, then the most free
    KV pages, then the lowest index."""
    return min(replicas, key=lambda r: (r.num_seqs, -r.block_manager.num_free_pages, r.index))
