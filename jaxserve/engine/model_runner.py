"""The model runner: lays a scheduled step out as one padded ragged token stream and runs the
compiled step: forward (KV write included), logits at each sequence's last token, then sampling
on device; only sampled ids (and asked-for logprobs) come back to the host.

Shapes come from the token count T, padded to a bucket (powers of two); the row count is
S = min(T, max_num_seqs). Every bucket is compiled ahead of time at start-up, so a step can never
trigger a compile: a shape outside the buckets is an error, not a slow request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxserve.config import CacheConfig, ModelConfig, SchedulerConfig
from jaxserve.engine import distributed, executable_cache, memory_plan
from jaxserve.engine.sampler import SamplerOutput, SamplingMetadata, compute_logprobs, sample
from jaxserve.engine.pipeline import Pipeline
from jaxserve.engine.sampling_metadata import build_sampling_metadata
from jaxserve.engine.scheduler import SchedulerOutput
from jaxserve.progress import progress
from jaxserve.kernels_pallas import init_kv_cache
from jaxserve.kernels_pallas.quant import kv_bytes_per_token_head
from jaxserve.models.layers import AttentionMetadata
from jaxserve.models.weights import abstract_model
from jaxserve.sampling_params import MAX_LOGPROBS
from jaxserve.sharding.mesh import AXES
from jaxserve.sharding.placement import Placement
from jaxserve.sharding.rules import kv_cache_spec

logger = logging.getLogger(__name__)


class ForwardInput(NamedTuple):
    token_ids: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]
    md: AttentionMetadata
    logits_indices: jax.Array  # i32[S] the last token of each sequence in the stream
    prompt_next_ids: jax.Array  # i32[T] the prompt token each position predicts (prompt logprobs)
    want_prompt_logprobs: jax.Array  # bool[]


class PromptLogprobs(NamedTuple):
    logprob: jax.Array  # f32[T]
    rank: jax.Array  # i32[T]
    top_ids: jax.Array  # i32[T, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[T, MAX_LOGPROBS]


class StepResult(NamedTuple):
    """Host copies of what one step produced, for the first `num_seqs` rows / `num_tokens` tokens."""

    sampled: SamplerOutput  # numpy, rows = scheduled sequences
    prompt: PromptLogprobs | None  # numpy, rows = stream tokens; None unless asked for


def token_buckets(max_tokens: int, min_bucket: int,
                  sizes: tuple[int, ...] | None = None) -> list[int]:
    """Powers of two from `min_bucket`, or the given sizes, always ending at `max_tokens`."""
    if sizes:
        return sorted({int(s) for s in sizes if int(s) < max_tokens} | {max_tokens})
    buckets, b = [], min_bucket
    while b < max_tokens:
        buckets.append(b)
        b *= 2
    buckets.append(max_tokens)
    return buckets


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Bytes one page of every layer's K/V takes (all heads, one device)."""
    per_token_head = kv_bytes_per_token_head(cfg.head_dim, dtype)
    return cfg.num_layers * page_size * 2 * cfg.num_kv_heads * per_token_head


class PendingStep(NamedTuple):
    """A launched step's device outputs, not yet waited for."""

    num_seqs: int
    sampled: SamplerOutput  # device arrays, rows padded to the bucket
    prompt: PromptLogprobs  # device arrays
    any_logprobs: bool
    want_prompt_logprobs: bool


