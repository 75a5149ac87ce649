"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router picks k of E SwiGLU
experts per token, and the experts run as one grouped matmul (`jax.lax.ragged_dot`).

Axis letters: T tokens, D model, F one expert's MLP width, E experts, A = T*k (token, expert)
assignments. Expert weights are stacked `f[E, in, out]` parameters under `experts.*` so that
they can be sharded along E; the router is `gate.kernel f[D, E]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.models.layers import Linear, activation, normal_init
from jaxserve.sharding.attention import model_axis_size
from jaxserve.sharding.mesh import MODEL, ParallelConfig
from jaxserve.sharding.placement import dotted, key_path
from jaxserve.sharding.rules import param_spec


class Routing(NamedTuple):
    weights: jax.Array  # f32[T, k] how much each chosen expert's output counts
    experts: jax.Array  # i32[T, k] the chosen experts


def route(logits, top_k: int, renormalize: bool) -> Routing:
    """Router logits f[T, E] -> the top k experts of each token and their weights.

    The weights are the softmax over all E experts at the chosen ones; `renormalize` rescales
    them to sum to 1 (Mixtral always, Qwen3-MoE under `norm_topk_prob`).
    """
    logits = logits.astype(jnp.float32)
    if renormalize:
        # NOTE: softmax over E, keep the top k, divide by their sum == softmax over the top k
        # logits; softmax is monotonic, so the top k logits pick the same experts.
        top, experts = jax.lax.top_k(logits, top_k)
        return Routing(jax.nn.softmax(top, axis=-1), experts)
    top, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    return Routing(top, experts)


class ExpertLinear(nnx.Module):
    """E linear maps side by side: `kernel f[E, in, out]`, one HF expert's `weight` transposed
    per row. Rows of the input are grouped by expert (`group_sizes` rows each, in order)."""

    def __init__(self, num_experts: int, din: int, dout: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init(rngs, (num_experts, din, dout), dtype))

    def __call__(self, x, group_sizes):  # x f[A, in], group_sizes i32[E] -> f[A, out]
        return jax.lax.ragged_dot(x, self.kernel[...], group_sizes)


class Experts(nnx.Module):
    """E SwiGLU MLPs: `gate_proj`, `up_proj` f[E, D, F], `down_proj` f[E, F, D]."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = ExpertLinear(E, D, F, dtype=dtype, rngs=rngs)
        self.up_proj = ExpertLinear(E, D, F, dtype=dtype, rngs=rngs)
        self.down_proj = ExpertLinear(E, F, D, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, group_sizes):  # x f[A, D] grouped by expert, group_sizes i32[E]
        h = self.act(self.gate_proj(x, group_sizes)) * self.up_proj(x, group_sizes)
        return self.down_proj(h, group_sizes)


class SparseMoeBlock(nnx.Module):
    """Route each token to k experts, run them grouped, and sum their outputs by weight."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.expert_parallel = cfg.expert_parallel

    def __call__(self, x):  # f[T, D] -> f[T, D]
        T, D = x.shape
        k = self.top_k
        weights, experts = route(self.gate(x), k, self.renormalize)  # f32[T, k], i32[T, k]
        # Sort the T*k assignments by expert so that each expert's rows are contiguous.
        flat = experts.reshape(T * k)  # i32[A]
        order = jnp.argsort(flat, stable=True)  # i32[A] assignment at each sorted row
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)  # i32[E]
        y = self._run_experts(x[order // k], group_sizes)  # f[A, D] in sorted order
        # NOTE: the outputs go back to (token, choice) order through the inverse permutation and
        # are summed over the k choices in a fixed order: a gather instead of a scatter-add, so
        # the sum does not depend on the order in which atomics land.
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype))
        y = y[inverse].reshape(T, k, D).astype(jnp.float32)
        return jnp.einsum("tkd,tk->td", y, weights).astype(x.dtype)

    def _run_experts(self, xs, group_sizes):
        """The grouped SwiGLU on rows sorted by expert; over the mesh's model axis when there is
        one. Tensor parallel: every shard runs every expert on its slice of the hidden size.
        Expert parallel: every shard runs its own experts on their rows only. Either way the
        shards' partial outputs add up (one all-reduce)."""
        tp = model_axis_size()
        if tp == 1:
            return self.experts(xs, group_sizes)
        graphdef, state = nnx.split(self.experts)
        parallel = ParallelConfig(model=tp, expert_parallel=self.expert_parallel)
        specs = jax.tree_util.tree_map_with_path(
            lambda path, _: param_spec(dotted(("experts", *key_path(path))), parallel), state)
        local_experts = self.num_experts // tp

        def shard(state, xs, group_sizes):
            experts = nnx.merge(graphdef, state)
            if not self.expert_parallel:
                return jax.lax.psum(experts(xs, group_sizes), MODEL)
            # This shard's experts own a contiguous run of the sorted rows: rotate it to the
            # front, run the local groups, zero the rest, rotate back.
            first = jax.lax.axis_index(MODEL) * local_experts
            local_sizes = jax.lax.dynamic_slice_in_dim(group_sizes, first, local_experts)
            start = jnp.sum(jnp.where(jnp.arange(self.num_experts) < first, group_sizes, 0))
            rows = jnp.arange(xs.shape[0])
            y = experts(jnp.roll(xs, -start, axis=0), local_sizes)
            y = jnp.where((rows < jnp.sum(local_sizes))[:, None], y, 0)
            return jax.lax.psum(jnp.roll(y, start, axis=0), MODEL)

        return jax.shard_map(shard, in_specs=(specs, P(), P()), out_specs=P(),
                             check_vma=False)(state, xs, group_sizes)
