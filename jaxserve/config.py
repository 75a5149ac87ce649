"""Frozen configuration dataclasses. `ModelConfig.from_hf()` is the only reader of raw HF fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding frequency scaling, normalised from HF's `rope_scaling`/`rope_parameters`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about an architecture, with one letter per axis.

    D model width, F MLP width, N query heads, K KV heads, H head dim, V vocabulary, L layers,
    E experts.
    """

    architecture: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    # Per layer: the sliding window in tokens, or 0 for full attention.
    sliding_windows: tuple[int, ...] = ()
    # Gemma-2 specifics.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Sparse mixture of experts (Mixtral, Qwen3-MoE); dense models have no experts.
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # experts each token is routed to (top k)
    moe_intermediate_size: int = 0  # F of one expert
    norm_topk_prob: bool = True  # rescale the top k routing weights to sum to 1
    # Per layer: True where the feed-forward is the sparse MoE block, False for the dense MLP.
    moe_layers: tuple[bool, ...] = ()
    # How the model is laid out on a mesh (sharding/rules.py `TPLayout`): the vocabulary padded
    # to a multiple of the tensor-parallel size (0: not padded), experts split whole over the
    # model axis (expert parallelism) rather than each expert's hidden size.
    padded_vocab_size: int = 0
    expert_parallel: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The checkpoint's own dtype name ("float32", "bfloat16", ...), used by `--dtype auto`.
    checkpoint_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads, got "
                             f"{self.num_heads=}, {self.num_kv_heads=}")
        if self.hidden_act not in set(_ACTIVATIONS.values()):
            raise ValueError(f"unsupported activation {self.hidden_act=}")
        if self.rope_scaling.rope_type not in _ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {self.rope_scaling.rope_type=}; "
                             f"supported: {_ROPE_TYPES}")
        if len(self.sliding_windows) != self.num_layers:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_layers)
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers needs one entry per layer, got {len(self.moe_layers)=}, "
                             f"{self.num_layers=}")
        if any(self.moe_layers):
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok must be in [1, num_experts], got "
                                 f"{self.num_experts_per_tok=}, {self.num_experts=}")
            if self.moe_intermediate_size < 1:
                raise ValueError(f"MoE layers need moe_intermediate_size >= 1, got "
                                 f"{self.moe_intermediate_size=}")

    @property
    def sm_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return self.head_dim ** -0.5

    @property
    def has_sliding_window(self) -> bool:
        return any(self.sliding_windows)

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Normalise an HF config (a `PretrainedConfig` or its dict) for every supported model."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        archs = d.get("architectures") or []
        if not archs:
            raise ValueError("config.json names no `architectures`; cannot pick a model class")
        arch = archs[0]
        model_type = d.get("model_type", "")
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim") or hidden // num_heads
        num_layers = d["num_hidden_layers"]

        rope = d.get("rope_parameters") or {}
        rope_scaling = d.get("rope_scaling") or {}
        if "rope_theta" in d and d["rope_theta"] is not None:
            rope_theta = float(d["rope_theta"])
        else:
            rope_theta = float(rope.get("rope_theta", 10000.0))
        scaling = {**rope, **rope_scaling}
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        rs = RopeScaling(
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0) or 1.0),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
        )

        act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r} in config.json")

        window = d.get("sliding_window") or 0
        layer_types = d.get("layer_types")
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window", False):
            windows = (0,) * num_layers
        elif layer_types:
            windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types)
        elif model_type == "gemma2":
            windows = tuple(window if i % 2 == 0 else 0 for i in range(num_layers))
        elif model_type in ("qwen2", "qwen3"):
            max_window_layers = d.get("max_window_layers", num_layers)
            windows = tuple(window if i >= max_window_layers else 0 for i in range(num_layers))
        else:
            windows = (window,) * num_layers

        # Mixtral names its expert count `num_local_experts` and always renormalises the top k;
        # Qwen3-MoE renormalises only under `norm_topk_prob` and may keep some layers dense.
        num_experts = d.get("num_local_experts") or d.get("num_experts") or 0
        sparse_step = d.get("decoder_sparse_step") or 1
        dense_layers = set(d.get("mlp_only_layers") or ())
        moe_layers = tuple(num_experts > 0 and i not in dense_layers and (i + 1) % sparse_step == 0
                           for i in range(num_layers))

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rs,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            hidden_act=_ACTIVATIONS[act],
            sliding_windows=windows,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if model_type == "gemma2" else None,
            attn_logit_softcap=d.get("attn_logit_softcapping"),
            final_logit_softcap=d.get("final_logit_softcapping"),
            num_experts=num_experts,
            num_experts_per_tok=(d.get("num_experts_per_tok") or 0) if num_experts else 0,
            moe_intermediate_size=(d.get("moe_intermediate_size") or d["intermediate_size"]
                                   if num_experts else 0),
            norm_topk_prob=model_type == "mixtral" or bool(d.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(dtype).replace("torch.", ""),
        )

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding and columns of lm_head: the vocabulary, padded for tp."""
        return self.padded_vocab_size or self.vocab_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: page size and how many pages."""

    block_size: int = 16
    # CPU: bytes for the KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE / --kv-cache-memory-bytes).
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size=}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization=}")
        if self.prefix_caching_hash_algo not in ("sha256", "sha256_cbor", "builtin"):
            raise ValueError(f"--prefix-caching-hash-algo must be sha256, sha256_cbor or builtin, "
                             f"got {self.prefix_caching_hash_algo=}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits (vLLM's scheduler flags)."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: no cap on one request's prefill chunk
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs=}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= "
                             f"--max-num-seqs ({self.max_num_seqs})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill --max-num-batched-tokens ({self.max_num_batched_tokens}) "
                f"must be >= --max-model-len ({self.max_model_len}); raise it or enable chunked "
                "prefill")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"--scheduling-policy must be fcfs or priority, got {self.policy=}")
        if self.max_num_partial_prefills < 1 or self.max_long_partial_prefills < 1:
            raise ValueError("--max-num-partial-prefills and --max-long-partial-prefills must be >= 1")
