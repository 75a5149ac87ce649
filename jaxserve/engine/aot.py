"""`jaxserve compile MODEL --target T`: the engine's step compiled for a TPU slice or an NVIDIA GPU
this machine does not have, with the per-device memory plan, and no weights needed.

It builds the engine as `jaxserve serve` would on the target (the target's dtype, attention kernel,
page size, buckets and mesh), from the model's config alone (`--load-format dummy` is implied:
nothing is read but config.json), plans memory per device, and compiles every bucket (forward with
its attention kernel, sampler with its structured-output mask) through libtpu or the CUDA plugin.
The executables go where `jaxserve serve` on the target finds them (`--compilation-cache-dir`,
default `~/.cache/jaxserve/xla`, under `executables/`): one set per data-parallel replica, keyed
by its devices. Pipeline stages (`-pp`) are compiled per bucket to check that they build, and not
stored (the engine compiles them where they run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import NamedTuple

from jaxserve.engine import targets

logger = logging.getLogger(__name__)


class CompileReport(NamedTuple):
    target: targets.Target
    plan: object  # memory_plan.MemoryPlan
    seconds: float  # planning and compiling every bucket (of every data-parallel replica)
    num_executables: int
    folder: str | None  # where the executables were written


def compile_for_target(args, target_name: str) -> CompileReport:
    """Plan and compile the engine of `args` (EngineArgs) for `target_name`; raises
    `memory_plan.OutOfMemoryPlan` when the model does not fit, `targets.PluginMissing` when
    the target's compiler is not installed."""
    targets.prepare_environment()
    target = targets.get_target(target_name)
    devices = targets.devices(target.name)

    import jax
    import jax.numpy as jnp

    from jaxserve.config import ModelConfig
    from jaxserve.engine.llm_engine import enable_compilation_cache
    from jaxserve.engine.model_runner import ModelRunner
    from jaxserve.engine.replica import replica_placements, replica_runner_settings
    from jaxserve.models.source import resolve_model

    if args.nnodes > 1:
        raise ValueError("jaxserve compile targets one host; --nnodes is not supported")
    cache_dir = enable_compilation_cache(args.compilation_cache_dir)
    # NOTE: JAX's own cache cannot load entries without a device client (it warns on each);
    # the executables this writes go to jaxserve's executable cache instead.
    jax.config.update("jax_enable_compilation_cache", False)
    source = resolve_model(args.model, download_dir=args.download_dir, revision=args.revision)
    if args.hf_overrides:
        source.hf_config.update(args.hf_overrides)
    cfg = ModelConfig.from_hf(source.hf_config)
    max_model_len = args.resolve_max_model_len(cfg)
    platform = target.platform
    dtype = args.resolve_dtype(cfg, platform)
    kv_dtype = args.resolve_kv_cache_dtype(dtype)
    backend = args.resolve_attention_backend(dtype, kv_dtype, platform)
    parallel = args.parallel_config()
    if parallel.world_size > len(devices):
        raise ValueError(f"dp {parallel.data} x pp {parallel.pipe} x tp {parallel.model} = "
                         f"{parallel.world_size} devices, but {target.name} has {len(devices)}")
    placements = replica_placements(cfg, parallel, devices)
    model_cfg = placements[0].model_config(cfg) if placements[0] else cfg
    logger.info("compiling %s for %s (%s): dtype %s, KV cache %s, attention backend %s",
                source.name, target.name, target.description, jnp.dtype(dtype).name,
                jnp.dtype(kv_dtype).name, backend)
    # NOTE: as LLMEngine builds them (replica_runner_settings), so serve finds them.
    runners: list[ModelRunner] = []
    start = time.perf_counter()
    for placement in placements:
        cache_key, cache_config = replica_runner_settings(
            placement, placements, backend, args.cache_config(backend),
            runners[0] if runners else None)
        runner = ModelRunner(
            model_cfg, cache_config, args.scheduler_config(max_model_len, platform), dtype,
            kv_cache_dtype=kv_dtype, compile_sizes=args.compile_sizes,
            executable_cache_dir=os.path.join(cache_dir, "executables"), cache_key=cache_key,
            placement=placement, attention_backend=backend, device=devices[0], target=target,
            allocate=False)
        runner.compile_all()
        runners.append(runner)
    seconds = time.perf_counter() - start
    logger.info("%s: compiled in %.1f s", target.name, seconds)
    cache = runners[0].executable_cache
    return CompileReport(target, runners[0].plan, seconds,
                         sum(getattr(r, "num_compiled_stages", 0) or
                             len(r._forward_exe) + len(r._sample_exe) for r in runners),
                         cache.folder if cache else None)


def run(args, target_name: str) -> int:
    """The `jaxserve compile` command: prints the plan and the compile time; 1 when the model
    does not fit or the target cannot be compiled for."""
    from jaxserve.engine.memory_plan import OutOfMemoryPlan

    import jax

    args = dataclasses.replace(args, load_format="dummy")
    try:
        report = compile_for_target(args, target_name)
    except (OutOfMemoryPlan, targets.PluginMissing, ValueError) as e:
        print(f"jaxserve compile --target {target_name}: {e}")
        return 1
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"jaxserve compile --target {target_name}: a bucket does not fit the device as "
              f"planned: {e}")
        return 1
    print(report.plan.describe())
    where = report.folder or ("not stored: pipeline stages compile where they run, on first use"
                              if args.pipeline_parallel_size > 1 else "nowhere (cache off)")
    print(f"compiled {report.num_executables} executables for {report.target.name} in "
          f"{report.seconds:.1f} s; written to {where}")
    return 0
