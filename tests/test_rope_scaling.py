"""RoPE scaling: llama.cpp's rope_freqs.weight, "linear" and "llama3" against transformers, and clear
errors for what is not implemented (other RoPE scalings, sliding-window attention)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import transformers

from shoal.model.config import ModelConfig
from shoal.model.llama import rope_inv_freq
from shoal.model.loader import ModelLoadError, load_checkpoint

# Llama 3.1 8B's RoPE: theta 500000, head_dim 128, rope_scaling llama3.
LLAMA31_THETA, LLAMA31_HEAD_DIM = 500000.0, 128
LLAMA31_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _base_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _llama_cpp_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.generate_extra_tensors (rope_freqs.weight), written out."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_tiny_gguf(path, *, head_dim: int = LLAMA31_HEAD_DIM, theta: float = LLAMA31_THETA,
                     rope_freqs: np.ndarray | None = None, kv: dict | None = None) -> str:
    """A one-layer float32 Llama GGUF, written the way llama.cpp's converter lays it out."""
    import gguf

    heads, kv_heads, vocab, ff = 2, 1, 32, 16
    hidden = heads * head_dim
    rng = np.random.default_rng(0)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(1)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_float32(key, value)
    writer.add_tensor("token_embd.weight", w(vocab, hidden))
    writer.add_tensor("output_norm.weight", w(hidden))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for name, shape in {
        "attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (heads * head_dim, hidden),
        "attn_k": (kv_heads * head_dim, hidden), "attn_v": (kv_heads * head_dim, hidden),
        "attn_output": (hidden, heads * head_dim), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
        "ffn_down": (hidden, ff),
    }.items():
        writer.add_tensor(f"blk.0.{name}.weight", w(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _transformers_inv_freq(rope_type: str, scaling: dict, theta: float, head_dim: int) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=131072,
        rope_theta=theta, rope_scaling=dict(scaling, rope_type=rope_type),
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return inv_freq.double()


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=32, hidden_size=2 * LLAMA31_HEAD_DIM, intermediate_size=16, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=LLAMA31_HEAD_DIM, rope_theta=LLAMA31_THETA)
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------- llama.cpp rope_freqs.weight


def test_gguf_rope_freqs_divide_inverse_frequencies(tmp_path) -> None:
    factors = _llama_cpp_rope_factors(LLAMA31_THETA, LLAMA31_HEAD_DIM, LLAMA31_SCALING)
    assert len(set(factors.tolist())) > 3  # high band (1), low band (8) and a blended middle band
    path = _write_tiny_gguf(tmp_path / "llama31.gguf", rope_freqs=factors)
    config, state = load_checkpoint(path)
    assert "rope_freqs.weight" not in state
    assert config.rope_scaling is None
    assert config.rope_freq_factors == tuple(float(f) for f in factors)

    base = _base_inv_freq(LLAMA31_THETA, LLAMA31_HEAD_DIM)
    ours = rope_inv_freq(config)
    assert not torch.allclose(ours, base)
    torch.testing.assert_close(ours, base / torch.from_numpy(factors).double(), rtol=1e-12, atol=0)
    # ... which is the llama3 rope_scaling of the HF checkpoint the GGUF was converted from
    # (the factors are float32, hence rtol 1e-6).
    llama3 = rope_inv_freq(_cfg(rope_scaling=LLAMA31_SCALING))
    torch.testing.assert_close(ours, llama3, rtol=1e-6, atol=0)
    reference = _transformers_inv_freq("llama3", LLAMA31_SCALING, LLAMA31_THETA, LLAMA31_HEAD_DIM)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


def test_gguf_rope_freqs_wrong_length(tmp_path) -> None:
    path = _write_tiny_gguf(tmp_path / "bad.gguf", rope_freqs=np.ones(3, dtype=np.float32))
    with pytest.raises(ModelLoadError, match=r"rope_freq_factors has 3 entries, expected head_dim / 2 = 64") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_rope_freq_factors_and_llama3_scaling_are_exclusive() -> None:
    with pytest.raises(ValueError, match="two forms of the same scaling"):
        _cfg(rope_scaling=LLAMA31_SCALING, rope_freq_factors=(1.0,) * (LLAMA31_HEAD_DIM // 2))


# ---------------------------------------------------------------- GGUF rope.scaling metadata


def test_gguf_linear_scaling(tmp_path) -> None:
    path = _write_tiny_gguf(
        tmp_path / "linear.gguf", theta=10000.0,
        kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    )
    config, _ = load_checkpoint(path)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    torch.testing.assert_close(rope_inv_freq(config), _base_inv_freq(10000.0, LLAMA31_HEAD_DIM) / 4.0)


def test_gguf_scaling_none_ignores_factor(tmp_path) -> None:
    """llama.cpp never scales when the type is 'none', whatever the factor says."""
    path = _write_tiny_gguf(
        tmp_path / "none.gguf", kv={"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}
    )
    config, _ = load_checkpoint(path)
    assert config.rope_scaling is None and config.rope_freq_factors is None
    torch.testing.assert_close(rope_inv_freq(config), _base_inv_freq(LLAMA31_THETA, LLAMA31_HEAD_DIM))


@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_gguf_unsupported_scaling(tmp_path, kind: str) -> None:
    path = _write_tiny_gguf(
        tmp_path / f"{kind}.gguf", kv={"llama.rope.scaling.type": kind, "llama.rope.scaling.factor": 4.0}
    )
    with pytest.raises(ModelLoadError, match=f"unsupported RoPE scaling type '{kind}' \\(llama.rope.scaling.type\\)"):
        load_checkpoint(path)


# ---------------------------------------------------------------- Hugging Face rope_scaling


def _save_tiny_llama(tmp_path, **config_kw) -> tuple[str, transformers.LlamaForCausalLM]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **config_kw,
    )
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    return str(folder), model


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        # head_dim 16, theta 10000: wavelengths 6.3 ... 19869 span all three llama3 bands (64 / 256)
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 256},
    ],
    ids=["linear", "llama3"],
)
def test_hf_rope_scaling_matches_transformers(tmp_path, scaling: dict) -> None:
    """The inverse frequencies transformers' rope init put in the model's rotary embedding."""
    path, model = _save_tiny_llama(tmp_path, rope_theta=10000.0, rope_scaling=scaling)
    config, _ = load_checkpoint(path)
    assert config.rope_scaling["factor"] == scaling["factor"]
    reference = model.model.rotary_emb.inv_freq.double()
    ours = rope_inv_freq(config)
    assert not torch.allclose(ours, _base_inv_freq(10000.0, config.head_dim))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_init_matches_transformers_llama31_shape(kind: str) -> None:
    scaling = LLAMA31_SCALING if kind == "llama3" else {"factor": 8.0}
    ours = rope_inv_freq(_cfg(rope_scaling=dict(scaling, rope_type=kind)))
    reference = _transformers_inv_freq(kind, scaling, LLAMA31_THETA, LLAMA31_HEAD_DIM)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


