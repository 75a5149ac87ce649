"""`EngineArgs`: every engine option with vLLM's name and default, and the configs it derives."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import CacheConfig, ModelConfig, SchedulerConfig
from jaxserve.sampling_params import MAX_LOGPROBS

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16, "half": jnp.float16}
# --kv-cache-dtype: the float formats, and the quantised ones (values with a scale per token and
# head, computed as K/V are written; see kernels_pallas/quant.py).
KV_CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
                   "int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                   "fp8_e5m2": jnp.float8_e5m2}


@dataclass(frozen=True)
class EngineArgs:
    """Engine options, named as `vllm serve` names them (the CLI is generated from these fields)."""

    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    download_dir: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = False
    disable_log_stats: bool = False
    # Most top logprobs a request may ask for (the compiled sampler returns up to 20).
    max_logprobs: int = 20
    # Keys laid over the model's config.json (vLLM's --hf-overrides, --rope-theta, --rope-scaling).
    hf_overrides: dict[str, Any] | None = None
    # Default sampling parameters: "auto" reads the model's generation_config.json, "vllm" uses
    # vLLM's neutral defaults, a folder reads that folder's file; override_generation_config wins.
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    # Structured outputs (vLLM's --structured-outputs-config): backend auto|guidance|llguidance,
    # disable_any_whitespace, disable_additional_properties, disable_fallback (jaxserve never
    # falls back), reasoning_parser.
    structured_outputs_config: dict[str, Any] | None = None
    # Cache.
    block_size: int | None = None
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), or a key of KV_CACHE_DTYPES
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    # Scheduler.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    scheduling_policy: str = "fcfs"
    # None: the platform's kernel (tpu, gpu; on CPU the cpu kernel for float caches, else ref).
    attention_backend: str | None = None
    # Compilation.
    enforce_eager: bool = False
    compilation_cache_dir: str | None = None
    # Token-count buckets to compile (vLLM's cudagraph capture sizes); None: powers of two.
    compile_sizes: tuple[int, ...] | None = None
    # Parallelism: the device mesh (sharding/mesh.py).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # Multi-host (engine/distributed.py): this process is node `node_rank` of `nnodes`, joined by
    # jax.distributed; node 0 serves, and runs the coordinator at master_addr:master_port.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29501
    distributed_timeout_seconds: int | None = None  # how long nodes wait for each other (300)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not implemented; use "
                             f"auto or one of {sorted(KV_CACHE_DTYPES)}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"--max-logprobs must be in [0, {MAX_LOGPROBS}] (the compiled sampler "
                             f"returns at most {MAX_LOGPROBS}), got {self.max_logprobs}")
        if self.compile_sizes is not None and (
                not self.compile_sizes or any(int(s) < 1 for s in self.compile_sizes)):
            raise ValueError(f"compile sizes must be positive token counts, got "
                             f"{self.compile_sizes}")
        if self.generation_config not in ("auto", "vllm") and not os.path.isdir(
                self.generation_config):
            raise ValueError(f"--generation-config must be auto, vllm or a folder, got "
                             f"{self.generation_config!r}")
        _check_structured_outputs_config(self.structured_outputs_config or {})
        for flag, size in (("--tensor-parallel-size", self.tensor_parallel_size),
                           ("--pipeline-parallel-size", self.pipeline_parallel_size),
                           ("--data-parallel-size", self.data_parallel_size)):
            if size < 1:
                raise ValueError(f"{flag} must be >= 1, got {size}")
        self._check_multi_host()

    def _check_multi_host(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, --nnodes {self.nnodes}), got "
                             f"{self.node_rank}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port must be a TCP port, got {self.master_port}")
        if self.distributed_timeout_seconds is not None and self.distributed_timeout_seconds < 1:
            raise ValueError(f"--distributed-timeout-seconds must be >= 1, got "
                             f"{self.distributed_timeout_seconds}")
        if self.nnodes > 1 and (self.data_parallel_size > 1 or self.pipeline_parallel_size > 1):
            raise ValueError("--nnodes > 1 with data or pipeline parallelism is not implemented "
                             "yet; across nodes use --tensor-parallel-size (every node's devices)")

    def parallel_config(self):
        from jaxserve.sharding.mesh import ParallelConfig

        return ParallelConfig(data=self.data_parallel_size, pipe=self.pipeline_parallel_size,
                              model=self.tensor_parallel_size,
                              expert_parallel=self.enable_expert_parallel)

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)

    def resolve_max_model_len(self, model_config: ModelConfig) -> int:
        """`--max-model-len`, or the model's context; never beyond the model's."""
        max_model_len = self.max_model_len or model_config.max_position_embeddings
        if max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's "
                             f"max_position_embeddings {model_config.max_position_embeddings}")
        return max_model_len

    def resolve_dtype(self, model_config: ModelConfig, platform: str | None = None):
        """`auto`: float32 on CPU (XLA's bf16 dots are slow there), the checkpoint's dtype else.
        `platform`: the one compiled for (default: JAX's default backend)."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if (platform or jax.default_backend()) == "cpu":
            return jnp.float32
        return _DTYPES.get(model_config.checkpoint_dtype, jnp.bfloat16)

    def resolve_kv_cache_dtype(self, dtype):
        """`--kv-cache-dtype`: auto is the compute dtype."""
        if self.kv_cache_dtype == "auto":
            return dtype
        return KV_CACHE_DTYPES[self.kv_cache_dtype]

    def resolve_attention_backend(self, dtype, kv_dtype=None, platform: str | None = None) -> str:
        """`--attention-backend`, or the platform's kernel where it serves these dtypes."""
        from jaxserve.kernels_pallas import (BACKENDS, cpu, default_backend, is_quantized_dtype,
                                             reads_quantized, runs_interpreted)

        kv_dtype = jnp.dtype(kv_dtype or dtype)
        quantized = is_quantized_dtype(kv_dtype)
        if self.attention_backend is not None:
            if self.attention_backend not in BACKENDS:
                raise ValueError(f"--attention-backend must be one of {BACKENDS}, got "
                                 f"{self.attention_backend!r}")
            if quantized and not reads_quantized(self.attention_backend):
                raise ValueError(f"--attention-backend {self.attention_backend} does not read a "
                                 f"{kv_dtype.name} KV cache (--kv-cache-dtype); backends that do: "
                                 f"{[b for b in BACKENDS if reads_quantized(b)]}")
            if runs_interpreted(self.attention_backend, platform):
                logger.warning("--attention-backend %s on %s: the Pallas kernel runs in interpret "
                               "mode (for checking it, far slower than the platform's own)",
                               self.attention_backend, platform or jax.default_backend())
            return self.attention_backend
        backend = default_backend(platform)
        if backend == "cpu":
            if jnp.dtype(dtype) != jnp.float32 or kv_dtype.name not in ("float32", "bfloat16") \
                    or not cpu.available():
                return "ref"
            return "cpu"
        if quantized and not reads_quantized(backend):
            logger.warning("the %s attention kernel does not read a %s KV cache; attention runs "
                           "on the ref backend (slower)", backend, kv_dtype.name)
            return "ref"
        return backend

    def scheduler_config(self, max_model_len: int, platform: str | None = None) -> SchedulerConfig:
        on_cpu = (platform or jax.default_backend()) == "cpu"
        max_num_seqs = self.max_num_seqs or (32 if on_cpu else 256)
        default_tokens = 512 if on_cpu else 2048
        tokens = self.max_num_batched_tokens or max(default_tokens, max_num_seqs)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens is None:
            tokens = max(tokens, max_model_len)
        return SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=tokens, max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            max_num_partial_prefills=self.max_num_partial_prefills,
            max_long_partial_prefills=self.max_long_partial_prefills,
            policy=self.scheduling_policy)

    def cache_config(self, attention_backend: str = "ref") -> CacheConfig:
        from jaxserve.kernels_pallas import default_page_size

        return CacheConfig(
            block_size=self.block_size or default_page_size(attention_backend),
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            prefix_caching_hash_algo=self.prefix_caching_hash_algo)


_SO_BACKENDS = ("auto", "guidance", "llguidance")  # all llguidance in jaxserve


def _check_structured_outputs_config(cfg: dict[str, Any]) -> None:
    known = {"backend", "disable_fallback", "disable_any_whitespace",
             "disable_additional_properties", "reasoning_parser", "enable_in_reasoning"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"--structured-outputs-config: unknown keys {unknown}; known: "
                         f"{sorted(known)}")
    backend = cfg.get("backend", "auto")
    if backend not in _SO_BACKENDS:
        raise ValueError(f"--structured-outputs-config backend {backend!r} is not available: "
                         f"jaxserve's structured outputs run on llguidance; use one of "
                         f"{_SO_BACKENDS}")
    if cfg.get("enable_in_reasoning"):
        raise ValueError("--structured-outputs-config enable_in_reasoning=true is not "
                         "implemented yet")

