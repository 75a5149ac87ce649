"""Multi-host serving: one process per node, joined into one JAX program by `jax.distributed`.

`jax.devices()` then lists every node's devices, so the device mesh, and tensor parallelism with
it, spans the nodes. A JAX program is SPMD: every process must launch the same computations in
the same order. So every node builds the same `LLMEngine` (model config, mesh, weights, compiled
buckets), and then
- node 0 runs the HTTP server, the scheduler and the engine loop; before each step its runner
  sends the step's inputs (the padded token stream and the sampling metadata, numpy arrays) to
  the other nodes (`Lockstep.send`);
- every other node (`run_follower`) receives each step and runs the same compiled step on its
  devices, until node 0 sends stop.

Steps travel through the key-value store of JAX's coordination service (which `jax.distributed`
runs in node 0's process) rather than through a device collective, because
- a follower waits for the next step for as long as the server is idle, in a blocking read that
  it renews every minute; a device collective left waiting for hours risks the runtime's timeouts;
- a step is one message: its arrays packed together and compressed, a constant table (an unused
  penalty history, say) sent as its value alone. `multihost_utils.broadcast_one_to_all` runs a
  cross-process all-reduce per array: about 3 ms each on CPU, 80 ms for a step's 26 arrays.
On two CPU cores over loopback a step's message (a few KB) costs node 0 about 1 ms.

Shutdown: node 0 sends stop when its runner is garbage collected and at process exit (an `LLM`
going away, a server stopped by SIGTERM); the followers then return from `run_follower` and exit
0. Should node 0 die instead, the coordination service dies with it and JAX aborts every other
process at once ("the JAX distributed service detected fatal errors"); should a follower die, the
coordination service notices when its heartbeats stop (100 s) and aborts the others the same way.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import logging
import math
import struct
import threading
import weakref
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed

if TYPE_CHECKING:
    from jaxserve.engine.args import EngineArgs
    from jaxserve.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300  # how long nodes wait for each other at start-up (jax.distributed's)
_POLL_MS = 60_000  # a follower renews its wait for the next step this often (an idle server)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where this process stands in a multi-host group (`--nnodes` > 1)."""

    coordinator_address: str  # host:port of the coordination service, run by node 0
    num_processes: int
    process_id: int
    timeout_s: int = DEFAULT_TIMEOUT_S

    @classmethod
    def from_args(cls, args: EngineArgs) -> DistributedConfig | None:
        """The group `--nnodes`, `--node-rank`, `--master-addr`, `--master-port` name (SGLang's
        `--dist-init-addr` sets the last two); None for a single node."""
        if args.nnodes == 1:
            return None
        host = args.master_addr
        if ":" in host and not host.startswith("["):  # an IPv6 address
            host = f"[{host}]"
        return cls(f"{host}:{args.master_port}", args.nnodes, args.node_rank,
                   args.distributed_timeout_seconds or DEFAULT_TIMEOUT_S)


_joined: DistributedConfig | None = None  # the group this process has joined


def initialize(args: EngineArgs) -> DistributedConfig | None:
    """Join the multi-host group that `args` names: once per process, nothing for one node.

    Must run before anything touches the devices; `LLMEngine` calls it first.
    """
    global _joined
    config = DistributedConfig.from_args(args)
    if config is None or config == _joined:
        return config
    if _joined is not None:
        raise ValueError(f"this process already joined {_joined}; it cannot join {config} too")
    if jax.distributed.is_initialized():  # by the caller: it must be this group
        joined = (jax.process_count(), jax.process_index())
        if joined != (config.num_processes, config.process_id):
            raise ValueError(f"jax.distributed was initialised as process {joined[1]} of "
                             f"{joined[0]}, not as --node-rank {config.process_id} of --nnodes "
                             f"{config.num_processes}")
        _joined = config
        return config
    # NOTE: XLA:CPU runs cross-process collectives only with an implementation chosen (gloo is
    # the default in recent jax, and the one that needs nothing installed).
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("node %d of %d: joining the group coordinated at %s", config.process_id,
                config.num_processes, config.coordinator_address)
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id,
                               initialization_timeout=config.timeout_s)
    _joined = config
    logger.info("node %d of %d: %d of the group's %d %s devices are here", config.process_id,
                config.num_processes, jax.local_device_count(), jax.device_count(),
                jax.devices()[0].platform)
    return config


