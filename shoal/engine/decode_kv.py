"""A padded copy of the running decodes' K/V, carried from step to step.

Paged decode attention gathers every decode's blocks into one padded batch per layer and step: a
copy of the whole context, which on a CPU costs about as much as the attention itself. From one
step to the next the decode batch is usually the same requests, one token further, so last step's
padded copy is still right but for one new token per request. This buffer keeps it: the layers
write each step's new K/V into it, and it is rebuilt with one gather (with room to grow) only
when the batch changes, a request outgrows it, or the cache was written from outside.

The buffer may hold another dtype than the cache (the runner keeps a bf16 model's one or two
decodes in float32, where the matmuls cost a third less); a change of dtype is a rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeKVPlan:
    """What this step does with the buffer; ``buffers[layer]`` is ``[2 * kv_heads, decodes,
    capacity, head_dim]``. On a rebuild the layers gather the padded block tables into it; else
    they write the new token of decode ``i`` at row ``i * capacity + context_len_i - 1``."""

    buffers: list[torch.Tensor]
    rebuild: bool
    write_index: torch.Tensor | None


class DecodeKVBuffer:
    """Holds the buffer of one engine; at most ``max_bytes`` (otherwise decodes gather every step)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int, headroom_blocks: int = 2) -> None:
        self.shape = (num_layers, 2 * num_kv_heads, head_dim)
        self.block_size = block_size
        self.dtype, self.device = dtype, device
        self.max_bytes = max_bytes
        self.headroom_blocks = headroom_blocks
        self._storage = torch.empty(0, dtype=dtype, device=device)  # in the dtype last asked for
        self._key: tuple | None = None  # (request ids, kv version, dtype) it holds
        self._context_lens: list[int] = []
        self._capacity = 0  # tokens per request

    def plan(self, req_ids: list[str], context_lens: list[int], max_blocks: int, kv_version: int,
             dtype: torch.dtype | None = None) -> DecodeKVPlan | None:
        """Decide for this step's decodes (in plan order), held in ``dtype`` (the cache's unless
        given). ``max_blocks`` is the longest block table; on a rebuild the caller pads the tables
        to :attr:`capacity_blocks`. None: too big, gather as usual."""
        layers, heads, d = self.shape
        dtype = dtype or self.dtype
        key = (tuple(req_ids), kv_version, dtype)
        n = len(req_ids)
        if (key == self._key and max(context_lens) <= self._capacity
                and all(c == p + 1 for c, p in zip(context_lens, self._context_lens))):
            self._context_lens = list(context_lens)
            rows = torch.arange(n, device=self.device) * self._capacity
            write = rows + torch.tensor(context_lens, device=self.device) - 1
            return DecodeKVPlan(self._views(n), rebuild=False, write_index=write)
        capacity = (max_blocks + self.headroom_blocks) * self.block_size
        numel = layers * heads * n * capacity * d
        storage = self._storage if self._storage.dtype == dtype else torch.empty(0, dtype=dtype, device=self.device)
        if numel * storage.element_size() > self.max_bytes:
            self._key = None
            return None
        if storage.numel() < numel:  # grow geometrically: few reallocations as a batch fills
            limit = self.max_bytes // storage.element_size()
            storage = torch.empty(min(max(numel, 2 * storage.numel()), limit), dtype=dtype, device=self.device)
        self._storage = storage  # one dtype at a time: a switch frees the other's memory
        self._key, self._context_lens, self._capacity = key, list(context_lens), capacity
        return DecodeKVPlan(self._views(n), rebuild=True, write_index=None)

    @property
    def capacity_blocks(self) -> int:
        return self._capacity // self.block_size

    def _views(self, n: int) -> list[torch.Tensor]:
        layers, heads, d = self.shape
        per_layer = heads * n * self._capacity * d
        data = self._storage[: layers * per_layer].view(layers, heads, n, self._capacity, d)
        return list(data.unbind(0))
