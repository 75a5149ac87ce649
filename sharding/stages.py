"""Pipeline stages: which layers each stage of the `pipe` axis runs, and which stage owns each
parameter (its layers'; the embedding on the first stage; the final norm and lm_head on the
last; a tied embedding, which is also the output projection, on the first)."""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def stage_bounds(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """[start, end) layers of each stage: as even as possible, earlier stages one more."""
    if pp > num_layers:
        raise ValueError(f"pipeline parallel size {pp} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    bounds, start = [], 0
    for s in range(pp):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def stage_of(path: str, bounds: list[tuple[int, int]]) -> int:
    """The stage that holds the parameter at dotted `path`."""
    m = _LAYER.search(path)
    if m is not None:
        layer = int(m.group(1))
        return next(s for s, (a, b) in enumerate(bounds) if a <= layer < b)
    if "embed_tokens" in path:
        return 0
    return len(bounds) - 1  # the final norm, lm_head


def head_stage(tie_word_embeddings: bool, pp: int) -> int:
    """The stage that computes logits: where the output projection lives."""
    return 0 if tie_word_embeddings else pp - 1