def connect(runner: ModelRunner) -> Lockstep | None:
    """The step channel of `runner` when this process is one node of several (else None).

    Checks that the runner's mesh spans every node, and that every node built the same runner
    (`runner.step_key`: what its compiled step depends on, and its devices).
    """
    if jax.process_count() == 1:
        return None
    nodes = ({d.process_index for d in runner.mesh.devices.flat} if runner.mesh is not None
             else {jax.process_index()})
    if nodes != set(range(jax.process_count())):
        raise ValueError(f"the device mesh ({_mesh_shape(runner)}) uses the devices of node(s) "
                         f"{sorted(nodes)} only; with --nnodes {jax.process_count()} it must span "
                         f"every node: set --tensor-parallel-size to the group's "
                         f"{jax.device_count()} devices")
    T = runner.buckets[0]
    template = (runner._empty_input(T), runner._empty_sampling(runner.rows_for(T)))
    fingerprint = {**runner.step_key, "enforce_eager": runner.enforce_eager,
                   "devices": [d.id for d in runner.mesh.devices.flat]}
    lockstep = Lockstep(template, fingerprint, _joined.timeout_s if _joined else DEFAULT_TIMEOUT_S)
    weakref.finalize(runner, lockstep.stop)  # the engine going away releases the followers
    return lockstep


def _mesh_shape(runner: ModelRunner) -> dict[str, int]:
    return dict(runner.mesh.shape) if runner.mesh is not None else {}


# Runners made in this process, in order (every node makes them in the same order): each has its
# own channel.
_channels = itertools.count()
_STOP = b"stop"


class Lockstep:
    """One runner's step channel across the nodes: node 0 sends each step's inputs (a pytree of
    numpy arrays shaped like `template`); the other nodes iterate over them."""

    def __init__(self, template: Any, fingerprint: dict[str, Any], timeout_s: int):
        # NOTE: the coordination service's key-value store has no public API; this client is
        # the one `jax.distributed.initialize` connected.
        self._client = jax_distributed.global_state.client
        if self._client is None:
            raise RuntimeError("jax.distributed is not initialised (engine/distributed.py "
                               "initialize)")
        self._prefix = f"jaxserve/lockstep/{next(_channels)}"
        self._treedef = jax.tree.structure(template)
        self.rank = jax.process_index()
        self._num_followers = jax.process_count() - 1
        self._step = 0  # the next step's number
        self._stopped = False
        self._lock = threading.Lock()  # send and stop may come from different threads
        self._handshake(fingerprint, timeout_s * 1000)
        if self.rank == 0:
            # NOTE: registered after jax's own exit handler (which shuts the client down), so
            # it runs before it.
            atexit.register(self.stop)

    def _key(self, step: int) -> str:
        return f"{self._prefix}/step/{step}"

    def _handshake(self, fingerprint: dict[str, Any], timeout_ms: int) -> None:
        """Node 0 publishes what its runner was built with; every other node compares its own
        and answers. A difference (other engine options, or a KV cache sized from another
        amount of free memory) would make the compiled steps differ and the first one hang:
        it raises `ValueError` on that node and on node 0."""
        ours = json.loads(json.dumps(fingerprint, default=str))
        if self.rank == 0:
            self._client.key_value_set(f"{self._prefix}/config", json.dumps(ours))
            for rank in range(1, self._num_followers + 1):
                answer = self._client.blocking_key_value_get(f"{self._prefix}/config/{rank}",
                                                             timeout_ms)
                if answer != "ok":
                    raise ValueError(f"node {rank} {answer}")
            return
        theirs = json.loads(self._client.blocking_key_value_get(f"{self._prefix}/config",
                                                                timeout_ms))
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        answer = "ok"
        if differ:
            answer = ("built another engine than node 0: " + "; ".join(
                f"{k} {ours.get(k)} (node 0: {theirs.get(k)})" for k in differ)
                + "; start every node with the same model and options (and, on GPU, "
                "--num-gpu-blocks-override so that KV caches match)")
        self._client.key_value_set(f"{self._prefix}/config/{self.rank}", answer)
        if differ:
            raise ValueError(f"node {self.rank} {answer}")

    # ---- node 0 ---------------------------------------------------------------------------
    def send(self, step: Any) -> None:
        """Publish the next step for the other nodes (node 0 only)."""
        if self.rank != 0:
            raise RuntimeError(f"node {self.rank} cannot schedule steps: only node 0 runs the "
                               "engine; the others run engine/distributed.py run_follower")
        message = _encode(jax.tree.leaves(step))
        with self._lock:
            if self._stopped:
                raise RuntimeError("the multi-host group was stopped: the other nodes exited")
            self._client.key_value_set_bytes(self._key(self._step), message)
            self._step += 1

    def stop(self) -> None:
        """Tell the other nodes to exit (node 0; once, and a step sent after it raises)."""
        with self._lock:
            if self._stopped or self.rank != 0:
                return
            self._stopped = True
            try:
                self._client.key_value_set_bytes(self._key(self._step), _STOP)
                logger.info("told the other %d node(s) to stop", self._num_followers)
            except jax.errors.JaxRuntimeError as e:  # the group is gone already
                logger.warning("could not tell the other nodes to stop: %s", e)

    # ---- the other nodes ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        """Each step node 0 sends, in order, until it stops (the other nodes)."""
        while True:
            message = self._wait(self._key(self._step))
            if message == _STOP:
                return
            yield jax.tree.unflatten(self._treedef, _decode(message))
            self._consumed(self._step)  # after the caller dispatched it: off the critical path
            self._step += 1

    def _wait(self, key: str) -> bytes:
        while True:
            try:
                return self._client.blocking_key_value_get_bytes(key, _POLL_MS)
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise  # (node 0 gone: JAX aborts this process anyway)

    def _consumed(self, step: int) -> None:
        """The last node to have read a step deletes it, so the store does not grow."""
        count_key = f"{self._prefix}/read/{step}"
        if self._client.key_value_increment(count_key, 1) == self._num_followers:
            self._client.key_value_delete(self._key(step))
            self._client.key_value_delete(count_key)


