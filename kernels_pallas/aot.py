"""Deviceless compilation of the attention kernels: the cases, and compiling one.

A `KernelCase` is one shape of the attention ABI (cache dtype, head dim, GQA ratio, KV heads per
shard, window, soft cap, batch kind, page size, stacked cache) on one compile target
(`jaxserve.engine.targets`: `v5e-1`, `v6e-1`, `v5p-8`, `h100`...). `compile_case` builds it the
way the engine's step does: through `sharding.attention.attention` under `jax.set_mesh` on the
target's compile-only devices (so the choice of interpret mode is the engine's own), lowered
from `ShapeDtypeStruct`s with shardings and compiled by the real compiler (Mosaic for TPU,
Triton and ptxas for NVIDIA). Compiling checks that the kernel builds, not its speed or numbers;
shapes are tiny. `aot_runner` compiles lists of cases in child processes.

`covering_cases` picks cases so that every pair of values of two dimensions appears in some
case (all-pairs, greedy); `sweep_cases` is the cross product of the dimensions that shape the
kernel's layout (dtype x head dim x GQA ratio x page size), the others rotating.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

CACHE_DTYPES = ("bfloat16", "float32", "int8", "float8_e4m3fn", "float8_e5m2")
HEAD_DIMS = (64, 128, 256)
GROUPS = (1, 2, 3, 4, 8)  # query heads per KV head
KV_HEADS = (1, 2, 4)  # per shard
BATCHES = ("decode", "prefill", "mixed")
PAGE_SIZES = {"tpu": (16, 32, 64, 128), "gpu": (16, 32, 64)}
# (tokens, sequences) per batch kind; pages per sequence are fixed.
_BATCH_SHAPES = {"decode": (16, 16), "prefill": (64, 4), "mixed": (32, 8)}
_PAGES_PER_SEQ = 4
_NUM_LAYERS = 2  # of a stacked cache
# What a backend's kernel lowers to (a Mosaic or a Triton custom call).
_KERNEL_CALL = {"tpu": "tpu_custom_call", "gpu": "xla.gpu.triton"}


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One attention kernel shape on one compile target."""

    target: str  # a `targets` name: v5e-1, v6e-4, v5p-8, h100, h100x2...
    cache_dtype: str = "bfloat16"
    head_dim: int = 128
    group: int = 1  # G = N / K
    kv_heads: int = 1  # K per shard
    tp: int = 1  # shards of the model axis (the target must have this many devices)
    window: int | None = None
    soft_cap: float | None = None
    batch: str = "mixed"
    page_size: int = 32
    stacked: bool = False  # f[L, pages, ...] with a traced layer, as the engine passes it
    shape: tuple[int, int] | None = None  # (tokens, sequences), else the batch kind's
    input_dtype: str | None = None  # of q, k, v; default `q_dtype`

    @property
    def tokens_and_seqs(self) -> tuple[int, int]:
        return tuple(self.shape) if self.shape else _BATCH_SHAPES[self.batch]

    @property
    def name(self) -> str:
        parts = [self.target, self.cache_dtype, f"h{self.head_dim}", f"g{self.group}",
                 f"k{self.kv_heads}", f"p{self.page_size}", self.batch]
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if self.window:
            parts.append(f"w{self.window}")
        if self.soft_cap:
            parts.append(f"cap{self.soft_cap:g}")
        if self.stacked:
            parts.append("stacked")
        if self.input_dtype:
            parts.append(f"q{self.input_dtype}")
        if self.shape:
            parts.append("t{}s{}".format(*self.shape))
        return "-".join(parts)

    @property
    def q_dtype(self) -> str:
        """float32 models keep float32 activations; everything else serves in bfloat16."""
        if self.input_dtype:
            return self.input_dtype
        return "float32" if self.cache_dtype == "float32" else "bfloat16"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> KernelCase:
        return cls(**{**d, "shape": tuple(d["shape"]) if d.get("shape") else None})


def platform_of(target: str) -> str:
    """'tpu' or 'gpu': the attention backend a target uses."""
    from jaxserve.engine.targets import get_target

    return get_target(target).attention_backend


