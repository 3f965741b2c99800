"""A padded copy of the running decodes' K/V, carried from step to step, one row per decode.

Paged decode attention gathers every decode's blocks into one padded batch per layer and step: a
copy of the whole context, which on a CPU costs about as much as the attention itself. From one
step to the next most decodes are the same requests, one token further, so their rows of last
step's copy are still right but for the new token. This buffer keeps them: a request keeps its row
while it decodes; the layers write each step's new K/V into the rows and gather from the cache only
the rows of requests that joined (or that the compaction below moved). Rows stay packed in
``[0, decodes)``, so the batched matmuls see no holes: a request that leaves frees its row for the
next joiner, and a request in a row past the batch's new end is gathered into a freed row.

The whole buffer is rebuilt (every row gathered, with room to grow) only when a request outgrows
its rows' capacity, the batch outgrows the rows, the cache was written from outside, or the dtype
changes: it may hold another dtype than the cache (the runner keeps a bf16 model's one or two
decodes in float32, where the matmuls cost a third less).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_ROWS = 8  # rows a first layout has room for, so a batch growing from one rebuilds rarely


@dataclass
class DecodeKVPlan:
    """What this step does with the buffer. ``buffers[layer]`` is ``[2, rows, kv_heads, capacity,
    head_dim]`` (K, then V); decode ``i`` (in the caller's order) sits in row ``rows[i]``, and the
    decodes fill rows ``0 .. len(rows) - 1``. The rows of ``fills`` (indices into the caller's
    decodes) are gathered from the cache this step; every row's new token is written at
    ``write_index`` of the ``[2, rows * kv_heads * capacity, head_dim]`` view."""

    buffers: list[torch.Tensor]
    rows: list[int]
    fills: list[int]
    write_index: torch.Tensor
    rebuild: bool  # every row is gathered (a new layout)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[3]


class DecodeKVBuffer:
    """Holds the buffer of one engine; at most ``max_bytes`` (otherwise decodes gather every step)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int, headroom_blocks: int = 2) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size = block_size
        self.dtype, self.device = dtype, device
        self.max_bytes = max_bytes
        self.headroom_blocks = headroom_blocks
        self._storage = torch.empty(0, dtype=dtype, device=device)  # in the dtype last asked for
        self._kv_version: int | None = None  # of the cache when the rows were filled; None: nothing held
        self._rows = 0  # rows the layout has room for
        self._capacity = 0  # tokens per row
        self._held: dict[str, tuple[int, int]] = {}  # request id -> (row, context length written)

    def plan(self, req_ids: list[str], context_lens: list[int], kv_version: int,
             dtype: torch.dtype | None = None) -> DecodeKVPlan | None:
        """Place this step's decodes, held in ``dtype`` (the cache's unless given). None: the
        buffer would be too big, gather as usual."""
        dtype = dtype or self.dtype
        n, longest = len(req_ids), max(context_lens)
        rebuild = (kv_version != self._kv_version or dtype != self._storage.dtype or n > self._rows
                   or longest > self._capacity)
        if rebuild and not self._allocate(n, -(-longest // self.block_size), dtype):
            self._kv_version, self._held = None, {}
            return None
        self._kv_version = kv_version
        rows: list[int | None] = [None] * n
        if not rebuild:  # keep the rows of requests that decoded last step and still fit in [0, n)
            for i, (rid, length) in enumerate(zip(req_ids, context_lens)):
                row, written = self._held.get(rid, (n, 0))
                if row < n and written == length - 1:
                    rows[i] = row
        free = iter(sorted(set(range(n)) - set(rows)))
        fills = [i for i in range(n) if rows[i] is None]
        for i in fills:
            rows[i] = next(free)
        self._held = {rid: (row, length) for rid, row, length in zip(req_ids, rows, context_lens)}
        by_row = sorted(range(n), key=rows.__getitem__)
        hkv, cap = self.num_kv_heads, self._capacity
        heads = torch.arange(hkv, device=self.device)
        last = torch.tensor([context_lens[i] - 1 for i in by_row], device=self.device)
        write = ((torch.arange(n, device=self.device)[:, None] * hkv + heads) * cap + last[:, None]).reshape(-1)
        return DecodeKVPlan(self._views(), rows, sorted(fills, key=rows.__getitem__), write, rebuild)

    def _allocate(self, n: int, blocks: int, dtype: torch.dtype) -> bool:
        """A new layout for ``n`` rows (doubling the rows, at least ``MIN_ROWS``, room allowing) of
        ``blocks`` plus headroom.
        Storage is zeroed when allocated, so padding never holds a NaN."""
        capacity = (blocks + self.headroom_blocks) * self.block_size
        per_row = self.num_layers * 2 * self.num_kv_heads * capacity * self.head_dim
        storage = self._storage if self._storage.dtype == dtype else torch.empty(0, dtype=dtype, device=self.device)
        limit = self.max_bytes // storage.element_size()
        roomy = self._rows if n <= self._rows else max(n, 2 * self._rows, MIN_ROWS)
        rows = next((r for r in (roomy, n) if r * per_row <= limit), None)
        if rows is None:
            return False
        if storage.numel() < rows * per_row:  # grow geometrically: few reallocations as a batch fills
            storage = torch.zeros(min(max(rows * per_row, 2 * storage.numel()), limit), dtype=dtype,
                                  device=self.device)
        self._storage = storage  # one dtype at a time: a switch frees the other's memory
        self._rows, self._capacity = rows, capacity
        return True

    def _views(self) -> list[torch.Tensor]:
        shape = (self.num_layers, 2, self._rows, self.num_kv_heads, self._capacity, self.head_dim)
        numel = self.num_layers * 2 * self._rows * self.num_kv_heads * self._capacity * self.head_dim
        return list(self._storage[:numel].view(shape).unbind(0))
