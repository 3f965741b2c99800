"""Executes a :class:`StepPlan` on the device: KV copies, one forward pass, logits of sampled rows."""

from __future__ import annotations

import torch

from shoal.engine.scheduler import ScheduledChunk, StepPlan
from shoal.engine.decode_kv import DecodeKVBuffer
from shoal.model.attention import AttentionMetadata, LayerKV, PrefillMeta, decode_gather_index, gather_index
from shoal.model.config import ModelConfig
from shoal.model.llama import LlamaModel

# A bf16 / fp16 model on a CPU keeps the K/V of this many decodes or fewer in float32 for attention:
# there its batched matmuls are overhead-bound and run ~2x faster in float32 (a single stream's
# step -15%), while from 3-4 decodes on the bf16 kernels win.
FLOAT32_DECODE_ROWS = 2


class KVCache:
    """Device KV blocks, one tensor ``[layers, 2 * kv_heads, blocks, block_size, head_dim]`` (K's
    heads then V's; ``k`` and ``v`` are views of its halves), a swap pool of the same block shape in
    host memory, and the second prefix tier (:mod:`shoal.engine.kv_tier`) in the whole tensor's shape:
    in host memory, or in a file on local disk (``tier_path``, memory-mapped). Blocks are dimension 2."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        num_swap_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        num_tier_blocks: int = 0,
        tier_path: str | None = None,
    ) -> None:
        hkv = config.num_kv_heads
        self.num_blocks = num_blocks
        self.data = torch.zeros((config.num_layers, 2 * hkv, num_blocks, block_size, config.head_dim),
                                dtype=dtype, device=device)
        self.k, self.v = self.data[:, :hkv], self.data[:, hkv:]
        swap_shape = (config.num_layers, config.num_kv_heads, num_swap_blocks, block_size, config.head_dim)
        pin = device.type == "cuda"
        self.swap_k = torch.zeros(swap_shape, dtype=dtype, pin_memory=pin)
        self.swap_v = torch.zeros(swap_shape, dtype=dtype, pin_memory=pin)
        tier_shape = (config.num_layers, 2 * hkv, num_tier_blocks, block_size, config.head_dim)
        if tier_path is not None and num_tier_blocks:
            numel = config.num_layers * 2 * hkv * num_tier_blocks * block_size * config.head_dim
            self.tier = torch.from_file(tier_path, shared=True, size=numel, dtype=dtype).view(tier_shape)
        else:
            self.tier = torch.zeros(tier_shape, dtype=dtype, pin_memory=pin and num_tier_blocks > 0)
        self.layers = list(self.data.unbind(0))
        self.version = 0  # bumped by every write to device blocks that does not come from a forward pass

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src, dst = _index(pairs, self.k.device)
            self.swap_k[:, :, dst.cpu()] = self.k[:, :, src].cpu()
            self.swap_v[:, :, dst.cpu()] = self.v[:, :, src].cpu()  # reads only: the version stays

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src, dst = _index(pairs, self.k.device)
            self.k[:, :, dst] = self.swap_k[:, :, src.cpu()].to(self.k.device, non_blocking=True)
            self.v[:, :, dst] = self.swap_v[:, :, src.cpu()].to(self.v.device, non_blocking=True)
            self.version += 1

    def tier_copies(self, copies_out: list[tuple[int, int]], copies_in: list[tuple[int, int]]) -> None:
        """Demotions (device block -> tier slot), then loads (tier slot -> device block)."""
        if copies_out:
            src, dst = _index(copies_out, self.data.device)
            self.tier[:, :, dst.cpu()] = self.data[:, :, src].to(self.tier.device)
        if copies_in:
            src, dst = _index(copies_in, self.data.device)
            self.data[:, :, dst] = self.tier[:, :, src.cpu()].to(self.data.device, non_blocking=True)
            self.version += 1

    def read(self, block_ids: list[int], swapped: bool = False) -> torch.Tensor:
        """Copy blocks out as one CPU tensor ``[2, layers, kv_heads, n, block_size, head_dim]``."""
        k, v = (self.swap_k, self.swap_v) if swapped else (self.k, self.v)
        idx = torch.tensor(block_ids, dtype=torch.long, device=k.device)
        return torch.stack([k[:, :, idx], v[:, :, idx]]).cpu()

    def write(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Inverse of :meth:`read`, into device blocks."""
        expected = (2, *self.k.shape[:2], len(block_ids), *self.k.shape[3:])
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        self.k[:, :, idx] = data[0].to(self.k.device, self.k.dtype)
        self.v[:, :, idx] = data[1].to(self.v.device, self.v.dtype)
        self.version += 1


