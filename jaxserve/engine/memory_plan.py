"""The per-device memory plan: what the weights, the compiled step and the sampler take, and how
many KV pages fit in what `--gpu-memory-utilization` leaves.

The plan is made from shapes alone (the abstract parameters with their shardings, an abstract KV
cache, and the memory analysis of the step compiled for the largest bucket), so it is the same
before the weights load, on a machine that has the devices, and for a compile target it does
not have (`jaxserve compile --target`). Like vLLM's profiling run, the step's temporaries are
measured, not guessed: the largest token bucket is compiled against a small cache first.

Per device, on TPU, GPU and CPU alike:

    capacity * utilization >= weights + activations + sampler + KV pages * bytes per page

Capacity is the device's memory (from the runtime, or the target's table); on CPU it is the
host's RAM, and the KV cache is further capped at 4 GiB (vLLM-CPU's default KV space) and at
what `--max-num-seqs` sequences of `--max-model-len` tokens can use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import jax
import numpy as np

logger = logging.getLogger(__name__)

GiB = 1 << 30
CPU_KV_CAP = 4 * GiB  # vLLM-CPU's VLLM_CPU_KVCACHE_SPACE default


class OutOfMemoryPlan(ValueError):
    """The model does not fit the devices; the message says what would."""


def reserve_gpu_memory(utilization: float) -> None:
    """On NVIDIA GPUs XLA's allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION of the device (0.75
    unless set) when JAX starts: make it `--gpu-memory-utilization`, as vLLM reserves memory,
    unless the user set it or JAX has started already. Harmless elsewhere."""
    from jax._src import xla_bridge

    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ and \
            not xla_bridge.backends_are_initialized():
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{utilization:.4f}"


def device_capacity(device, target=None) -> int:
    """Bytes of memory one device has: the target's table, the runtime's limit, or host RAM."""
    if target is not None:
        return target.memory_per_device
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        raise RuntimeError(f"{device} reports no memory limit; pass --kv-cache-memory-bytes or "
                           "--num-gpu-blocks-override")
    if device.platform in ("gpu", "cuda", "rocm"):
        # NOTE: XLA's GPU allocator is capped at XLA_PYTHON_CLIENT_MEM_FRACTION of the device
        # (0.75 unless set); the plan works on the whole device.
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        return int(limit / fraction)
    return int(limit)


def bytes_per_device(*trees) -> int:
    """The most bytes any one device holds of the arrays (or ShapeDtypeStructs with shardings)
    in `trees`; an array without a sharding counts whole on one device."""
    per: dict[object, int] = {}
    for leaf in jax.tree.leaves(trees):
        sharding = getattr(leaf, "sharding", None)
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            per[None] = per.get(None, 0) + int(np.prod(leaf.shape)) * itemsize
            continue
        nbytes = int(np.prod(sharding.shard_shape(leaf.shape))) * itemsize
        for d in sharding.device_set:
            per[d] = per.get(d, 0) + nbytes
    return max(per.values(), default=0)


@dataclass(frozen=True)
class StepMemory:
    """What the compiled step needs per device besides its arguments (from memory_analysis)."""

    activations: int  # the forward's temporaries, largest bucket, besides what grows with
    #                   the cache
    sampler: int  # logits out of the forward plus the sampler's temporaries and outputs
    per_page: int = 0  # temporaries that grow with the KV cache, per page (a copy of the
    #                    cache the compiler could not update in place shows here)

    @classmethod
    def measure(cls, small: list, larger: list, sampler, more_pages: int) -> StepMemory:
        """From the memory analyses of the step's executables (one, or a pipeline's stages and
        head, each on its own devices: the largest counts) compiled against a small cache and
        against one `more_pages` pages larger, and of the sampler."""
        temp = max(m.temp_size_in_bytes for m in small)
        grown = max(m.temp_size_in_bytes for m in larger) - temp
        # NOTE: the forward's outputs beyond the aliased (donated) cache are the logits and
        # prompt logprobs; they live until the sampler has run.
        out = max(m.output_size_in_bytes - m.alias_size_in_bytes for m in small)
        return cls(activations=int(temp), per_page=int(max(0, grown) // more_pages),
                   sampler=int(max(0, out) + sampler.temp_size_in_bytes
                               + sampler.output_size_in_bytes))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device (the device holding the most)."""

    device: str
    capacity: int
    utilization: float
    weights: int
    step: StepMemory | None  # None: not measured (sized by an explicit override)
    kv_per_page: int
    num_pages: int
    page_size: int
    sized_by: str  # what chose num_pages

    @property
    def kv(self) -> int:
        return self.num_pages * self.kv_per_page

    @property
    def cache_temporaries(self) -> int:
        return self.num_pages * self.step.per_page if self.step else 0

    @property
    def total(self) -> int:
        step = self.step.activations + self.step.sampler if self.step else 0
        return self.weights + step + self.kv + self.cache_temporaries

    def describe(self) -> str:
        def gib(x: int) -> str:
            return f"{x / GiB:8.2f} GiB"

        rows = [f"memory plan per device ({self.device}):",
                f"  capacity        {gib(self.capacity)}  x {self.utilization:.2f} utilization "
                f"= {gib(int(self.capacity * self.utilization)).strip()}",
                f"  weights         {gib(self.weights)}"]
        if self.step is not None:
            rows += [f"  activations     {gib(self.step.activations)}  (largest bucket)",
                     f"  logits/sampler  {gib(self.step.sampler)}"]
            if self.step.per_page:
                rows.append(f"  cache copies    {gib(self.cache_temporaries)}  (temporaries "
                            "that grow with the KV cache: the step does not update it in "
                            "place)")
        rows += [f"  KV cache        {gib(self.kv)}  ({self.num_pages} pages of "
                 f"{self.page_size} tokens = {self.num_pages * self.page_size} tokens; "
                 f"{self.sized_by})",
                 f"  total           {gib(self.total)}"]
        return "\n".join(rows)


