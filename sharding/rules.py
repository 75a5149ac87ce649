"""Partition rules: one table from parameter-name patterns to how each array splits over the mesh,
and the model config's adjustments for tensor parallelism.

Parameter paths are our module paths joined with dots (`model.layers.3.self_attn.q_proj.kernel`);
linear kernels are `f[in, out]`, stacked experts `f[E, in, out]`. Rules are tried in order and
the first whose pattern matches (`re.search`) gives the spec; no match means replicated.

Tensor parallelism (Megatron style): q/k/v and gate/up split their output features (whole heads,
MLP hidden), o_proj and down_proj their input features, so each layer needs one all-reduce after
attention and one after the MLP, which XLA inserts. The vocabulary splits over the model axis
(embedding rows, lm_head columns), padded to a multiple of tp. Experts split their hidden size
like the dense MLP, or, under expert parallelism, whole experts over the model axis.
"""

from __future__ import annotations

import dataclasses
import re

from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.kernels_pallas import QuantizedKVCache
from jaxserve.sharding.mesh import MODEL, ParallelConfig, check_divides

# (pattern, spec for tensor parallelism, spec under expert parallelism if different)
PARAM_RULES: tuple[tuple[str, P, P | None], ...] = (
    (r"experts\.(gate_proj|up_proj|gate_up_proj)\.kernel$", P(None, None, MODEL),
     P(MODEL, None, None)),
    (r"experts\.down_proj\.kernel$", P(None, MODEL, None), P(MODEL, None, None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P(None, MODEL), None),
    (r"(q_proj|k_proj|v_proj)\.bias$", P(MODEL), None),
    (r"(o_proj|down_proj)\.kernel$", P(MODEL, None), None),
    (r"embed_tokens\.weight$", P(MODEL, None), None),
    (r"lm_head\.kernel$", P(None, MODEL), None),
)


def kv_cache_spec(kv_cache, stacked: bool):
    """The paged KV cache's PartitionSpec: `f[(L,) pages, page_size, 2K, H]` (and the scales
    `f32[(L,) pages, page_size, 2K]` of a quantised cache) split by KV heads over the model axis.
    Each shard holds its own heads' keys then values, so the global array is the shards' caches
    side by side; only the attention kernels read it, per shard."""
    lead = (None,) * (3 if stacked else 2)
    if isinstance(kv_cache, QuantizedKVCache):
        return QuantizedKVCache(P(*lead, MODEL, None), P(*lead, MODEL))
    return P(*lead, MODEL, None)


def param_spec(path: str, parallel: ParallelConfig) -> P:
    """The PartitionSpec of the parameter at dotted `path`."""
    if parallel.model == 1:
        return P()
    for pattern, spec, ep_spec in PARAM_RULES:
        if re.search(pattern, path):
            return ep_spec if parallel.expert_parallel and ep_spec is not None else spec
    return P()


@dataclasses.dataclass(frozen=True)
class TPLayout:
    """What tensor parallelism changes in a model: KV heads replicated when tp exceeds them, the
    vocabulary padded to a multiple of tp."""

    kv_head_replicas: int = 1  # each checkpoint KV head appears this many times
    padded_vocab_size: int = 0  # 0: not padded
    expert_parallel: bool = False

    @classmethod
    def plan(cls, cfg: ModelConfig, parallel: ParallelConfig) -> TPLayout:
        tp = parallel.model
        if tp == 1:
            return cls()
        check_divides("query heads", cfg.num_heads, parallel)
        K = cfg.num_kv_heads
        if tp > K:
            if tp % K:
                raise ValueError(f"tensor parallel size {tp} exceeds the {K} KV heads and is not "
                                 f"a multiple of them; use a multiple of {K} or a divisor of it")
            replicas = tp // K
        else:
            check_divides("KV heads", K, parallel)
            replicas = 1
        if cfg.num_experts:
            if parallel.expert_parallel:
                check_divides("experts", cfg.num_experts, parallel)
            else:
                check_divides("expert hidden features", cfg.moe_intermediate_size, parallel)
        if sum(cfg.moe_layers) < cfg.num_layers:  # some layers have the dense MLP
            check_divides("MLP hidden features", cfg.intermediate_size, parallel)
        padded = -(-cfg.vocab_size // tp) * tp
        return cls(kv_head_replicas=replicas,
                   padded_vocab_size=padded if padded != cfg.vocab_size else 0,
                   expert_parallel=parallel.expert_parallel and cfg.num_experts > 0)

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        """The config the sharded model is built from (more KV heads, padded vocabulary)."""
        changes = {"expert_parallel": self.expert_parallel}
        if self.kv_head_replicas > 1:
            changes["num_kv_heads"] = cfg.num_kv_heads * self.kv_head_replicas
        if self.padded_vocab_size:
            changes["padded_vocab_size"] = self.padded_vocab_size
        return cfg.replace(**changes)
