"""Attention over a paged KV cache.

The cache of one layer is one tensor ``[2 * num_kv_heads, num_blocks, block_size, head_dim]``: K's
heads, then V's. It is head-major, so gathering a batch's blocks for K and V at once with one
``index_select`` over its ``[2 * num_kv_heads * num_blocks, block_size * head_dim]`` view (a plain
row copy) yields the ``[heads, batch, context, head_dim]`` layout the batched matmuls want, with no
further copy. A step's tokens are laid out decodes first (one query each), then prefill chunks.
New K/V are written to their slots, then

* all decodes attend together: their blocks are gathered into one padded batch and a masked,
  grouped-query attention runs as two batched matmuls;
* each prefill chunk runs one SDPA call: causally over its own fresh K/V when it starts at position
  0, otherwise over its gathered context with an offset causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass
class PrefillMeta:
    """One prefill chunk: query rows ``[q_start, q_start + q_len)`` at positions
    ``[ctx_len - q_len, ctx_len)``; ``gather_index`` covers the whole context."""

    q_start: int
    q_len: int
    ctx_len: int
    gather_index: torch.Tensor  # rows of the cache's row view holding the context (see gather_index)
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, None when the chunk starts at 0


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] long: block * block_size + offset for each token
    num_decodes: int
    decode_gather_index: torch.Tensor | None  # gather_index of the D block tables, padded to max_blocks
    decode_mask: torch.Tensor | None  # [1, D, 1, context span] additive float mask
    prefills: list[PrefillMeta]
    # with LayerKV.decode buffers: gather into them (the tables padded to their capacity), or write
    # the new token of decode i at row decode_write_index[i] of their [2 * Hkv, D * capacity] view
    decode_rebuild: bool = False
    decode_write_index: torch.Tensor | None = None


class LayerKV(NamedTuple):
    """One layer's paged cache and, optionally, the padded K/V of the step's decodes
    ``[2 * Hkv, D, capacity, head_dim]`` kept from the previous step (see engine/decode_kv.py)."""

    cache: torch.Tensor
    decode: torch.Tensor | None = None


def gather_index(block_ids: torch.Tensor, num_blocks: int, num_kv_heads: int) -> torch.Tensor:
    """Rows of a layer cache's ``[2 * num_kv_heads * num_blocks, block_size * head_dim]`` view that
    hold ``block_ids`` (flattened equal-length block tables) for every K and V head, head-major."""
    heads = torch.arange(2 * num_kv_heads, device=block_ids.device)[:, None] * num_blocks
    return (heads + block_ids[None, :]).reshape(-1)


def write_kv(cache: torch.Tensor, new_kv: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's K/V (``new_kv`` [T, 2 * Hkv, D]: K's heads then V's) into their cache slots."""
    cache.view(cache.shape[0], -1, cache.shape[-1]).index_copy_(1, slots, new_kv.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,
    new_kv: torch.Tensor,
    kv: LayerKV,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; new_kv: [T, 2 * Hkv, D], this step's K heads then V heads (written to the cache
    here). Returns [T, H, D]."""
    cache = kv.cache
    write_kv(cache, new_kv, meta.slot_mapping)
    nd = meta.num_decodes
    if nd:
        if kv.decode is None:
            ctx = _gather(cache, meta.decode_gather_index, nd)
        else:
            ctx = _decode_context(kv.decode, cache, new_kv[:nd], meta)
        decoded = _decode_attention(q[:nd], ctx, meta.decode_mask, scale)
        if not meta.prefills:
            return decoded
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decoded
    hkv = new_kv.shape[1] // 2
    k, v = new_kv[:, :hkv], new_kv[:, hkv:]
    for p in meta.prefills:
        rows = slice(p.q_start, p.q_start + p.q_len)
        if p.mask is None:
            kc, vc = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            ctx = _gather(cache, p.gather_index, 1)[:, 0, : p.ctx_len]
            kc, vc = ctx[:hkv], ctx[hkv:]
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


def _gather(cache: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """The blocks that ``index`` (from :func:`gather_index`) names, for ``batch`` equally long block
    tables -> [2 * Hkv, batch, context, D]."""
    h2, nb, bs, d = cache.shape
    return cache.view(h2 * nb, bs * d).index_select(0, index).view(h2, batch, -1, d)


def _decode_context(buf: torch.Tensor, cache: torch.Tensor, new_kv: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """Bring the decodes' padded K/V buffer up to date: one gather on a rebuild, else only the new
    token of each decode (``new_kv`` [D, 2 * Hkv, Dh])."""
    h2, n, cap, d = buf.shape
    rows, out = cache.view(-1, cache.shape[2] * d), buf.view(-1, cache.shape[2] * d)
    if meta.decode_rebuild and buf.dtype == cache.dtype:
        torch.index_select(rows, 0, meta.decode_gather_index, out=out)
    elif meta.decode_rebuild:  # a float32 buffer beside a bf16 / fp16 cache (see ModelRunner)
        out.copy_(rows.index_select(0, meta.decode_gather_index))
    else:
        new = new_kv.transpose(0, 1)
        new = new if new.dtype == buf.dtype else new.to(buf.dtype)
        buf.view(h2, n * cap, d).index_copy_(1, meta.decode_write_index, new)
    return buf


def _decode_attention(q: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Single-query attention for a batch of decodes: q [D, H, Dh], ctx [2 * Hkv, D, capacity, Dh]
    (K's heads then V's), additive mask [1, D, 1, L] with L <= capacity -> [D, H, Dh]. Only the first
    L positions are read: batched matmuls over strided [batch, L, Dh] views, so nothing is copied.
    The matmuls run in ``ctx``'s dtype (float32 for a bf16 model's few decodes: see ModelRunner)."""
    n, h, dh = q.shape
    h2, _, cap, _ = ctx.shape
    hkv, g, span = h2 // 2, h // (h2 // 2), mask.shape[-1]
    rows = ctx.view(h2 * n, cap, dh)[:, :span]
    kc, vc = rows[: hkv * n], rows[hkv * n :]
    widen = ctx.dtype != q.dtype
    qg = q.view(n, hkv, g, dh).transpose(0, 1).reshape(hkv * n, g, dh)
    scores = torch.bmm(qg.to(ctx.dtype) if widen else qg, kc.transpose(1, 2)).view(hkv, n, g, span).float()
    scores = torch.add(mask, scores, alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(ctx.dtype).view(hkv * n, g, span)
    out = torch.bmm(probs, vc).view(hkv, n, g, dh).transpose(0, 1).reshape(n, h, dh)  # from [Hkv * D, G, Dh]
    return out.to(q.dtype) if widen else out
