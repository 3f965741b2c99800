"""Executes a :class:`StepPlan` on the device: KV copies, one forward pass, logits of sampled rows."""

from __future__ import annotations

import torch

from shoal.engine.scheduler import ScheduledChunk, StepPlan
from shoal.model.attention import AttentionMetadata, PrefillMeta
from shoal.model.config import ModelConfig
from shoal.model.llama import LlamaModel


class KVCache:
    """Device KV blocks ``[layers, kv_heads, blocks, block_size, head_dim]`` for K and for V, and
    a swap pool of the same block shape in host memory. Blocks are dimension 2."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        num_swap_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        swap_shape = (config.num_layers, config.num_kv_heads, num_swap_blocks, block_size, config.head_dim)
        pin = device.type == "cuda"
        self.swap_k = torch.zeros(swap_shape, dtype=dtype, pin_memory=pin)
        self.swap_v = torch.zeros(swap_shape, dtype=dtype, pin_memory=pin)
        self.layers = [(self.k[i], self.v[i]) for i in range(config.num_layers)]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src, dst = _index(pairs, self.k.device)
            self.swap_k[:, :, dst.cpu()] = self.k[:, :, src].cpu()
            self.swap_v[:, :, dst.cpu()] = self.v[:, :, src].cpu()

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src, dst = _index(pairs, self.k.device)
            self.k[:, :, dst] = self.swap_k[:, :, src.cpu()].to(self.k.device, non_blocking=True)
            self.v[:, :, dst] = self.swap_v[:, :, src.cpu()].to(self.v.device, non_blocking=True)

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

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan. Returns float32 logits ``[num sampled chunks, vocab]`` in chunk order."""
        self.kv.swap_out(plan.swap_out)
        self.kv.swap_in(plan.swap_in)
        if not plan.chunks:
            return torch.empty(0, self.model.config.vocab_size)
        input_ids, positions, meta, sample_rows = self._prepare(plan.chunks)
        hidden = self.model(input_ids, positions, self.kv.layers, meta)
        return self.model.compute_logits(hidden[sample_rows]).float()

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs, dev = self.block_size, self.device
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        prefills: list[PrefillMeta] = []
        decodes = [c for c in chunks if c.num_tokens == 1 and c.sample]
        nd = len(decodes)
        assert chunks[:nd] == decodes, "decodes must come first in the plan"
        for c in chunks:
            q_start = len(tokens)
            tokens.extend(c.token_ids)
            pos = range(c.start, c.context_len)
            positions.extend(pos)
            table = c.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if c.sample:
                sample_rows.append(len(tokens) - 1)
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
                        block_table=torch.tensor(table[:n_blocks], dtype=torch.long, device=dev),
                        mask=mask,
                    )
                )
        decode_tables = decode_mask = None
        if nd:
            max_blocks = max(-(-c.context_len // bs) for c in decodes)
            padded: list[int] = []
            for c in decodes:
                table = c.block_table[:max_blocks]
                padded.extend(table)
                padded.extend([0] * (max_blocks - len(table)))
            decode_tables = torch.tensor(padded, dtype=torch.long, device=dev)
            ctx = torch.tensor([c.context_len for c in decodes], device=dev)
            valid = torch.arange(max_blocks * bs, device=dev)[None, :] < ctx[:, None]
            decode_mask = torch.zeros(valid.shape, device=dev).masked_fill_(~valid, float("-inf"))
            decode_mask = decode_mask[None, :, None, :]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=nd,
            decode_block_tables=decode_tables,
            decode_mask=decode_mask,
            prefills=prefills,
        )
        return (
            torch.tensor(tokens, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            meta,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
