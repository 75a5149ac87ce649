"""Build a model and fill its weights: from checkpoint tensors, random (`dummy`), or orbax."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.weights import abstract_model, dummy_params, load_params
from jaxserve.sharding.placement import Placement

logger = logging.getLogger(__name__)

ORBAX_MARKER = "jaxserve_orbax.json"  # present in folders written by `jaxserve convert`
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy", "orbax")


def is_orbax_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ORBAX_MARKER))


def load_model(source, cfg: ModelConfig, dtype, load_format: str = "auto", seed: int = 0,
               attention_backend: str = "ref", placement: Placement | None = None) -> nnx.Module:
    """The model for `source` (a `ModelSource`), its parameters on device in `dtype`; with a
    `placement`, `cfg` is the mesh's config (`placement.model_config`) and every parameter
    loads straight into its sharding."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"--load-format must be one of {LOAD_FORMATS}, got {load_format!r}")
    start = time.perf_counter()
    model = abstract_model(cfg, dtype, attention_backend)
    if load_format == "dummy":
        dummy_params(model, seed, placement)
    elif load_format == "orbax" or (load_format == "auto" and source.format == "hf"
                                    and is_orbax_folder(source.path)):
        restore_orbax(model, source.path, placement)
    else:
        if load_format == "gguf" and source.format != "gguf":
            raise ValueError(f"--load-format gguf needs a .gguf file, got {source.path}")
        load_params(model, source.iter_tensors("auto" if load_format == "gguf" else load_format),
                    dtype, placement)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logger.info("loaded %s (%.1fM parameters, %s) in %.1f s", source.name, num_params / 1e6,
                jnp.dtype(dtype).name, time.perf_counter() - start)
    return model


def save_orbax(model: nnx.Module, hf_config: dict, out_dir: str, tokenizer=None) -> None:
    """Write a folder that `load_model` restores fast: config.json, orbax params, tokenizer."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out_dir, "params"), state, force=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, ORBAX_MARKER), "w") as f:
        json.dump({"format": "orbax", "dtype": str(jax.tree.leaves(state)[0].dtype)}, f)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def restore_orbax(model: nnx.Module, path: str, placement: Placement | None = None) -> None:
    import orbax.checkpoint as ocp

    if placement is not None and (placement.layout.kv_head_replicas > 1
                                  or placement.layout.padded_vocab_size):
        raise ValueError("an orbax checkpoint restores as saved: with this tensor parallel size "
                         "the model repeats KV heads or pads the vocabulary; convert from the "
                         "HF checkpoint instead")
    state = nnx.state(model, nnx.Param)
    if placement is None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    else:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, placement.shardings(state))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.join(os.path.abspath(path), "params"), abstract)
    nnx.update(model, restored)
