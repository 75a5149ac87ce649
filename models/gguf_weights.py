"""GGUF files as HF checkpoints: the HF config, HF tensor names, and float32 tensors.

Mirrors `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint` (the path
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` takes for these architectures) without
needing torch: the same config keys, the same names, and the same values, including the two
transforms llama.cpp's converter applied that must be undone:

- `llama` files (Llama, Mistral, SmolLM...): q/k rows were permuted from HF's rotate-half layout to
  GGML's interleaved one; `_unpermute` reverses it.
- `gemma2` files store RMSNorm weights as `1 + w`; HF stores `w`.

Names come from one table per GGUF architecture (`_LAYER_NAMES`), checked in the tests against
transformers' own GGUF name map.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_COMMON_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF `general.architecture` -> per-layer GGUF tensor name -> HF module path under model.layers.N.
_LAYER_NAMES = {
    "llama": {**_COMMON_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_COMMON_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},
    "qwen3": {
        **_COMMON_LAYER_NAMES,
        "ffn_norm": "post_attention_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
    "gemma2": {
        **_COMMON_LAYER_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_LAYER_NAMES)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)")


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file, as stored: `data` is a zero-copy view of the file (the typed
    array for F32/F16, else raw bytes shaped [..., bytes per row]), as `gguf.dequantize` takes."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: [out, in]
    data: np.ndarray


class GGUFFile:
    """One GGUF file: metadata, tensors, the HF config, and HF-named float32 tensors.

    The file is memory-mapped and read by `_parse` here rather than `gguf.GGUFReader`, which
    takes seconds building an object per vocabulary entry; long string arrays (the vocabulary,
    the merges) are skipped and decoded only if `field()` asks for them.
    """

    def __init__(self, path: str):
        self.path = path
        self.metadata, self.tensor_infos = _parse(path)
        self.architecture = self.field("general.architecture")
        if self.architecture not in _LAYER_NAMES:
            raise ValueError(
                f"{path}: GGUF architecture {self.architecture!r} is not supported; supported: "
                f"{SUPPORTED_GGUF_ARCHITECTURES}. Use the model's HF folder instead."
            )
        self.hf_config = self._cached_hf_config()

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, int, float, bool or list), or `default` when absent."""
        value = self.metadata.get(key, default)
        return value() if callable(value) else value

    def hf_name(self, gguf_name: str) -> str | None:
        """The transformers state_dict name of GGUF tensor `gguf_name`, or None if it has none."""
        return hf_name(self.architecture, gguf_name)

    def num_tensors(self) -> int:
        """How many tensors `tensors()` yields."""
        return sum(1 for t in self.tensor_infos if self.hf_name(t.name))

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(hf_name, float32 array [out, in])` for every tensor transformers would load."""
        from gguf import dequantize

        for tensor in self.tensor_infos:
            name = self.hf_name(tensor.name)
            if name is None:
                logger.info(
                    "%s: skipping tensor %s (no transformers weight)", self.path, tensor.name
                )
                continue
            try:
                w = dequantize(tensor.data, tensor.qtype)
            except NotImplementedError as e:
                raise ValueError(
                    f"{self.path}: tensor {tensor.name} has type {tensor.qtype.name}, which "
                    "this gguf package cannot dequantise: upgrade `gguf` or use another file."
                ) from e
            yield name, np.ascontiguousarray(self._undo_conversion(tensor.name, w), np.float32)

    def _undo_conversion(self, gguf_name: str, w: np.ndarray) -> np.ndarray:
        cfg = self.hf_config
        if self.architecture == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            is_q = ".attn_q." in gguf_name
            return _unpermute(w, cfg["num_attention_heads" if is_q else "num_key_value_heads"])
        if self.architecture == "gemma2" and gguf_name.endswith("norm.weight"):
            return w - 1
        return w

    def _cached_hf_config(self) -> dict[str, Any]:
        """`_hf_config`, kept under `~/.cache/jaxserve/gguf-config`: building it imports
        transformers' GGUF integration, which imports torch where torch is installed (seconds of
        every start-up; without torch it works the same)."""
        cached = derived_cache_path("gguf-config", self.path) + ".json"
        try:
            with open(cached) as f:
                config = json.load(f)
            if "id2label" in config:  # JSON made its int keys strings; transformers has ints
                config["id2label"] = {int(k): v for k, v in config["id2label"].items()}
            return config
        except (OSError, ValueError):
            pass
        config = self._hf_config()
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = f"{cached}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(config, f)
            os.replace(tmp, cached)
        except OSError as e:
            logger.warning("could not cache the GGUF file's config at %s: %s", cached, e)
        return config

    def _hf_config(self) -> dict[str, Any]:
        """The config dict transformers builds from this metadata, plus `architectures`/`dtype`."""
        from transformers import AutoConfig
        from transformers.integrations import GGUF_CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = self.architecture
        # NOTE: transformers calls a llama file "mistral" only when general.name is exactly
        # "mistral"; llama and mistral share tensors and metadata, so we follow it to the letter.
        model_type = (
            "mistral" if arch == "llama" and self.field("general.name") == "mistral" else arch
        )
        tensor_names = {t.name for t in self.tensor_infos}
        cfg: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
        for key in self.metadata:
            prefix, _, rest = key.partition(".")
            prefix = model_type if prefix == arch else prefix
            hf_key = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
            if hf_key not in (None, -1) and prefix != "general":
                cfg[hf_key] = self.field(key)
        if arch == "qwen3" and (head_dim := self.field("qwen3.attention.key_length")):
            # NOTE: transformers ignores this key for qwen3 and falls back to Qwen3Config's default
            # head_dim (128, which every released Qwen3 uses); reading it is right for all files.
            cfg["head_dim"] = head_dim
        if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in self.metadata:
            cfg["vocab_size"] = len(self.field("tokenizer.ggml.tokens"))
        config = AutoConfig.for_model(model_type, **cfg).to_dict()
        config.pop("transformers_version", None)
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
        config["dtype"] = config["torch_dtype"] = "float32"
        return config


def derived_cache_path(kind: str, path: str) -> str:
    """Where to keep something derived from file `path`: `~/.cache/jaxserve/<kind>/<key>`, the key
    a hash of the file's absolute path, size and mtime (so a changed file is derived again) and of
    the transformers version that derived it (read from its metadata: no import)."""
    from importlib.metadata import version

    path = os.path.abspath(path)
    st = os.stat(path)
    ident = f"{path}:{st.st_size}:{st.st_mtime_ns}:{version('transformers')}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", kind, key)


def hf_name(architecture: str, gguf_name: str) -> str | None:
    """The transformers name of tensor `gguf_name` in a GGUF file of `architecture`, or None."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and (part := _LAYER_NAMES[architecture].get(m[2])):
        return f"model.layers.{m[1]}.{part}.{m[3]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reverse llama.cpp's q/k row permutation (rows are `n_head` blocks of two interleaved
    halves in GGUF; HF keeps each head's two rotary halves contiguous)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# ----- the GGUF container (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) -------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_LAZY_ARRAY_LEN = 1024  # string arrays longer than this are decoded only when asked for


def _parse(path: str) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """Read a GGUF v2/v3 file's metadata and tensor table; tensor data stays in the memory map."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{path} is not a little-endian GGUF v2/v3 file ({magic=}, {version=}).")
    pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        metadata[key], pos = _read_value(buf, pos, vtype)
    infos = []
    for _ in range(n_tensors):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
    alignment = metadata.get("general.alignment", 32)
    start = pos + (-pos) % alignment
    tensors = []
    for name, shape, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) * size // block
        data = np.frombuffer(buf, np.uint8, n_bytes, start + offset)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = data.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
            data = data.reshape(shape)
        else:
            data = data.reshape(quant_shape_to_byte_shape(shape, qtype))
        tensors.append(GGUFTensor(name, qtype, shape, data))
    return metadata, tensors


def _read_string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n


def _read_value(buf, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _read_string(buf, pos)
    if vtype != _ARRAY:
        raise ValueError(f"unknown GGUF metadata value type {vtype}")
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _SCALARS:
        dtype = np.dtype(_SCALARS[etype])
        values = np.frombuffer(buf, dtype, count, pos).tolist()
        return values, pos + dtype.itemsize * count
    if etype == _STRING and count > _LAZY_ARRAY_LEN:
        start = pos
        for _ in range(count):  # skip; decode only when asked (see GGUFFile.field)
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        return (lambda: _strings(buf, start, count)), pos
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, etype)
        values.append(value)
    return values, pos


def _strings(buf, pos: int, count: int) -> list[str]:
    out = []
    for _ in range(count):
        s, pos = _read_string(buf, pos)
        out.append(s)
    return out