def abstract_args(case: KernelCase, mesh):
    """The ABI's positional arguments as `ShapeDtypeStruct`s sharded on `mesh` (heads and the
    cache over the model axis, metadata replicated)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxserve.kernels_pallas.quant import QuantizedKVCache, is_quantized_dtype
    from jaxserve.sharding.mesh import MODEL
    from jaxserve.sharding.rules import kv_cache_spec

    T, S = case.tokens_and_seqs
    K = case.kv_heads * case.tp
    N, H = K * case.group, case.head_dim
    shape = (S * _PAGES_PER_SEQ + 1, case.page_size, 2 * K, H)
    if case.stacked:
        shape = (_NUM_LAYERS, *shape)

    def struct(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))

    if is_quantized_dtype(case.cache_dtype):
        spec = kv_cache_spec(QuantizedKVCache(None, None), stacked=case.stacked)
        cache = QuantizedKVCache(struct(shape, case.cache_dtype, spec.data),
                                 struct(shape[:-1], jnp.float32, spec.scale))
    else:
        cache = struct(shape, case.cache_dtype, kv_cache_spec(None, stacked=case.stacked))
    heads = P(None, MODEL, None)
    i32 = jnp.int32
    return (struct((T, N, H), case.q_dtype, heads), struct((T, K, H), case.q_dtype, heads),
            struct((T, K, H), case.q_dtype, heads), cache, struct((S,), i32, P()),
            struct((S * _PAGES_PER_SEQ,), i32, P()), struct((S + 1,), i32, P()),
            struct((3,), i32, P()))


def compile_case(case: KernelCase) -> float:
    """Lower and compile the case for its target; returns the compile's seconds (lowering and
    compiling). Raises what the compiler raises (or aborts the process, as Mosaic may)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from jaxserve.engine import targets
    from jaxserve.sharding.attention import attention
    from jaxserve.sharding.mesh import MODEL

    devices = targets.devices(case.target)
    if case.tp > len(devices):
        raise ValueError(f"{case.name}: tp {case.tp} needs {case.tp} devices, the target has "
                         f"{len(devices)}")
    mesh = Mesh(np.array(devices[:case.tp]), (MODEL,))
    backend = targets.get_target(case.target).attention_backend

    def step(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution, layer):
        return attention(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution,
                         sm_scale=case.head_dim ** -0.5, sliding_window=case.window,
                         soft_cap=case.soft_cap, backend=backend,
                         layer=layer if case.stacked else None)

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        args = abstract_args(case, mesh)
        layer = jax.ShapeDtypeStruct((), jnp.int32)
        lowered = jax.jit(step, donate_argnums=3).lower(*args, layer)
        # NOTE: an interpreted kernel would lower to a host callback, not the kernel's call.
        if _KERNEL_CALL[backend] not in lowered.as_text():
            raise RuntimeError(f"{case.name}: the {backend} kernel did not lower to "
                               f"{_KERNEL_CALL[backend]} (interpret mode?)")
        lowered.compile()
    return time.perf_counter() - start


def all_pairs(dims: dict[str, tuple]) -> list[dict]:
    """Greedy all-pairs: assignments of `dims` such that every two values of two different
    dimensions appear together at least once (deterministic)."""
    names = list(dims)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
                 for x in dims[a] for y in dims[b]}
    rows = []
    while uncovered:
        row: dict = {}
        for name in names:
            def gain(value):
                return sum(((other, row[other]), (name, value)) in uncovered
                           or ((name, value), (other, row[other])) in uncovered
                           for other in row) + sum(
                    1 for pair in uncovered if (name, value) in pair) * 1e-3
            row[name] = max(dims[name], key=gain)
        covered = {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}
        uncovered -= covered
        rows.append(row)
    return rows


def dimensions(backend: str) -> dict[str, tuple]:
    """The values each case dimension takes for a backend (`tpu` or `gpu`)."""
    return {"cache_dtype": CACHE_DTYPES, "head_dim": HEAD_DIMS, "group": GROUPS,
            "kv_heads": KV_HEADS, "page_size": PAGE_SIZES[backend], "batch": BATCHES,
            "window": (None, 16), "soft_cap": (None, 30.0), "stacked": (False, True)}


def covering_cases(target: str) -> list[KernelCase]:
    """All-pairs over every dimension for one target."""
    return [KernelCase(target, **row) for row in all_pairs(dimensions(platform_of(target)))]


def each_value_cases(target: str) -> list[KernelCase]:
    """Every value of every dimension at least once (the i-th case takes each dimension's i-th
    value, cycling)."""
    dims = dimensions(platform_of(target))
    n = max(len(values) for values in dims.values())
    return [KernelCase(target, **{k: v[i % len(v)] for k, v in dims.items()}) for i in range(n)]


def tp_cases(target: str, tp: int) -> list[KernelCase]:
    """One KV head per shard over `tp` shards (the engine's `-tp` with K == tp), each dtype."""
    return [KernelCase(target, cache_dtype=d, group=4, kv_heads=1, tp=tp, stacked=True,
                       page_size=PAGE_SIZES[platform_of(target)][0 if i % 2 else -1],
                       window=16 if i % 2 else None)
            for i, d in enumerate(CACHE_DTYPES)]


def sweep_cases(target: str) -> list[KernelCase]:
    """dtype x head dim x GQA ratio x page size, with KV heads, batch kind, window, soft cap
    and stacking rotating through their values."""
    page_sizes = PAGE_SIZES[platform_of(target)]
    out = []
    for i, (d, h, g, p) in enumerate(itertools.product(CACHE_DTYPES, HEAD_DIMS, GROUPS,
                                                       page_sizes)):
        out.append(KernelCase(target, cache_dtype=d, head_dim=h, group=g, page_size=p,
                              kv_heads=KV_HEADS[i % 3], batch=BATCHES[i // 3 % 3],
                              window=16 if i % 2 else None, soft_cap=30.0 if i // 2 % 2 else None,
                              stacked=bool(i // 4 % 2)))
    return out
