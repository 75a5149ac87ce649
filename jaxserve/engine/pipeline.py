"""Pipeline parallelism: the decoder's layers split into stages along the mesh's `pipe` axis, each
stage a compiled function on its own devices (with tensor parallelism inside it), and the step's
token stream cut into micro-batches so that the stages overlap.

Schedule (GPipe, forward only): micro-batch m runs on stage s at tick m + s. Dispatch follows the
ticks, and JAX dispatches asynchronously, so while stage 1 runs micro-batch 0 stage 0 already
runs micro-batch 1. A micro-batch is a contiguous slice of the step's ragged token stream with
its own attention metadata: a sequence cut by the slice contributes its tokens in the slice, and
its context ends at the slice's last token. Micro-batches run through each stage in order, so the
K/V one writes are in the cache before the next one attends to them.

Parameters live on their stage's devices (`Placement.sharding`); each stage's function merges the
graph with its own parameters and zeros of the right shapes for the rest, which it never reads
(XLA drops them), so the model's own modules run unchanged.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.models.layers import AttentionMetadata, run_layers
from jaxserve.sharding.placement import Placement, dotted
from jaxserve.sharding.stages import head_stage, stage_of

logger = logging.getLogger(__name__)


class MicroBatch:
    """One micro-batch's inputs (numpy): token ids i32[t], positions i32[t], metadata."""

    def __init__(self, token_ids, positions, md: AttentionMetadata):
        self.token_ids, self.positions, self.md = token_ids, positions, md


def split_micro_batches(token_ids, positions, md: AttentionMetadata, num: int) -> list[MicroBatch]:
    """Cut a step's padded token stream (T tokens, S rows) into `num` equal slices."""
    T = token_ids.shape[0]
    if num == 1:
        return [MicroBatch(token_ids, positions, md)]
    S = md.kv_lens.shape[0]
    P_ = md.page_indices.shape[0] // S
    size = T // num
    rows = min(size, S)
    num_seqs = int(md.distribution[2])
    num_decodes = int(md.distribution[0])
    cu, kv_lens = md.cu_q_lens, md.kv_lens
    pages = md.page_indices.reshape(S, P_)
    out = []
    for m in range(num):
        a, b = m * size, (m + 1) * size
        mb_lens = np.zeros(rows, np.int32)
        mb_pages = np.zeros((rows, P_), np.int32)
        mb_cu = np.zeros(rows + 1, np.int32)
        n, decodes = 0, 0
        for s in range(num_seqs):
            lo, hi = max(a, int(cu[s])), min(b, int(cu[s + 1]))
            if lo >= hi:
                continue
            # This sequence's context ends at its last token inside the slice.
            mb_lens[n] = kv_lens[s] - (int(cu[s + 1]) - hi)
            mb_pages[n] = pages[s]
            mb_cu[n + 1] = mb_cu[n] + (hi - lo)
            decodes += s < num_decodes
            n += 1
        mb_cu[n + 1:] = mb_cu[n]
        dist = np.array([decodes, decodes, n], np.int32)
        out.append(MicroBatch(token_ids[a:b], positions[a:b],
                              AttentionMetadata(mb_lens, mb_pages.reshape(-1), mb_cu, dist)))
    return out


