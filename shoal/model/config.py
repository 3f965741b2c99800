"""Architecture description of a Llama-family model, independent of where the weights came from."""

from __future__ import annotations

from dataclasses import dataclass, field

# RoPE scaling types rope_inv_freq implements; anything else (yarn, dynamic, longrope, ...) would
# silently give wrong positions, so ModelConfig refuses it.
SUPPORTED_ROPE_TYPES = ("linear", "llama3")


def rope_type(rope_scaling: dict | None) -> str:
    """The scaling type of a Hugging Face style ``rope_scaling`` dict ("default" when there is none)."""
    scaling = rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type")) or "default"


def check_rope_scaling(rope_scaling: dict | None) -> None:
    """Raise ValueError unless ``rope_scaling`` is absent or a complete supported scaling."""
    kind = rope_type(rope_scaling)
    if kind == "default":
        return
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE scaling type {kind!r}: only {', '.join(map(repr, SUPPORTED_ROPE_TYPES))} "
            "are implemented (running it unscaled would compute wrong positions)"
        )
    required = ("factor", "original_max_position_embeddings") if kind == "llama3" else ("factor",)
    if missing := [k for k in required if rope_scaling.get(k) is None]:
        raise ValueError(f"RoPE scaling {kind!r} lacks {', '.join(missing)}")
    if not rope_scaling["factor"] > 0:
        raise ValueError(f"RoPE scaling {kind!r}: factor must be > 0, got {rope_scaling['factor']!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (SmolLM2, Llama 2/3, Mistral-style GQA)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"
    name: str = "llama"
    rope_scaling: dict | None = field(default=None, compare=False)
    # Per-frequency divisors of the inverse RoPE frequencies (head_dim // 2 of them): llama.cpp's
    # ``rope_freqs.weight`` tensor, how Llama 3.1/3.2 GGUF files carry the "llama3" scaling.
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        check_rope_scaling(self.rope_scaling)
        if self.rope_freq_factors is not None:
            if len(self.rope_freq_factors) != self.head_dim // 2:
                raise ValueError(
                    f"rope_freq_factors has {len(self.rope_freq_factors)} entries, expected head_dim / 2 = "
                    f"{self.head_dim // 2}"
                )
            if not all(f > 0 for f in self.rope_freq_factors):
                raise ValueError("rope_freq_factors must all be > 0")
            if rope_type(self.rope_scaling) == "llama3":
                raise ValueError(
                    "rope_freq_factors and a 'llama3' rope_scaling are two forms of the same scaling; give one"
                )