def plan_memory(*, device: str, capacity: int, utilization: float, weights: int,
                step: StepMemory | None, kv_per_page: int, page_size: int, pages_per_seq: int,
                max_num_seqs: int, max_model_len: int, cpu: bool,
                num_pages_override: int | None = None,
                kv_cache_memory_bytes: int | None = None) -> MemoryPlan:
    """Choose the number of KV pages; raises `OutOfMemoryPlan` when not even one sequence of
    `max_model_len` tokens fits."""
    if not 0 < utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    step_bytes = step.activations + step.sampler if step else 0
    budget = int(capacity * utilization) - weights - step_bytes
    page_cost = kv_per_page + (step.per_page if step else 0)
    if num_pages_override:
        num_pages, sized_by = num_pages_override, "--num-gpu-blocks-override"
    elif kv_cache_memory_bytes:
        num_pages, sized_by = max(1, kv_cache_memory_bytes // kv_per_page), \
            "--kv-cache-memory-bytes"
    else:
        num_pages = max(0, budget) // page_cost
        sized_by = f"what --gpu-memory-utilization {utilization} leaves"
        if cpu:
            cap = min(CPU_KV_CAP // kv_per_page, max_num_seqs * pages_per_seq)
            if num_pages > cap:
                num_pages, sized_by = max(cap, pages_per_seq), \
                    "on CPU: at most 4 GiB, and no more than --max-num-seqs full sequences"
    plan = MemoryPlan(device, capacity, utilization, weights, step, kv_per_page, num_pages,
                      page_size, sized_by)
    # NOTE: a size the user chose is theirs (a longer request is refused when it arrives).
    if num_pages < pages_per_seq and not (num_pages_override or kv_cache_memory_bytes):
        raise OutOfMemoryPlan(_does_not_fit(plan, budget, pages_per_seq, max_model_len))
    if plan.total > capacity * utilization and not cpu:
        logger.warning("the KV cache you asked for takes the plan past %.0f%% of the device's "
                       "memory; expect out-of-memory errors\n%s", 100 * utilization,
                       plan.describe())
    return plan


def _does_not_fit(plan: MemoryPlan, budget: int, pages_per_seq: int, max_model_len: int) -> str:
    page_cost = plan.kv_per_page + (plan.step.per_page if plan.step else 0)
    need = pages_per_seq * page_cost
    usable = int(plan.capacity * plan.utilization)
    lines = [f"the model does not fit: {plan.describe()}"]
    if plan.weights >= usable:
        lines.append(f"the weights alone take {plan.weights / GiB:.2f} GiB per device, more than "
                     f"the {usable / GiB:.2f} GiB usable. What would fit:")
    else:
        lines.append(f"one sequence of --max-model-len {max_model_len} needs {need / GiB:.2f} "
                     f"GiB of KV cache per device, but only {max(budget, 0) / GiB:.2f} GiB is "
                     "left. What would fit:")
    fits_len = max(0, budget) // page_cost * plan.page_size
    if budget > 0 and fits_len >= plan.page_size:
        lines.append(f"- a shorter context: --max-model-len {fits_len} fits")
    lines.append("- more devices: a larger --tensor-parallel-size (or --pipeline-parallel-size) "
                 "splits the weights and the KV cache over them")
    if plan.weights < usable:
        lines.append("- a quantised KV cache: --kv-cache-dtype int8 or fp8 halves it "
                     "(bfloat16 models)")
    if plan.utilization < 0.95:
        lines.append(f"- a higher --gpu-memory-utilization (now {plan.utilization})")
    return "\n".join(lines)
