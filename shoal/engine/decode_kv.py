"""A padded copy of the running decodes' K/V, carried from step to step, one row per decode.

Paged decode attention gathers every decode's blocks into one padded batch per layer and step: a
copy of the whole context, which on a CPU costs about as much as the attention itself. From one
step to the next most decodes are the same requests, one token further, so their rows of last
step's copy are still right but for the new token. This buffer keeps them: a request keeps its row
while it decodes; the layers write each step's new K/V into the rows and gather from the cache only
the rows of requests that joined (or that the compaction below moved). Rows stay packed in
``[0, decodes)``, so the batched matmuls see no holes: a request that leaves frees its row for the
next joiner, and a request in a row past the batch's new end is gathered into a freed row. A row
past the batch's end keeps its K/V until it is reused, so a request that sits a step out comes back
to it.

The whole buffer is rebuilt (every row gathered, with room to grow) only when a request outgrows
its rows' capacity, the batch outgrows the rows, or the cache was written from outside. It may hold
another dtype than the cache (the runner keeps a bf16 model's one or two decodes in float32, where
the matmuls cost a third less), in a layout of its own beside the cache dtype's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodeKVPlan:
    """What this step does with the buffer. ``buffers[layer]`` is ``[2, rows, kv_heads, capacity,
    head_dim]`` (K, then V); decode ``i`` (in the caller's order) sits in row ``rows[i]``, and the
    decodes fill rows ``0 .. len(rows) - 1``. The rows of ``fills`` (indices into the caller's
    decodes) are gathered from the cache this step, over the whole capacity (the block tables
    padded with any block), so no row the attention reads holds uninitialized memory; every row's
    new token is written at ``write_index`` of the ``[2, rows * kv_heads * capacity, head_dim]`` view."""

    buffers: list[torch.Tensor]
    rows: list[int]
    fills: list[int]
    write_index: torch.Tensor
    rebuild: bool  # every row is gathered (a new layout)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[3]


@dataclass
class _Layout:
    """The buffer in one dtype: its storage, shape, and which request each row holds."""

    storage: torch.Tensor
    rows: int = 0
    capacity: int = 0  # tokens per row
    kv_version: int | None = None  # of the cache when the rows were filled; None: nothing held
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> (row, context length written)


class DecodeKVBuffer:
    """Holds the buffer of one engine: a layout per dtype asked for (so the one or two float32
    decodes of a moment leave the bf16 rows in place), each at most ``max_bytes`` (otherwise
    decodes gather every step)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int, headroom_blocks: int = 2) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size = block_size
        self.dtype, self.device = dtype, device
        self.max_bytes = max_bytes
        self.headroom_blocks = headroom_blocks
        self._layouts: dict[torch.dtype, _Layout] = {}

    def plan(self, req_ids: list[str], context_lens: list[int], kv_version: int,
             dtype: torch.dtype | None = None) -> DecodeKVPlan | None:
        """Place this step's decodes, held in ``dtype`` (the cache's unless given). None: the
        buffer would be too big, gather as usual."""
        dtype = dtype or self.dtype
        lay = self._layouts.setdefault(dtype, _Layout(torch.empty(0, dtype=dtype, device=self.device)))
        n, longest = len(req_ids), max(context_lens)
        rebuild = kv_version != lay.kv_version or n > lay.rows or longest > lay.capacity
        if rebuild:
            lay.held = {}
            if not self._allocate(lay, n, -(-longest // self.block_size)):
                lay.kv_version = None
                return None
        lay.kv_version = kv_version
        rows: list[int | None] = [None] * n
        for i, (rid, length) in enumerate(zip(req_ids, context_lens)):  # one token further, in [0, n)
            row, written = lay.held.get(rid, (n, 0))
            if row < n and written == length - 1:
                rows[i] = row
        free = iter(sorted(set(range(n)) - set(rows)))
        fills = [i for i in range(n) if rows[i] is None]
        for i in fills:
            rows[i] = next(free)
        # rows past the batch keep what they hold: a request that sat a step out (a first-token
        # step of another tenant's) comes back to its row
        lay.held = {rid: held for rid, held in lay.held.items() if held[0] >= n}
        lay.held.update((rid, (row, length)) for rid, row, length in zip(req_ids, rows, context_lens))
        by_row = sorted(range(n), key=rows.__getitem__)
        hkv, cap = self.num_kv_heads, lay.capacity
        heads = torch.arange(hkv, device=self.device)
        last = torch.tensor([context_lens[i] - 1 for i in by_row], device=self.device)
        write = ((torch.arange(n, device=self.device)[:, None] * hkv + heads) * cap + last[:, None]).reshape(-1)
        return DecodeKVPlan(self._views(lay), rows, sorted(fills, key=rows.__getitem__), write, rebuild)

    def _allocate(self, lay: _Layout, n: int, blocks: int) -> bool:
        """A new layout for ``n`` rows (its rows before, doubled while too few, room allowing) of
        ``blocks`` plus headroom. Storage only grows, geometrically, so that fresh memory (its first
        touch costs as much as the copy) is rarely taken."""
        capacity = (blocks + self.headroom_blocks) * self.block_size
        per_row = self.num_layers * 2 * self.num_kv_heads * capacity * self.head_dim
        limit = self.max_bytes // lay.storage.element_size()
        roomy = lay.rows if n <= lay.rows else max(n, 2 * lay.rows)
        rows = next((r for r in (roomy, n) if r * per_row <= limit), None)
        if rows is None:
            return False
        if lay.storage.numel() < rows * per_row:
            size = min(max(rows * per_row, 2 * lay.storage.numel()), limit)
            lay.storage = torch.empty(0, dtype=lay.storage.dtype, device=self.device)  # freed first
            lay.storage = torch.empty(size, dtype=lay.storage.dtype, device=self.device)
        lay.rows, lay.capacity = rows, capacity
        return True

    def _views(self, lay: _Layout) -> list[torch.Tensor]:
        shape = (self.num_layers, 2, lay.rows, self.num_kv_heads, lay.capacity, self.head_dim)
        numel = self.num_layers * 2 * lay.rows * self.num_kv_heads * lay.capacity * self.head_dim
        return list(lay.storage[:numel].view(shape).unbind(0))
