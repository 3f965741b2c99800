"""Shared fixtures: a tiny random Llama (fast) saved as a Hugging Face folder, and engines on it."""

from __future__ import annotations

import pytest
import torch

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.model.llama import LlamaModel
from shoal.model.loader import load_checkpoint

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="eager"))
    # Random init is near-uniform; scale the head up so distributions are peaked like a real model's.
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_dir):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(
        tiny_model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture
def make_tiny_engine(tiny_model_dir):
    """Build a float32 CPU engine on the tiny model; keyword args go to EngineConfig."""

    def make(**overrides) -> Engine:
        config, state = load_checkpoint(tiny_model_dir, dtype=torch.float32)
        model = LlamaModel.from_state_dict(config, state)
        opts = dict(dtype="float32", device="cpu", block_size=4, num_blocks=256, num_swap_blocks=256)
        opts.update(overrides)
        return Engine(EngineConfig(**opts), model=model)

    return make