class Pipeline:
    """The stages of one model over a placement with a `pipe` axis."""

    def __init__(self, graphdef, state, placement: Placement, head, num_micro_batches: int):
        """`state`: the model's parameters, each already on its stage's devices; `head(model, h,
        inp)` computes (logits, prompt logprobs) from the final hidden states."""
        self.placement = placement
        self.stages = list(placement.stages)
        self.pp = len(self.stages)
        self.num_micro_batches = num_micro_batches
        filters = [functools.partial(_in_stage, stage=s, bounds=self.stages)
                   for s in range(self.pp)]
        model = nnx.merge(graphdef, state)
        self.config = model.config
        # One state per stage, and whatever is not a stage's parameter (nothing, today).
        self.graphdef, *parts, self.rest = nnx.split(model, *[
            nnx.All(nnx.Param, f) for f in filters], ...)
        self.states = parts
        self.abstract = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
                         for p in parts]
        self.head_stage = head_stage(model.config.tie_word_embeddings, self.pp)
        self._stage_fns = [jax.jit(functools.partial(self._stage, s), donate_argnums=(1,))
                           for s in range(self.pp)]
        self._head = head
        self._head_fn = jax.jit(self._run_head)
        self._concat = jax.jit(lambda *hs: jnp.concatenate(hs))

    # ---- compiled pieces ---------------------------------------------------------------------
    def _model(self, stage: int, state):
        """The whole model: this stage's parameters, zeros (never read) for the others'."""
        parts = [state if s == stage else jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                       self.abstract[s])
                 for s in range(self.pp)]
        return nnx.merge(self.graphdef, *parts, self.rest)

    def _stage(self, stage: int, state, kv_cache, x, positions, md: AttentionMetadata):
        """Stage `stage` on one micro-batch: token ids (first stage) or hidden states in, hidden
        states out (final-normed on the last stage)."""
        model = self._model(stage, state).model
        start, end = self.stages[stage]
        h = model.embed(x) if stage == 0 else x
        # The stage's cache holds its own layers: layer `start` is its layer 0.
        h, kv_cache = run_layers(model.layers[start:end], h, model.context(positions, md),
                                 kv_cache, model.windows[start:end])
        if stage == self.pp - 1:
            h = model.norm(h)
        return kv_cache, h

    def _run_head(self, state, h, inp):
        return self._head(self._model(self.head_stage, state), h, inp)

    # ---- the step ----------------------------------------------------------------------------
    def stage_sharding(self, stage: int) -> NamedSharding:
        return NamedSharding(self.placement.stage_mesh(stage), P())

    def forward(self, kv_caches: list, inp):
        """Run the step's stream through every stage in micro-batches. Returns (kv caches,
        logits f32[S, V], prompt logprobs), the last two on the head stage's devices."""
        T = inp.token_ids.shape[0]
        num = self.num_micro_batches if T % self.num_micro_batches == 0 else 1
        mbs = split_micro_batches(inp.token_ids, inp.positions, inp.md, num)
        kv_caches = list(kv_caches)
        hidden = [None] * num
        for tick in range(num + self.pp - 1):
            for s in range(self.pp):
                m = tick - s
                if not 0 <= m < num:
                    continue
                mb = mbs[m]
                x = mb.token_ids if s == 0 else jax.device_put(hidden[m], self.stage_sharding(s))
                with jax.set_mesh(self.placement.stage_mesh(s)):
                    kv_caches[s], hidden[m] = self._stage_fns[s](
                        self.states[s], kv_caches[s], x, mb.positions, mb.md)
        h = hidden[0] if num == 1 else self._concat(*hidden)
        h = jax.device_put(h, self.stage_sharding(self.head_stage))
        with jax.set_mesh(self.placement.stage_mesh(self.head_stage)):
            logits, prompt = self._head_fn(self.states[self.head_stage], h, inp)
        return kv_caches, logits, prompt


    def lower_all(self, kv_caches: list, inp, dtype) -> list:
        """Every executable `forward` would compile for the step `inp` (token ids, metadata:
        host arrays of the bucket's shapes), lowered from shapes: each stage per micro-batch
        size and the head (`jaxserve compile --target`, where no stage can run). `kv_caches`
        and this pipeline's states may be ShapeDtypeStructs with shardings."""
        T = inp.token_ids.shape[0]
        num = self.num_micro_batches if T % self.num_micro_batches == 0 else 1
        mb = split_micro_batches(inp.token_ids, inp.positions, inp.md, num)[0]

        def on(stage, tree):
            sharding = self.stage_sharding(stage)
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                               sharding=sharding), tree)

        D = self.config.hidden_size
        lowered = []
        for s in range(self.pp):
            x = on(s, mb.token_ids) if s == 0 else jax.ShapeDtypeStruct(
                (mb.token_ids.shape[0], D), dtype, sharding=self.stage_sharding(s))
            with jax.set_mesh(self.placement.stage_mesh(s)):
                lowered.append(self._stage_fns[s].lower(self.states[s], kv_caches[s], x,
                                                        on(s, mb.positions), on(s, mb.md)))
        h = jax.ShapeDtypeStruct((T, D), dtype, sharding=self.stage_sharding(self.head_stage))
        with jax.set_mesh(self.placement.stage_mesh(self.head_stage)):
            lowered.append(self._head_fn.lower(self.states[self.head_stage], h,
                                               on(self.head_stage, inp)))
        return lowered


def _in_stage(path, value, *, stage: int, bounds) -> bool:
    """nnx filter: the parameter at `path` belongs to `stage`."""
    del value
    return stage_of(dotted(path), bounds) == stage