def _index(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(pairs, dtype=torch.long, device=device)
    return t[:, 0], t[:, 1]


class ModelRunner:
    """Turns a step plan into model inputs and returns the logits of the rows to sample."""

    def __init__(self, model: LlamaModel, kv: KVCache, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.device = device
        cfg = model.config
        # The buffer repeats the decodes' KV, padded. Host memory is plentiful beside the CPU's KV pool,
        # so there it may grow as large as the pool (a quarter made fp32 decodes of 32 requests past
        # ~150 tokens fall back to gathering every step); on an accelerator it takes a quarter.
        pool_bytes = kv.data.numel() * kv.data.element_size()
        self._half_on_cpu = device.type == "cpu" and kv.data.dtype in (torch.bfloat16, torch.float16)
        self.decode_kv = DecodeKVBuffer(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, kv.data.dtype,
                                        device, max_bytes=pool_bytes if device.type == "cpu" else pool_bytes // 4)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan. Returns float32 logits ``[rows, vocab]`` in chunk order: one row per sampled
        chunk, ``1 + num_drafts`` for a chunk with drafts."""
        self.kv.swap_out(plan.swap_out)
        self.kv.tier_copies(plan.tier_out, [])
        self.kv.swap_in(plan.swap_in)
        self.kv.tier_copies([], plan.tier_in)
        if not plan.chunks:
            return torch.empty(0, self.model.config.vocab_size)
        input_ids, positions, meta, sample_rows, layers = self._prepare(plan.chunks)
        hidden = self.model(input_ids, positions, layers, meta)
        return self.model.compute_logits(hidden[sample_rows]).float()

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[LayerKV]]:
        bs, dev = self.block_size, self.device
        nb, hkv = self.kv.num_blocks, self.model.config.num_kv_heads
        decodes = [c for c in chunks if c.num_tokens == 1 and c.sample]
        nd = len(decodes)
        assert chunks[:nd] == decodes, "decodes must come first in the plan"
        decode_plan = None
        rows = list(range(nd))  # the token row of each decode
        if nd:
            in_float32 = self._half_on_cpu and nd <= FLOAT32_DECODE_ROWS
            decode_plan = self.decode_kv.plan([c.req_id for c in decodes], [c.context_len for c in decodes],
                                              self.kv.version, torch.float32 if in_float32 else None)
            if decode_plan is not None:
                rows = decode_plan.rows
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillMeta] = []
        in_rows = list(decodes)
        for c, row in zip(decodes, rows):
            in_rows[row] = c
        for c in in_rows + chunks[nd:]:  # decodes in their buffer rows, then prefill chunks
            q_start = len(tokens)
            tokens.extend(c.token_ids)
            pos = range(c.start, c.context_len)
            positions.extend(pos)
            table = c.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if q_start >= nd:
                n_blocks = -(-c.context_len // bs)
                mask = None
                if c.start > 0:
                    q = torch.arange(c.start, c.context_len, device=dev)[:, None]
                    mask = torch.arange(c.context_len, device=dev)[None, :] <= q
                prefills.append(
                    PrefillMeta(
                        q_start=q_start,
                        q_len=c.num_tokens,
                        ctx_len=c.context_len,
                        gather_index=gather_index(torch.tensor(table[:n_blocks], device=dev), nb, hkv),
                        mask=mask,
                    )
                )
        sample_rows = list(rows)  # in chunk order: one row per decode, then the sampled prefill rows
        end = nd
        for c in chunks[nd:]:
            end += c.num_tokens
            if c.sample:  # the last row, and the rows that score the drafts before it
                sample_rows.extend(range(end - 1 - c.num_drafts, end))
        fill_index = fill_rows = decode_mask = None
        if nd:
            lens = [c.context_len for c in in_rows]
            width = decode_plan.capacity // bs if decode_plan else -(-max(lens) // bs)  # blocks a row holds
            fills = decode_plan.fills if decode_plan else list(range(nd))
            if fills:
                tables = [(t := decodes[i].block_table[:width]) + [0] * (width - len(t)) for i in fills]
                fill_index = decode_gather_index(torch.tensor(tables, device=dev), nb, hkv)
                if decode_plan:
                    fill_rows = torch.tensor([rows[i] for i in fills], device=dev)
            # Attention reads only up to the longest context, except in CPU bf16 / fp16, where a
            # batched matmul over a sliced (strided) view copies it first: there the buffer's whole
            # padded width is cheaper (measured 0.36 vs 0.74 ms per layer at 32 decodes).
            span = width * bs if self._half_on_cpu and not (decode_plan and in_float32) else max(lens)
            valid = torch.arange(span, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
            decode_mask = torch.zeros(valid.shape, device=dev).masked_fill_(~valid, float("-inf"))[:, None, None, :]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=nd,
            decode_fill_index=fill_index,
            decode_mask=decode_mask,
            prefills=prefills,
            decode_fill_rows=fill_rows,
            decode_rebuild=decode_plan is not None and decode_plan.rebuild,
            decode_write_index=decode_plan.write_index if decode_plan else None,
        )
        if decode_plan is None:
            layers = [LayerKV(c) for c in self.kv.layers]
        else:
            layers = [LayerKV(c, b) for c, b in zip(self.kv.layers, decode_plan.buffers)]
        return (
            torch.tensor(tokens, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            meta,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
            layers,
        )