class ModelRunner:
    """Owns the device state (parameters, KV cache) and the compiled step for every bucket."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, dtype, *, enforce_eager: bool = False,
                 kv_cache_dtype=None, compile_sizes: tuple[int, ...] | None = None,
                 executable_cache_dir: str | None = None, cache_key: dict | None = None,
                 placement: Placement | None = None, attention_backend: str = "ref",
                 device=None, target=None, allocate: bool = True):
        """`device`: the one device without a `placement` (default: the first). `target`: a
        compile target (engine/targets.py) whose compile-only devices these are; with
        `allocate=False` nothing is placed on a device (plan and compile only)."""
        self.cfg = model_config
        # Pipeline parallelism: stages on their own devices (set up in `attach`).
        self.placement = placement
        self.pipeline: Pipeline | None = None
        self.pp = placement.parallel.pipe if placement is not None else 1
        # NOTE: the mesh the step runs on (None: one device). Tracing happens under it, so that
        # attention splits over its model axis (sharding/attention.py).
        self.mesh = placement.mesh if placement is not None else None
        self.device = self.mesh.devices.flat[0] if self.mesh is not None else (
            device or jax.devices()[0])
        self.target = target
        self.page_size = cache_config.block_size
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_model_len = scheduler_config.max_model_len
        self.pages_per_seq = -(-self.max_model_len // self.page_size)
        self.dtype = dtype
        self.kv_dtype = kv_dtype = kv_cache_dtype or dtype
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        min_bucket = 1 if self.device.platform == "cpu" else 16
        self.buckets = token_buckets(scheduler_config.max_num_batched_tokens, min_bucket,
                                     compile_sizes)
        self.enforce_eager = enforce_eager
        # The model's structure and its parameters as shapes with shardings: the step is
        # planned and compiled from these, before (or without) any weight on a device.
        self.graphdef, state = nnx.split(abstract_model(model_config, dtype, attention_backend))
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
            placement.shardings(state) if placement is not None
            else jax.tree.map(lambda _: SingleDeviceSharding(self.device), state))
        self._jit_forward = jax.jit(self._forward, donate_argnums=(1,))
        self._jit_sample = jax.jit(sample)
        self._forward_exe: dict[int, object] = {}  # token bucket -> executable
        self._sample_exe: dict[int, object] = {}  # row bucket -> executable
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                        thread_name_prefix="jaxserve-compile")
        self._loads: dict[str, Future] = {}  # executable name -> its load from the cache
        # What the compiled step depends on besides its shapes, jaxserve's source and the
        # devices: the key of the executable cache, and what every node of a multi-host group
        # must agree on.
        self.step_key = {
            **(cache_key or {}), "model": repr(model_config), "dtype": jnp.dtype(dtype).name,
            "kv_dtype": jnp.dtype(kv_dtype).name, "page_size": self.page_size,
            "mesh": dict(self.mesh.shape) if self.mesh is not None else None,
        }
        self.executable_cache = None
        # NOTE: pipeline stages are several executables per bucket; they are not stored.
        if executable_cache_dir and executable_cache.enabled() and self.pp == 1:
            self.executable_cache = executable_cache.ExecutableCache(
                executable_cache_dir, self.step_key, self._devices())
        self.plan = self._plan_memory(cache_config)
        self.num_pages = self.plan.num_pages
        self.step_key["num_pages"] = self.num_pages
        self.num_steps = 0
        self.num_loaded = 0  # executables loaded from the executable cache at start-up
        self.lockstep = None
        self._kv_future = None
        if allocate:
            # NOTE: zeroing a multi-GiB cache takes seconds on CPU; it runs on a background
            # thread (XLA releases the GIL) while the weights load, and `attach` waits for it.
            self._kv_future = self._pool.submit(self._init_kv_cache)
            # Multi-host: node 0 sends each step to the other nodes, which run it too (None in
            # one process; see engine/distributed.py).
            self.lockstep = distributed.connect(self)

    def _devices(self) -> list:
        return list(self.mesh.devices.flat) if self.mesh is not None else [self.device]

    # ---- memory ------------------------------------------------------------------------------
    def _plan_memory(self, cache: CacheConfig) -> memory_plan.MemoryPlan:
        """Size the KV cache from the per-device memory plan (engine/memory_plan.py)."""
        capacity = memory_plan.device_capacity(self.device, self.target)
        kv_per_page = memory_plan.bytes_per_device(self._abstract_cache(1))
        plan = functools.partial(
            memory_plan.plan_memory,
            device=f"{self.target.name}: {self.target.description}" if self.target else
            f"{self.device.platform} {self.device.device_kind}",
            capacity=capacity, utilization=cache.gpu_memory_utilization,
            weights=memory_plan.bytes_per_device(self.abstract_state), kv_per_page=kv_per_page,
            page_size=self.page_size, pages_per_seq=self.pages_per_seq,
            max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
            cpu=self.device.platform == "cpu",
            num_pages_override=cache.num_gpu_blocks_override,
            kv_cache_memory_bytes=cache.kv_cache_memory_bytes)
        if cache.num_gpu_blocks_override or cache.kv_cache_memory_bytes:
            return plan(step=None)
        plan(step=None)  # the weights and one sequence's KV fit, before compiling anything
        # The profile's second cache is a tenth of the usable memory larger (a copy the
        # compiler makes only of large arrays shows), at least two sequences' pages.
        more = max(2 * (self.pages_per_seq + 1),
                   int(0.1 * capacity * cache.gpu_memory_utilization) // kv_per_page)
        planned = plan(step=self._profile_step(more))
        return self._same_pages_as_before(planned)

    def _same_pages_as_before(self, planned: memory_plan.MemoryPlan) -> memory_plan.MemoryPlan:
        """The page count the stored executables were compiled for (by an earlier start, or by
        `jaxserve compile --target` elsewhere), when it is at most the plan's and the pages
        left unused take at most 2% of the device's usable memory: a device that reports a few
        MiB more than last time, or than the target's table, loads them instead of compiling
        every bucket again for a few more pages."""
        cache = self.executable_cache
        if cache is None:
            return planned
        key = (self._shapes(self._abstract_cache(1)), planned.utilization)
        stored = cache.load_note("pages", key)
        slack = 0.02 * planned.capacity * planned.utilization
        if isinstance(stored, int) and stored <= planned.num_pages and \
                (planned.num_pages - stored) * planned.kv_per_page <= slack:
            if stored != planned.num_pages:
                logger.info("KV cache: %d pages, as the stored executables were compiled for "
                            "(the plan allows %d)", stored, planned.num_pages)
            return dataclasses.replace(planned, num_pages=stored)
        cache.store_note("pages", key, planned.num_pages)
        return planned

    def _profile_step(self, more: int) -> memory_plan.StepMemory:
        """The step's temporaries at the largest bucket, compiled against a small cache (the
        cache is donated, so its size does not change them); remembered in the executable
        cache. `more`: how many pages larger the second cache is. Under pipeline parallelism
        every stage and the head are measured, each on its own devices, and the most any device
        needs counts (not remembered: stages are not stored)."""
        if self.pp > 1:
            return self._profile_pipeline(more)
        T = self.buckets[-1]
        rows = self.rows_for(T)
        small = self._abstract_cache(self.pages_per_seq + 1)
        shapes = self._shapes(small, self._abstract_input(T), self._abstract_sampling(rows))
        cache = self.executable_cache
        if cache is not None and (known := cache.load_note("profile", shapes)) is not None:
            return memory_plan.StepMemory(**known)
        start = time.perf_counter()
        # Twice, against caches of two sizes: what grows with the cache (a copy the compiler
        # could not avoid) is measured per page, not assumed away.
        with self._on_mesh():
            lowered = [self._jit_forward.lower(self.abstract_state, cache_, self._abstract_input(T))
                       for cache_ in (small, self._abstract_cache(self.pages_per_seq + 1 + more))]
        sampler = cache.load(f"sample-{rows}", self._shapes_of("sample", rows)) if cache \
            else None
        # NOTE: the sampler does not depend on the cache: it is kept (and stored), so it is
        # compiled as `compile_all` compiles what it stores.
        with executable_cache.fresh_compiles() if cache else contextlib.nullcontext():
            jobs = lowered + ([] if sampler is not None else [self._lower(False, rows)])
            futures = [self._pool.submit(x.compile) for x in jobs]
            try:
                forward, forward_more, *compiled = (f.result() for f in futures)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                raise memory_plan.OutOfMemoryPlan(
                    f"the step at {T} tokens does not fit beside the weights: {e}; try a "
                    "smaller --max-num-batched-tokens, or more devices (-tp)") from None
        if compiled:
            sampler = compiled[0]
            if cache is not None:
                cache.store(f"sample-{rows}", self._shapes_of("sample", rows), sampler)
        self._sample_exe[rows] = sampler
        step = memory_plan.StepMemory.measure([forward.memory_analysis()],
                                              [forward_more.memory_analysis()],
                                              sampler.memory_analysis(), more)
        logger.info("profiled the step at %d tokens in %.1f s: %.1f MiB of activations, %.1f "
                    "MiB of logits and sampler buffers, %d bytes per KV page of temporaries per "
                    "device", T, time.perf_counter() - start, step.activations / 2**20,
                    step.sampler / 2**20, step.per_page)
        if cache is not None:
            cache.store_note("profile", shapes, step.__dict__)
        return step

    def _profile_pipeline(self, more: int) -> memory_plan.StepMemory:
        """`_profile_step` for pipeline stages: the largest bucket's stages and head compiled
        against caches of two sizes, and its sampler."""
        T, pages = self.buckets[-1], self.pages_per_seq + 1
        pipeline = Pipeline(self.graphdef, self.abstract_state, self.placement, self._head,
                            num_micro_batches=self.pp)
        small, larger = ([x.compile().memory_analysis()
                          for x in pipeline.lower_all(self._abstract_cache(n),
                                                      self._empty_input(T), self.dtype)]
                         for n in (pages, pages + more))
        sampler = self._lower(False, self.rows_for(T)).compile().memory_analysis()
        step = memory_plan.StepMemory.measure(small, larger, sampler, more)
        logger.info("profiled %d pipeline stages at %d tokens: %.1f MiB of activations, %d "
                    "bytes per KV page of temporaries per device", self.pp, T,
                    step.activations / 2**20, step.per_page)
        return step

    def _abstract_cache(self, num_pages: int):
        """The KV cache of `num_pages` pages as shapes with shardings."""
        return self._cache(num_pages, abstract=True)

    def _init_kv_cache(self):
        return jax.block_until_ready(self._cache())

    def _cache(self, num_pages: int | None = None, abstract: bool = False):
        """The zeroed KV cache: on one device, on the mesh, or one per pipeline stage (of its
        layers, on its devices)."""
        if self.mesh is None:
            return self._new_cache(self.cfg.num_layers, None, num_pages, abstract)
        if self.pp > 1:
            return [self._new_cache(end - start, self.placement.stage_mesh(s), num_pages, abstract)
                    for s, (start, end) in enumerate(self.placement.stages)]
        return self._new_cache(self.cfg.num_layers, self.mesh, num_pages, abstract)

    def _new_cache(self, num_layers: int, mesh: Mesh | None = None,
                   num_pages: int | None = None, abstract: bool = False):
        """A zeroed cache of `num_layers` layers (`abstract`: its shapes and shardings only);
        on a mesh each device zeroes only its own KV heads."""
        cfg = self.cfg
        num_pages = num_pages or self.num_pages

        def init():
            return init_kv_cache(num_pages, self.page_size, cfg.num_kv_heads, cfg.head_dim,
                                 self.kv_dtype, num_layers=num_layers)

        shapes = jax.eval_shape(init)
        if mesh is None:
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(self.device), shapes)
        else:
            spec = kv_cache_spec(shapes, stacked=True)
            shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), spec,
                                     is_leaf=lambda x: isinstance(x, P))
        if abstract:
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                shapes, shardings)
        return jax.jit(init, out_shardings=shardings)()

    def _on_mesh(self):
        """The context every trace of the step runs in: the mesh, when there is one; for one
        device of a compile target, a mesh of that one device, so that the attention kernel
        is built for the target's platform (`kernels_pallas.target_platform`)."""
        if self.mesh is not None:
            return jax.set_mesh(self.mesh)
        if self.device.platform != jax.default_backend():
            return jax.set_mesh(Mesh(np.array([self.device]).reshape(1, 1, 1), AXES))
        return contextlib.nullcontext()

    def prefetch_executables(self) -> None:
        """Start loading cached executables on background threads (while the weights load)."""
        if self.executable_cache and not self.enforce_eager:
            for _, name, size in self._executables():
                if size not in self._sample_exe or not name.startswith("sample"):
                    self._loads[name] = self._pool.submit(self.executable_cache.load, name,
                                                          self._shapes_of(name, size))

    def attach(self, model: nnx.Module) -> None:
        """Take the model's parameters and allocate the KV cache."""
        self.graphdef, self.state = nnx.split(model)
        self.kv_cache = self._kv_future.result()
        if self.pp > 1:
            self.pipeline = Pipeline(self.graphdef, self.state, self.placement, self._head,
                                     num_micro_batches=self.pp)
        capacity = self.num_pages * self.page_size
        logger.info("KV cache: %d pages of %d tokens = %d tokens (%s); maximum concurrency at "
                    "max_model_len %d: %.2fx\n%s", self.num_pages, self.page_size, capacity,
                    jnp.dtype(self.kv_dtype).name, self.max_model_len,
                    capacity / self.max_model_len, self.plan.describe())

    # ---- compiled functions ----------------------------------------------------------------
    # NOTE: two executables per step: the forward for the token bucket, and the sampler for the
    # row bucket. The sampler is most of the compile time, and there are fewer row buckets.
    def _forward(self, state, kv_cache, inp: ForwardInput):
        model = nnx.merge(self.graphdef, state)
        kv_cache, h = model(inp.token_ids, inp.positions, kv_cache, inp.md)
        logits, prompt = self._head(model, h, inp)
        return kv_cache, logits, prompt

    def _head(self, model, h, inp: ForwardInput):
        """Final hidden states f[T, D] -> (logits f32[S, V] at each sequence's last token,
        prompt logprobs at every token when asked for)."""
        logits = model.compute_logits(h[inp.logits_indices])  # f32[S, V]
        if self.mesh is not None:  # the sampler takes whole rows
            logits = jax.lax.with_sharding_constraint(logits, P())
        T = inp.token_ids.shape[0]

        def prompt_lp():
            return PromptLogprobs(*compute_logprobs(model.compute_logits(h), inp.prompt_next_ids))

        def no_prompt_lp():
            return PromptLogprobs(jnp.zeros((T,), jnp.float32), jnp.zeros((T,), jnp.int32),
                                  jnp.zeros((T, MAX_LOGPROBS), jnp.int32),
                                  jnp.zeros((T, MAX_LOGPROBS), jnp.float32))

        prompt = jax.lax.cond(inp.want_prompt_logprobs, prompt_lp, no_prompt_lp)
        return logits, prompt

    def bucket_for(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"a step of {num_tokens} tokens exceeds max_num_batched_tokens "
                         f"{self.buckets[-1]}")

    def rows_for(self, bucket: int) -> int:
        return min(bucket, self.max_num_seqs)

    def _executables(self) -> list[tuple[dict, str, int]]:
        """(table, name, size) of every executable: one per token bucket, one per row bucket."""
        rows = sorted({self.rows_for(b) for b in self.buckets})
        return ([(self._forward_exe, f"forward-{b}", b) for b in self.buckets]
                + [(self._sample_exe, f"sample-{r}", r) for r in rows])

    def _shapes_of(self, name: str, size: int) -> tuple:
        """What an executable's inputs look like besides the parameters (its cache key)."""
        if name.startswith("forward"):
            return self._shapes(self._abstract_cache(self.num_pages), self._abstract_input(size))
        return self._shapes(self._abstract_sampling(size))

    @staticmethod
    def _shapes(*trees) -> tuple:
        return tuple((x.shape, jnp.dtype(x.dtype).name) for x in jax.tree.leaves(trees))

    def compile_all(self) -> float:
        """Compile every bucket ahead of time, with a progress bar (skipped with enforce_eager);
        returns the seconds it took.

        Executables stored by an earlier start with the same key are loaded instead (no tracing;
        see `prefetch_executables`); the rest are traced here and compiled on a thread per core
        (XLA releases the GIL), then stored for the next start. Each is compiled from shapes
        (the abstract parameters and cache), so compiling needs no weight on a device.
        """
        if self.enforce_eager:
            logger.info("--enforce-eager: buckets compile lazily on first use")
            self._pool.shutdown(wait=False)
            return 0.0
        if self.pipeline is not None:
            return self._warm_up_pipeline()
        if self.pp > 1:  # a compile target: nothing can run, every stage is lowered
            return self._compile_pipeline_stages()
        start = time.perf_counter()
        cache = self.executable_cache
        if cache and not self._loads:
            self.prefetch_executables()
        wanted = self._executables()
        jobs, loaded = [], 0
        for table, name, size in wanted:
            load = self._loads.pop(name, None)
            if load is not None and (exe := load.result()) is not None:
                table[size] = exe
                loaded += 1
            elif size not in table:
                jobs.append((table, name, size))
        # NOTE: what we store must be compiled afresh (see `executable_cache.fresh_compiles`).
        with executable_cache.fresh_compiles() if cache and jobs else contextlib.nullcontext():
            futures = [self._pool.submit(self._lower(name.startswith("forward"), size).compile)
                       for _, name, size in jobs]
            for (table, name, size), future in progress(list(zip(jobs, futures)),
                                                    desc="Compiling buckets", unit="executable"):
                table[size] = future.result()
                if cache:
                    cache.store(name, self._shapes_of(name, size), table[size])
        self._pool.shutdown(wait=False)
        self._check_plan()
        self.num_loaded = loaded
        seconds = time.perf_counter() - start
        logger.info("compiled %d token buckets %s and %d sampler row buckets %s in %.1f s "
                    "(%d of %d executables loaded from %s)", len(self.buckets), self.buckets,
                    len(wanted) - len(self.buckets), sorted(self._sample_exe), seconds,
                    loaded, len(wanted),
                    cache.folder if cache else "nowhere: the executable cache is off")
        return seconds

    def _check_plan(self) -> None:
        """The compiled buckets against the plan: none may need more temporaries with the whole
        cache than the profile (taken against small caches) foresaw."""
        if self.plan.step is None:
            return
        try:
            temp = max(self._forward_exe[T].memory_analysis().temp_size_in_bytes
                       for T in self.buckets)
        except Exception:  # noqa: BLE001 (a loaded executable may not report its memory)
            return
        planned = self.plan.step.activations + self.plan.cache_temporaries
        if temp > planned * 1.05 + (16 << 20):
            logger.warning("a compiled bucket needs %.1f MiB of temporaries per device, more "
                           "than the %.1f MiB the memory plan foresaw", temp / 2**20,
                           planned / 2**20)

    def _warm_up_pipeline(self) -> float:
        """Pipeline stages compile on first use: run every bucket once on an empty batch (no
        real token, nothing written), so that no request waits for a compile."""
        self._pool.shutdown(wait=False)
        start = time.perf_counter()
        for T in progress(self.buckets, desc="Compiling buckets (pipeline stages)",
                          unit="bucket"):
            self.kv_cache, logits, _ = self.pipeline.forward(self.kv_cache, self._empty_input(T))
            jax.block_until_ready(self._jit_sample(logits, self._empty_sampling(self.rows_for(T))))
        seconds = time.perf_counter() - start
        logger.info("compiled %d token buckets %s over %d pipeline stages in %.1f s",
                    len(self.buckets), self.buckets, self.pp, seconds)
        return seconds

    def _compile_pipeline_stages(self) -> float:
        """Pipeline stages for a compile target: every stage (per micro-batch size) and the
        head of every bucket, and the samplers, compiled from shapes (not stored: pipeline
        executables compile on first use where they run)."""
        start = time.perf_counter()
        pipeline = Pipeline(self.graphdef, self.abstract_state, self.placement, self._head,
                            num_micro_batches=self.pp)
        cache = self._abstract_cache(self.num_pages)
        lowered = [x for T in self.buckets
                   for x in pipeline.lower_all(cache, self._empty_input(T), self.dtype)]
        lowered += [self._lower(False, r) for r in sorted({self.rows_for(b) for b in self.buckets})
                    if r not in self._sample_exe]
        futures = [self._pool.submit(x.compile) for x in lowered]
        for future in progress(futures, desc="Compiling pipeline stages", unit="executable"):
            future.result()
        self._pool.shutdown(wait=False)
        self.num_compiled_stages = len(lowered)
        seconds = time.perf_counter() - start
        logger.info("compiled %d executables (%d pipeline stages and the head per token bucket "
                    "%s, samplers) in %.1f s", len(lowered), self.pp, self.buckets, seconds)
        return seconds

    def _replicated(self):
        return NamedSharding(self.mesh, P()) if self.mesh is not None else \
            SingleDeviceSharding(self.device)

    def _abstract(self, tree):
        """Host inputs as shapes placed (replicated) on the step's devices."""
        sharding = self._replicated()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                           sharding=sharding), tree)

    def _abstract_input(self, T: int):
        return self._abstract(self._empty_input(T))

    def _abstract_sampling(self, rows: int):
        return self._abstract(self._empty_sampling(rows))

    def _lower(self, forward: bool, size: int):
        with self._on_mesh():
            if forward:
                return self._jit_forward.lower(self.abstract_state,
                                               self._abstract_cache(self.num_pages),
                                               self._abstract_input(size))
            logits = jax.ShapeDtypeStruct((size, self.cfg.vocab_size), jnp.float32,
                                          sharding=self._replicated())
            return self._jit_sample.lower(logits, self._abstract_sampling(size))

    @property
    def num_compiled(self) -> int:
        """Executables compiled so far; constant after start-up unless enforce_eager."""
        return (len(self._forward_exe) + len(self._sample_exe) + self._jit_forward._cache_size()
                + self._jit_sample._cache_size())

    # ---- host side ----------------------------------------------------------------------
    def _empty_sampling(self, rows: int) -> SamplingMetadata:
        """Sampling metadata of `rows` rows and no sequence (compiling, warm-up, templates)."""
        return build_sampling_metadata([], rows, self.eos_token_ids, self.max_model_len,
                                       self.cfg.vocab_size)

    def _empty_input(self, T: int) -> ForwardInput:
        S = self.rows_for(T)
        md = AttentionMetadata(np.zeros(S, np.int32), np.zeros(S * self.pages_per_seq, np.int32),
                               np.zeros(S + 1, np.int32), np.zeros(3, np.int32))
        return ForwardInput(np.zeros(T, np.int32), np.zeros(T, np.int32), md,
                            np.zeros(S, np.int32), np.zeros(T, np.int32), np.zeros((), np.bool_))

    def prepare(self, out: SchedulerOutput) -> tuple[ForwardInput, SamplingMetadata, int]:
        """Lay the scheduled sequences out as one padded token stream."""
        T = self.bucket_for(out.total_tokens)
        S = self.rows_for(T)
        num_seqs = len(out.seqs)
        assert num_seqs <= S, (num_seqs, S)
        P = self.pages_per_seq
        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        prompt_next = np.zeros(T, np.int32)
        kv_lens = np.zeros(S, np.int32)
        page_table = np.zeros((S, P), np.int32)
        cu = np.zeros(S + 1, np.int32)
        want_prompt_lp = False
        offset = 0
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            token_ids[offset:offset + n] = seq.token_ids[start:end]
            positions[offset:offset + n] = np.arange(start, end)
            kv_lens[i] = end
            page_table[i, :len(seq.block_table)] = seq.block_table
            if seq.sampling_params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                want_prompt_lp = True
                nxt = seq.token_ids[start + 1:min(end + 1, seq.num_prompt_tokens)]
                prompt_next[offset:offset + len(nxt)] = nxt
            offset += n
            cu[i + 1] = offset
        cu[num_seqs + 1:] = offset
        distribution = np.array([out.num_decodes, out.num_decodes, num_seqs], np.int32)
        md = AttentionMetadata(kv_lens, page_table.reshape(-1), cu, distribution)
        logits_indices = np.maximum(cu[1:] - 1, 0).astype(np.int32)
        sampling = build_sampling_metadata(out.seqs, S, self.eos_token_ids, self.max_model_len,
                                           self.cfg.vocab_size)
        inp = ForwardInput(token_ids, positions, md, logits_indices, prompt_next,
                           np.asarray(want_prompt_lp))
        return inp, sampling, T

    def launch(self, out: SchedulerOutput) -> PendingStep:
        """Dispatch one scheduled step to the devices and return without waiting for it (JAX
        runs it asynchronously), so that several runners (data-parallel replicas) can step at
        once; `finish` collects the result."""
        inp, sampling, T = self.prepare(out)
        if self.lockstep is not None:  # multi-host: the other nodes run this step too
            self.lockstep.send((inp, sampling))
        sampled, prompt = self._dispatch(inp, sampling)
        return PendingStep(len(out.seqs), sampled, prompt, bool(sampling.any_logprobs),
                           bool(inp.want_prompt_logprobs))

    def _dispatch(self, inp: ForwardInput, sampling: SamplingMetadata
                  ) -> tuple[SamplerOutput, PromptLogprobs]:
        """Run the compiled forward and sampler of the step's bucket, without waiting."""
        T = inp.token_ids.shape[0]
        if self.pipeline is not None:
            self.kv_cache, logits, prompt = self.pipeline.forward(self.kv_cache, inp)
            sampled = self._jit_sample(logits, sampling)
        else:
            forward = self._forward_exe.get(T, self._jit_forward)
            with self._on_mesh():  # traces only under --enforce-eager
                self.kv_cache, logits, prompt = forward(self.state, self.kv_cache, inp)
                sampled = self._sample_exe.get(self.rows_for(T), self._jit_sample)(logits,
                                                                                   sampling)
        self.num_steps += 1
        return sampled, prompt

    def follow(self) -> None:
        """Multi-host, nodes other than 0: run each step node 0 sends until it stops."""
        for inp, sampling in self.lockstep:
            self._dispatch(inp, sampling)

    def finish(self, pending: PendingStep) -> StepResult:
        """Wait for a launched step; the sampled tokens (and logprobs) on the host."""
        n, sampled = pending.num_seqs, pending.sampled
        if pending.any_logprobs:
            sampled = SamplerOutput(*(x[:n] for x in jax.device_get(sampled)))
        else:  # the common case: only the token ids cross to the host
            ids = np.asarray(sampled.token_ids)[:n]
            sampled = SamplerOutput(ids, np.zeros(n, np.float32), np.zeros(n, np.int32),
                                    np.zeros((n, MAX_LOGPROBS), np.int32),
                                    np.zeros((n, MAX_LOGPROBS), np.float32))
        prompt_np = (PromptLogprobs(*jax.device_get(pending.prompt))
                     if pending.want_prompt_logprobs else None)
        return StepResult(sampled, prompt_np)

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one scheduled step; returns the sampled tokens (and logprobs) on the host."""
        return self.finish(self.launch(out))
