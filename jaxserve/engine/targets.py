"""Compile targets: TPU slices and NVIDIA GPUs named as users name them, as compile-only devices.

`jaxserve compile --target v5e-4` compiles the engine's step for a TPU v5e slice of 4 chips on any
machine, through JAX's deviceless ahead-of-time compilation: libtpu (from `jax[tpu]`) describes a
TPU topology, the CUDA plugin (from `jax-cuda12-plugin`, with ptxas from `nvidia-cuda-nvcc-cu12`)
describes a GPU from a `GpuTargetConfigProto`. Both run the real compilers (XLA TPU with Mosaic;
XLA GPU with Triton and ptxas), so a kernel or a step that compiles here builds for the chip.

Names follow Cloud TPU's accelerator types: `v5e-4` is 4 v5e chips; `v5p-8` counts TensorCores,
so it is 4 chips of 2 cores each (one JAX device per chip, megacore). Compile-only devices do not
report their memory, so each target carries its HBM size per device for the memory plan.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass

# NOTE: read by libtpu and the CUDA plugin when JAX first loads them: no metadata server (it
# describes the host's own TPU), no check of the driver's CUDA version against the plugin's, and
# no libtpu lock file (compile-only processes share no chip, so several may run at once).
_DEVICELESS_ENV = {"TPU_SKIP_MDS_QUERY": "1", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
                   "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

GiB = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler needs to know of an NVIDIA GPU (a `GpuTargetConfigProto`)."""

    description: str
    compute_capability: tuple[int, int]
    core_count: int  # SMs
    memory_bytes: int
    memory_bandwidth: int  # bytes/s
    clock_rate_ghz: float
    l2_cache_size: int
    shared_memory_per_block_optin: int
    shared_memory_per_core: int

    def target_config(self) -> str:
        """The `GpuTargetConfigProto` in text form."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {self.core_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_size}
  clock_rate_ghz: {self.clock_rate_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 3
}}
device_description_str: "{self.description}"
"""


_HOPPER = dict(compute_capability=(9, 0), core_count=132, clock_rate_ghz=1.98,
               l2_cache_size=50 << 20, shared_memory_per_block_optin=232448,
               shared_memory_per_core=233472)
GPUS = {
    # device_memory_size as the CUDA driver reports it (what XLA's allocator sees).
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", memory_bytes=84978434048,
                    memory_bandwidth=3352320000000, **_HOPPER),
    "h200": GpuSpec("NVIDIA H200", memory_bytes=150754820096,
                    memory_bandwidth=4800000000000, **_HOPPER),
}


@dataclass(frozen=True)
class Target:
    """A named compile target: its platform, devices and memory per device."""

    name: str
    platform: str  # "tpu" | "cuda"
    num_devices: int
    memory_per_device: int  # bytes of HBM per JAX device
    topology: str  # libtpu's topology name, or the GPU spec's key
    description: str

    @property
    def attention_backend(self) -> str:
        return "tpu" if self.platform == "tpu" else "gpu"


def _tpu(generation: str, chips: int, hbm_gib: float, cores_per_chip: int = 1) -> Target:
    shape = {1: "1x1", 4: "2x2", 8: "2x4"}[chips] if generation in ("v5e", "v6e") else \
        {4: "2x2x1", 8: "2x2x2"}[chips]
    name = f"{generation}-{chips * cores_per_chip}"
    return Target(name, "tpu", chips, int(hbm_gib * GiB), f"{generation}:{shape}",
                  f"TPU {generation}, {chips} chip{'s' if chips > 1 else ''} of {hbm_gib} GiB")


# NOTE: HBM per chip as libtpu makes it available to a program (what its out-of-memory errors
# report: 15.75G on v5e, 31.25G on v6e, 95.74G on v5p), so a plan made here equals the plan
# `jaxserve serve` makes on the chip.
TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("v5e", 1, 15.75), _tpu("v5e", 4, 15.75), _tpu("v5e", 8, 15.75),
    _tpu("v6e", 1, 31.25), _tpu("v6e", 4, 31.25), _tpu("v6e", 8, 31.25),
    _tpu("v5p", 4, 95.74, cores_per_chip=2),
    *(Target(name, "cuda", 1, spec.memory_bytes, name, spec.description)
      for name, spec in GPUS.items()),
)}


def get_target(name: str) -> Target:
    """The target named `name` (`v5e-4`, `h100`, ...); `h100x8` is eight H100s."""
    key = name.strip().lower()
    count = 1
    if "x" in key and key.split("x", 1)[0] in GPUS:
        key, n = key.split("x", 1)
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"a GPU target is NAME or NAMExCOUNT (h100x8), got {name!r}")
        count = int(n)
    if key not in TARGETS:
        raise ValueError(f"unknown compile target {name!r}; known: {', '.join(TARGETS)} "
                         f"(GPUs also as NAMExCOUNT, e.g. h100x8)")
    target = TARGETS[key]
    if count > 1:
        target = Target(f"{key}x{count}", "cuda", count, target.memory_per_device, key,
                        f"{count} x {target.description}")
    return target


def prepare_environment() -> None:
    """Set what libtpu and the CUDA plugin need to load on a machine without their hardware.
    Call before JAX initialises its backends."""
    for key, value in _DEVICELESS_ENV.items():
        os.environ.setdefault(key, value)


class PluginMissing(RuntimeError):
    """The compiler plugin a target needs is not installed."""


def plugin_versions() -> dict[str, str | None]:
    """Versions of the compiler plugins (None: not installed)."""
    out = {}
    for dist in ("libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin", "nvidia-cuda-nvcc-cu12"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


@functools.cache
def devices(name: str) -> tuple:
    """Compile-only JAX devices of the target (raises `PluginMissing` with the install command
    when its compiler plugin is absent)."""
    import jax
    from jax.experimental import topologies

    target = get_target(name)
    prepare_environment()
    versions = plugin_versions()
    if target.platform == "tpu":
        if versions["libtpu"] is None:
            raise PluginMissing(f"compiling for {target.name} needs libtpu: "
                                f"pip install 'jax[tpu]=={jax.__version__}'")
        kwargs = {"chips_per_host_bounds": (1, 1, 1)} if target.num_devices == 1 else {}
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            **kwargs)
    else:
        if versions["jax-cuda12-plugin"] is None and versions["jax-cuda13-plugin"] is None:
            raise PluginMissing(
                f"compiling for {target.name} needs the CUDA plugin and ptxas: pip install "
                f"'jax-cuda12-plugin=={jax.__version__}' nvidia-cuda-nvcc-cu12 "
                "(or the project's `aot` extra)")
        shape = f"1x1x{target.num_devices}"
        topo = topologies.get_topology_desc(
            shape, platform="cuda", topology=shape,
            target_config=GPUS[target.topology].target_config())
    devs = tuple(topo.devices)
    if len(devs) != target.num_devices:
        raise RuntimeError(f"{target.name}: expected {target.num_devices} devices, the "
                           f"topology gave {len(devs)}")
    return devs
