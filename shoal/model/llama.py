"""Llama-family decoder over a paged KV cache. Knows token ids and positions, nothing of requests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoal.model.attention import AttentionMetadata, LayerKV, paged_attention
from shoal.model.config import ModelConfig, rope_type


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies (float64), scaled as configured.

    ``rope_scaling`` "linear" divides every frequency by ``factor``; "llama3" divides the low
    frequencies by ``factor`` and blends the middle band (as transformers' llama3 rope init).
    ``rope_freq_factors`` (llama.cpp's ``rope_freqs.weight``) divide frequency ``i`` by factor ``i``.
    ModelConfig rejects any other scaling type.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = rope_type(scaling)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float64)
    return inv_freq


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.eps = config.rms_norm_eps
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.qkv_proj = nn.Linear(h, (config.num_heads + 2 * config.num_kv_heads) * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)
        self.gate_up_proj = nn.Linear(h, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)
        self.scale = d**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        h = rms_norm(x, self.input_layernorm, self.eps)
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(h).view(t, nh + 2 * nkv, d)
        apply_rope_(qkv[:, : nh + nkv], cos, sin)
        attn = paged_attention(qkv[:, :nh], qkv[:, nh:], kv, meta, self.scale)
        x = x + self.o_proj(attn.view(t, nh * d))
        h = rms_norm(x, self.post_attention_layernorm, self.eps)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate).mul_(up))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in float32 as Hugging Face Llama computes it. Written out because
    torch's fused CPU kernel (``F.rms_norm``) is ~14x slower on prefill-sized inputs."""
    xf = x.float()
    normed = torch.mul(xf, xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_())
    return normed.to(x.dtype).mul_(weight)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE (Hugging Face layout), in place. x: [T, heads, D]; cos: [T, 1, D]; ``sin``
    has its first half negated, so rotate_half(x) * sin == roll(x, D/2) * sin."""
    torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin, out=x)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE tables stay float32 whatever the model dtype; built on first use on its device.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and first-half-negated sin for every position, [max_positions, head_dim] float32."""
        if self._rope is None or self._rope[0].device != device:
            pos = torch.arange(self.config.max_position_embeddings, dtype=torch.float64)
            freqs = pos[:, None] * rope_inv_freq(self.config)[None, :]
            cos = freqs.cos().repeat(1, 2)
            sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
            self._rope = (cos.float().to(device), sin.float().to(device))
        return self._rope

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[LayerKV],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; ``kv_caches``: each layer's K/V (see attention.py).
        Returns final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos_table, sin_table = self._rope_tables(x.device)
        cos = cos_table[positions].to(x.dtype)[:, None, :]
        sin = sin_table[positions].to(x.dtype)[:, None, :]
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta)
        return rms_norm(x, self.norm, self.config.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor]) -> "LlamaModel":
        """Build the model straight from loaded weights, skipping random initialisation."""
        with torch.device("meta"):
            model = cls(config)
        dtype = state["embed_tokens.weight"].dtype
        model = model.to_empty(device="cpu").to(dtype)
        model.load_weights(state)
        return model.requires_grad_(False)  # inference only (RoPE writes in place)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named weights (no ``model.`` prefix), fusing q/k/v and gate/up."""
        with torch.no_grad():
            if self.config.tie_word_embeddings:  # re-tie: to_empty() gives each its own tensor
                self.lm_head.weight = self.embed_tokens.weight
            self.embed_tokens.weight.copy_(state["embed_tokens.weight"])
            self.norm.copy_(state["norm.weight"])
            if not self.config.tie_word_embeddings:
                self.lm_head.weight.copy_(state["lm_head.weight"])
            for i, layer in enumerate(self.layers):
                p = f"layers.{i}."
                layer.input_layernorm.copy_(state[p + "input_layernorm.weight"])
                layer.post_attention_layernorm.copy_(state[p + "post_attention_layernorm.weight"])
                layer.qkv_proj.weight.copy_(
                    torch.cat([state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
                )
                layer.o_proj.weight.copy_(state[p + "self_attn.o_proj.weight"])
                layer.gate_up_proj.weight.copy_(
                    torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]], dim=0)
                )
                layer.down_proj.weight.copy_(state[p + "mlp.down_proj.weight"])
