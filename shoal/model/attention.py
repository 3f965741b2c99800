"""Attention over a paged KV cache.

The cache of one layer is one tensor ``[2 * num_kv_heads, num_blocks, block_size, head_dim]``: K's
heads, then V's. Gathering blocks for K and V at once is one ``index_select`` over its
``[2 * num_kv_heads * num_blocks, block_size * head_dim]`` view (a plain row copy), whose row order
gives the layout the matmuls want with no further copy: ``[heads, context, head_dim]`` for a prefill
chunk, ``[2, decodes, kv_heads, context, head_dim]`` for the decodes (:func:`decode_gather_index`). A step's tokens are laid out decodes first (one query each), then prefill chunks.
New K/V are written to their slots, then

* all decodes attend together: their blocks are gathered into one padded batch ``[2, decodes,
  kv_heads, context, head_dim]`` (or kept in one from step to step, see engine/decode_kv.py) and a
  masked, grouped-query attention runs as two batched matmuls;
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
    # decode_gather_index of the decodes to gather this step, their block tables padded to one length:
    # all decodes without a LayerKV.decode buffer, else the buffer's rows in decode_fill_rows
    decode_fill_index: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [D, 1, 1, context span] additive float mask
    prefills: list[PrefillMeta]
    decode_fill_rows: torch.Tensor | None = None
    decode_rebuild: bool = False  # the rows to fill are all of them, in order
    # with a buffer: the new token of decode i and kv head h goes to row decode_write_index[i * Hkv + h]
    # of its [2, rows * Hkv * capacity, head_dim] view
    decode_write_index: torch.Tensor | None = None


class LayerKV(NamedTuple):
    """One layer's paged cache and, optionally, the padded K/V of the step's decodes
    ``[2, rows, Hkv, capacity, head_dim]`` kept from the previous step (see engine/decode_kv.py)."""

    cache: torch.Tensor
    decode: torch.Tensor | None = None


def gather_index(block_ids: torch.Tensor, num_blocks: int, num_kv_heads: int) -> torch.Tensor:
    """Rows of a layer cache's ``[2 * num_kv_heads * num_blocks, block_size * head_dim]`` view that
    hold ``block_ids`` (flattened equal-length block tables) for every K and V head, head-major."""
    heads = torch.arange(2 * num_kv_heads, device=block_ids.device)[:, None] * num_blocks
    return (heads + block_ids[None, :]).reshape(-1)


def decode_gather_index(tables: torch.Tensor, num_blocks: int, num_kv_heads: int) -> torch.Tensor:
    """Rows of that view holding ``tables`` ``[decodes, blocks]``, ordered K / V, decode, head, block:
    selecting them gives the ``[2, decodes, Hkv, blocks * block_size, head_dim]`` decode layout."""
    dev = tables.device
    heads = torch.arange(2, device=dev)[:, None, None, None] * num_kv_heads + torch.arange(
        num_kv_heads, device=dev)[None, None, :, None]
    return (heads * num_blocks + tables[None, :, None, :]).reshape(-1)


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
            ctx = _gather_decodes(cache, meta.decode_fill_index, nd)
        else:
            ctx = _update_decode_buffer(kv.decode, cache, new_kv[:nd], meta)[:, :nd]
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
            ctx = _gather_context(cache, p.gather_index)[:, : p.ctx_len]
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


def _gather_context(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The blocks that ``index`` (from :func:`gather_index`) names, for one block table
    -> [2 * Hkv, context, D]."""
    h2, nb, bs, d = cache.shape
    return cache.view(h2 * nb, bs * d).index_select(0, index).view(h2, -1, d)


def _gather_decodes(cache: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """The blocks that ``index`` (from :func:`decode_gather_index`) names -> [2, batch, Hkv, context, D]."""
    h2, nb, bs, d = cache.shape
    return cache.view(h2 * nb, bs * d).index_select(0, index).view(2, batch, h2 // 2, -1, d)


def _update_decode_buffer(buf: torch.Tensor, cache: torch.Tensor, new_kv: torch.Tensor,
                          meta: AttentionMetadata) -> torch.Tensor:
    """Bring the decodes' K/V buffer ``[2, rows, Hkv, capacity, Dh]`` up to date: gather the rows
    to fill, whole (the cache already holds this step's K/V), then write each decode's new token
    (``new_kv`` [D, 2 * Hkv, Dh], decode i in row i)."""
    _, rows, hkv, cap, d = buf.shape
    fill, index = meta.decode_fill_rows, meta.decode_fill_index
    if meta.decode_rebuild and buf.dtype == cache.dtype:  # straight into K's and V's rows, no copy between
        view, half = cache.view(-1, cache.shape[2] * d), index.numel() // 2
        for kv, part in ((0, index[:half]), (1, index[half:])):
            torch.index_select(view, 0, part, out=buf[kv, : len(fill)].view(-1, view.shape[1]))
    elif fill is not None:
        got = _gather_decodes(cache, index, len(fill))
        buf[:, fill] = got if got.dtype == buf.dtype else got.to(buf.dtype)
    new = new_kv.view(-1, 2, hkv, d).transpose(0, 1).reshape(2, -1, d)
    buf.view(2, rows * hkv * cap, d).index_copy_(1, meta.decode_write_index, new.to(buf.dtype))
    return buf


def _decode_attention(q: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Single-query attention for a batch of decodes: q [D, H, Dh], ctx [2, D, Hkv, capacity, Dh]
    (K, then V), additive mask [D, 1, 1, L] with L <= capacity -> [D, H, Dh]. Only the first L
    positions are read: batched matmuls over strided [D * Hkv, L, Dh] views, so nothing is copied.
    The matmuls run in ``ctx``'s dtype (float32 for a bf16 model's few decodes: see ModelRunner)."""
    n, h, dh = q.shape
    _, _, hkv, cap, _ = ctx.shape
    g, span = h // hkv, mask.shape[-1]
    kc = ctx[0].view(n * hkv, cap, dh)[:, :span]
    vc = ctx[1].view(n * hkv, cap, dh)[:, :span]
    widen = ctx.dtype != q.dtype
    qg = q.reshape(n * hkv, g, dh)
    scores = torch.bmm(qg.to(ctx.dtype) if widen else qg, kc.transpose(1, 2)).view(n, hkv, g, span).float()
    scores = torch.add(mask, scores, alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(ctx.dtype).view(n * hkv, g, span)
    out = torch.bmm(probs, vc).view(n, h, dh)
    return out.to(q.dtype) if widen else out
