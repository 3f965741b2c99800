"""Attention over a paged KV cache.

The cache of one layer is a tensor ``[num_kv_heads, num_blocks, block_size, head_dim]`` for K and
the same for V: head-major, so gathering a batch's blocks with one ``index_select`` yields the
``[heads, batch, context, head_dim]`` layout the batched matmuls want, with no further copy. A step's tokens are laid out decodes first (one query each), then prefill chunks.
New K/V are written to their slots, then

* all decodes attend together: their blocks are gathered into one padded batch and a masked,
  grouped-query attention runs as two batched matmuls;
* each prefill chunk runs one SDPA call: causally over its own fresh K/V when it starts at position
  0, otherwise over its gathered context with an offset causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillMeta:
    """One prefill chunk: query rows ``[q_start, q_start + q_len)`` at positions
    ``[ctx_len - q_len, ctx_len)``; ``block_table`` covers the whole context."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: torch.Tensor  # [num_blocks] long
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, None when the chunk starts at 0


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] long: block * block_size + offset for each token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [D * max_blocks] long, row-major, padded with 0
    decode_mask: torch.Tensor | None  # [1, D, 1, max_blocks * block_size] additive float mask
    prefills: list[PrefillMeta]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's K/V ([T, Hkv, D]) into their cache slots."""
    hkv, _, _, d = k_cache.shape
    k_cache.view(hkv, -1, d).index_copy_(1, slots, k.transpose(0, 1))
    v_cache.view(hkv, -1, d).index_copy_(1, slots, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (this step's, already written to the cache).
    Returns [T, H, D]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    for p in meta.prefills:
        rows = slice(p.q_start, p.q_start + p.q_len)
        if p.mask is None:
            kc, vc = k[rows], v[rows]
            kc, vc = kc.transpose(0, 1), vc.transpose(0, 1)
        else:
            kc = _gather(k_cache, p.block_table, 1)[:, 0, : p.ctx_len]
            vc = _gather(v_cache, p.block_table, 1)[:, 0, : p.ctx_len]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            kc.unsqueeze(0),
            vc.unsqueeze(0),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Blocks of ``batch`` equally long block tables (flattened) -> [Hkv, batch, context, D]."""
    hkv, _, bs, d = cache.shape
    return cache.index_select(1, block_ids).view(hkv, batch, -1, d)


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Single-query attention for a batch of decodes: [D, H, Dh] -> [D, H, Dh]."""
    n, h, dh = q.shape
    hkv = k_cache.shape[0]
    kc = _gather(k_cache, meta.decode_block_tables, n)  # [Hkv, D, L, Dh]
    vc = _gather(v_cache, meta.decode_block_tables, n)
    qg = q.view(n, hkv, h // hkv, dh).transpose(0, 1).contiguous()  # [Hkv, D, G, Dh]
    scores = torch.matmul(qg, kc.transpose(-1, -2)).float()  # [Hkv, D, G, L]
    scores = torch.add(meta.decode_mask, scores, alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, vc)  # [Hkv, D, G, Dh]
    return out.transpose(0, 1).reshape(n, h, dh)