# ---- messages -------------------------------------------------------------------------------
_MAGIC = b"JXS1"
_CONSTANT_MIN = 256  # arrays of at least this many elements are checked for a single value


def _encode(leaves: list[np.ndarray]) -> bytes:
    """Arrays -> one message: magic, header length, a JSON header (each array's dtype, shape and,
    for a constant array, the bits of its value), then the other arrays' bytes, compressed."""
    header, chunks = [], []
    for x in leaves:
        x = np.asarray(x)
        bits = _bits(x)  # compared bit for bit: -0.0 is not 0.0, a NaN is itself
        value = None
        if bits is not None and x.size >= _CONSTANT_MIN and (bits == bits[0]).all():
            value = int(bits[0])
        else:
            chunks.append(x.tobytes())
        header.append((x.dtype.str, x.shape, value))
    head = json.dumps(header).encode()
    return _MAGIC + struct.pack("<I", len(head)) + head + zlib.compress(b"".join(chunks), 1)


def _decode(message: bytes) -> list[np.ndarray]:
    if message[:4] != _MAGIC:
        raise ValueError(f"not a step message: {message[:16]!r}")
    (n,) = struct.unpack_from("<I", message, 4)
    header = json.loads(message[8:8 + n])
    body = zlib.decompress(message[8 + n:])
    leaves, offset = [], 0
    for dtype, shape, value in header:
        dtype, shape = np.dtype(dtype), tuple(shape)
        if value is not None:
            leaves.append(np.full(shape, value, f"u{dtype.itemsize}").view(dtype))
            continue
        count = math.prod(shape)
        leaves.append(np.frombuffer(body, dtype, count, offset).reshape(shape))
        offset += count * dtype.itemsize
    assert offset == len(body), (offset, len(body))
    return leaves


def _bits(x: np.ndarray) -> np.ndarray | None:
    """The array's elements as unsigned integers of the same width (None for odd widths)."""
    if x.dtype.itemsize not in (1, 2, 4, 8):
        return None
    return x.reshape(-1).view(f"u{x.dtype.itemsize}")


def run_follower(args: EngineArgs) -> int:
    """Node `args.node_rank` > 0 of a multi-host group: build the same engine as node 0, then run
    every step node 0 sends until it stops. Returns 0, the process's exit status."""
    if args.nnodes == 1 or args.node_rank == 0:
        raise ValueError(f"run_follower runs nodes 1 to N-1 of an --nnodes N group, got --nnodes "
                         f"{args.nnodes} --node-rank {args.node_rank} (node 0 runs the engine: "
                         f"LLM(...) or jaxserve serve)")
    from jaxserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(args)
    logger.info("node %d of %d ready: running the steps of node 0", args.node_rank, args.nnodes)
    engine.runner.follow()
    logger.info("node 0 stopped after %d steps: node %d exits", engine.runner.num_steps,
                args.node_rank)
    return 0