def _write_config(folder, **overrides) -> None:
    cfg = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    (folder / "config.json").write_text(json.dumps({**cfg, **overrides}))


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        {"type": "dynamic", "factor": 2.0},  # transformers 4's older key
        {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    ],
    ids=["yarn", "dynamic", "longrope"],
)
def test_hf_unsupported_rope_scaling(tmp_path, scaling: dict) -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    _write_config(tmp_path, rope_scaling=scaling)
    with pytest.raises(ModelLoadError, match=f"unsupported RoPE scaling type '{kind}'") as e:
        load_checkpoint(tmp_path)
    assert "config.json" in str(e.value)
    with pytest.raises(ValueError, match=f"unsupported RoPE scaling type '{kind}'"):
        _cfg(rope_scaling=scaling)


def test_hf_llama3_scaling_incomplete(tmp_path) -> None:
    _write_config(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ModelLoadError, match="RoPE scaling 'llama3' lacks original_max_position_embeddings"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- Mistral sliding window


@pytest.mark.parametrize("window", [None, 1024, 4096])
def test_mistral_without_effective_sliding_window_loads(tmp_path, window) -> None:
    path, model = _save_tiny_llama(tmp_path)
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": window}))
    config, state = load_checkpoint(path)
    assert config.max_position_embeddings == 1024
    assert torch.equal(state["embed_tokens.weight"], model.model.embed_tokens.weight)


def test_mistral_sliding_window_rejected(tmp_path) -> None:
    _write_config(tmp_path, model_type="mistral", sliding_window=256)
    with pytest.raises(
        ModelLoadError,
        match=r"sliding window attention \(sliding_window=256 < max_position_embeddings=1024\) is not supported",
    ) as e:
        load_checkpoint(tmp_path)
    assert os.fspath(tmp_path) in str(e.value)


def test_partial_rotary_factor_of_one_or_null_loads(tmp_path) -> None:
    path, _ = _save_tiny_llama(tmp_path)
    base = load_checkpoint(path)[0]
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    for factor in (None, 1.0):
        (tmp_path / "tiny" / "config.json").write_text(json.dumps({**cfg, "partial_rotary_factor": factor}))
        assert load_checkpoint(path)[0] == base


def test_partial_rotary_factor_rejected(tmp_path) -> None:
    _write_config(tmp_path, partial_rotary_factor=0.5)
    with pytest.raises(ModelLoadError, match=r"partial_rotary_factor=0.5 is not supported"):
        load_checkpoint(tmp_path)
