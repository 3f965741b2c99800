"""Paged KV memory: the one owner of every device block and every swap block.

Blocks hold ``block_size`` tokens of K and V for every layer. A request owns a block table (a list
of device block ids). Full blocks are content-addressed by a hash chain over their tokens, so a
new request whose prompt starts with the same tokens reuses them (prefix caching). A block whose
reference count drops to zero stays in the cache and is reused least-recently-freed first. Pinned
blocks (agent KV retention) count as used even when no request holds them.

A swapped-out request's KV is in the swap pool (copied block by block), except, when it is swapped
out with ``keep_cached``, the leading blocks the prefix cache holds: those are only released, and
found again by their hashes at swap-in (FastSwitch's cheap context switch: a preempted request whose
prefix, or a multi-turn tenant's earlier turns, is still cached copies only its tail). If any of
them was evicted in between, the request cannot be swapped in and is recomputed instead.

With a second tier (:class:`~shoal.engine.kv_tier.PrefixTier`), an evicted cached block is demoted
to it rather than lost, and a new request's prefix continues into the blocks the tier holds: those
are loaded into fresh device blocks (the copies are handed to the step plan by :meth:`take_tier_copies`).

Invariant (checked by :meth:`check`): free + used == total, where a block is used when a request
references it or it is pinned; when no request is left, used == pinned.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from shoal.engine.kv_tier import PrefixTier


HASH_MEMO_SIZE = 64  # prompts whose prefix hash chains are kept


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation is attempted without room; callers ask ``can_*`` first."""


def hash_block(parent: int | None, tokens: Sequence[int]) -> int:
    """SHA-256 of one full block's token ids, chained to the hash of the block before it (as an int).
    A cryptographic hash: with Python's 64-bit ``hash`` a crafted prompt could collide with another
    tenant's prefix and be served its KV; this is also the same in every process."""
    head = b"" if parent is None else parent.to_bytes(32, "big")
    return int.from_bytes(hashlib.sha256(head + array("q", tokens).tobytes()).digest(), "big")


def prefix_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None,
                  salt: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (the first ``max_blocks`` of them), the
    chain seeded with ``salt`` (a tenant's: its blocks then never match another tenant's)."""
    n = len(token_ids) // block_size if max_blocks is None else min(max_blocks, len(token_ids) // block_size)
    hashes: list[int] = []
    parent: int | None = salt
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    """One device block: its reference count, pin count and content hash (when full and cached)."""

    block_id: int
    ref_count: int = 0
    pin_count: int = 0
    hash: int | None = None

    @property
    def used(self) -> bool:
        return self.ref_count > 0 or self.pin_count > 0


@dataclass
class BlockTable:
    """A request's device blocks, plus the hashes of its leading full blocks."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    salt: int | None = None  # seeds the hash chain: only requests of the same salt share blocks


@dataclass(frozen=True)
class ResidentPrefix:
    """The leading blocks a swapped-out request left in the prefix cache: their hashes and the salt
    of the table's chain."""

    hashes: tuple[int, ...]
    salt: int | None


class BlockManager:
    """Allocates device blocks and swap blocks to requests; keeps the prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_swap_blocks: int = 0,
        enable_prefix_caching: bool = True,
        tier: PrefixTier | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_swap_blocks = num_swap_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.tier = tier if enable_prefix_caching else None
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks without content first (a plain list used as a stack), then cached free
        # blocks in least-recently-freed order (evicted from the front).
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        # Recent prompts' hash chains: admission asks for the same prompt's prefix several times a
        # step, and again every step while it waits; SHA-256 is worth computing once.
        self._hash_memo: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
        self._free_swap: list[int] = list(range(num_swap_blocks - 1, -1, -1))
        self.tables: dict[str, BlockTable] = {}
        self.swapped: dict[str, list[int]] = {}  # a swapped-out request's swap blocks (after its resident prefix)
        self.resident: dict[str, ResidentPrefix] = {}  # of every swapped-out request
        self.num_used = 0
        self._num_pinned = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found (on device or in the tier)

    # ---- counts -------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold reusable content."""
        return len(self._free_cached)

    @property
    def num_pinned(self) -> int:
        return self._num_pinned

    @property
    def num_free_swap(self) -> int:
        return len(self._free_swap)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- raw block life cycle -----------------------------------------------------------------

    def _take_free(self) -> int:
        if self._free_plain:
            bid = self._free_plain.pop()
        elif self._free_cached:
            bid, _ = self._free_cached.popitem(last=False)
            blk = self.blocks[bid]
            if self._hash_to_block.get(blk.hash) == bid:
                del self._hash_to_block[blk.hash]
            if self.tier is not None:
                self.tier.demote(blk.hash, bid)  # type: ignore[arg-type]
                self.tier.cancel_load(bid)
            blk.hash = None
        else:
            raise NoFreeBlocks("no free KV blocks")
        self.num_used += 1
        return bid

    def _acquire(self, bid: int) -> None:
        blk = self.blocks[bid]
        if not blk.used:
            self._free_cached.pop(bid, None)
            self.num_used += 1
        blk.ref_count += 1

    def _release(self, bid: int) -> None:
        blk = self.blocks[bid]
        assert blk.ref_count > 0, f"block {bid} released more often than acquired"
        blk.ref_count -= 1
        if not blk.used:
            self._mark_free(blk)

    def _mark_free(self, blk: Block) -> None:
        self.num_used -= 1
        if blk.hash is not None and self._hash_to_block.get(blk.hash) == blk.block_id:
            self._free_cached[blk.block_id] = None
        else:
            blk.hash = None
            self._free_plain.append(blk.block_id)

    # ---- requests -----------------------------------------------------------------------------

    def table(self, req_id: str) -> list[int]:
        return self.tables[req_id].blocks

    def prefix_hashes(self, token_ids: list[int], max_blocks: int, salt: int | None = None) -> list[int]:
        """Chained hashes of the first ``max_blocks`` full blocks of ``token_ids`` (seeded with ``salt``)."""
        key = (salt, *token_ids[: min(max_blocks, len(token_ids) // self.block_size) * self.block_size])
        hashes = self._hash_memo.get(key)
        if hashes is None:
            hashes = self._hash_memo[key] = prefix_hashes(key[1:], self.block_size, salt=salt)
            if len(self._hash_memo) > HASH_MEMO_SIZE:
                self._hash_memo.popitem(last=False)
        else:
            self._hash_memo.move_to_end(key)
        return list(hashes)

    def cached_prefix(self, token_ids: list[int], salt: int | None = None) -> list[int | None]:
        """The longest cached prefix of ``token_ids`` under ``salt``, leaving at least one token to
        compute (its logits are needed): a block's device block id, or None where the second tier
        holds it instead (then it is loaded, when the tier's cost says loading beats recompute)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int | None] = []
        in_tier = 0
        for h in self.prefix_hashes(token_ids, (len(token_ids) - 1) // self.block_size, salt):
            bid = self._hash_to_block.get(h)
            if bid is None and (self.tier is None or not self.tier.lookup([h])):
                break
            hits.append(bid)
            in_tier += bid is None
        if in_tier and not self.tier.cost.worth_loading(in_tier, self.block_size):  # type: ignore[union-attr]
            hits = hits[: hits.index(None)]
        return hits

    def _free_blocks_taken(self, hits: list[int | None], num_tokens: int) -> int:
        """Free blocks an allocation of ``num_tokens`` tokens with prefix ``hits`` takes (a block
        loaded from the tier takes a fresh one)."""
        on_device = [b for b in hits if b is not None]
        reused_free = sum(1 for b in on_device if not self.blocks[b].used)
        return max(len(hits), self.blocks_needed(num_tokens)) - len(on_device) + reused_free

    def can_allocate(self, token_ids: list[int], num_tokens: int, reserve: int = 0, salt: int | None = None) -> bool:
        """Whether a new request can get blocks for its first ``num_tokens`` tokens, keeping
        ``reserve`` blocks free."""
        return self._free_blocks_taken(self.cached_prefix(token_ids, salt), num_tokens) + reserve <= self.num_free

    def allocate(self, req_id: str, token_ids: list[int], num_tokens: int, salt: int | None = None) -> int:
        """Give a new request blocks for its first ``num_tokens`` tokens, reusing cached prefix
        blocks and loading those the second tier holds. Returns how many leading tokens are already
        computed (prefix-cache hit). Raises NoFreeBlocks, changing nothing, when there is no room."""
        assert req_id not in self.tables, f"{req_id} already has blocks"
        hits = self.cached_prefix(token_ids, salt)
        need = self._free_blocks_taken(hits, num_tokens)
        if need > self.num_free:
            raise NoFreeBlocks(f"{req_id} needs {need} blocks, {self.num_free} free")
        self.prefix_queries += len(token_ids)
        self.prefix_hits += len(hits) * self.block_size
        hashes = self.prefix_hashes(token_ids, (len(token_ids) - 1) // self.block_size, salt)[: len(hits)]
        for bid in hits:  # device hits first: taking blocks for the loads must not evict them
            if bid is not None:
                self._acquire(bid)
        if None in hits:
            self.tier.protect([h for h, b in zip(hashes, hits) if b is None])  # type: ignore[union-attr]
        table = BlockTable(salt=salt)
        for h, bid in zip(hashes, hits):
            if bid is None:
                bid = self._take_free()
                blk = self.blocks[bid]
                blk.ref_count, blk.hash = 1, h
                self._hash_to_block[h] = bid
                self.tier.load(h, bid)  # type: ignore[union-attr]
            table.blocks.append(bid)
            table.hashes.append(h)
        self.tables[req_id] = table
        self.ensure_slots(req_id, max(num_tokens, len(hits) * self.block_size))
        return len(hits) * self.block_size

    def loading(self, req_id: str) -> bool:
        """Whether some of the request's blocks wait for a load from the tier in this step's copies."""
        return self.tier is not None and any(self.tier.loading(b) for b in self.tables[req_id].blocks)

    def take_tier_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's tier copies: (device block, tier slot) demotions, then (tier slot, device
        block) loads; both must run before anything writes the device blocks."""
        return ([], []) if self.tier is None else self.tier.take_copies()

    def forget_tier_copies(self, copies_out: list[tuple[int, int]], copies_in: list[tuple[int, int]]) -> None:
        """Copies that did not run: the tier forgets what it was to receive, and the device blocks
        that were to be loaded stop being found by their hashes."""
        if self.tier is None:
            return
        self.tier.forget(copies_out)
        for _, bid in copies_in:
            blk = self.blocks[bid]
            if blk.hash is not None and self._hash_to_block.get(blk.hash) == bid:
                del self._hash_to_block[blk.hash]
            if bid in self._free_cached:
                del self._free_cached[bid]
                self._free_plain.append(bid)
            blk.hash = None

    def slots_needed(self, req_id: str, num_tokens: int) -> int:
        """New blocks a request needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(self.tables[req_id].blocks))

    def ensure_slots(self, req_id: str, num_tokens: int) -> list[int]:
        """Grow a request's table to hold ``num_tokens`` tokens; returns the new block ids."""
        need = self.slots_needed(req_id, num_tokens)
        if need > self.num_free:
            raise NoFreeBlocks(f"{req_id} needs {need} blocks, {self.num_free} free")
        new = []
        for _ in range(need):
            bid = self._take_free()
            self.blocks[bid].ref_count = 1
            new.append(bid)
        self.tables[req_id].blocks.extend(new)
        return new

    def truncate(self, req_id: str, num_tokens: int) -> None:
        """Give back a request's blocks past those ``num_tokens`` tokens need (rejected drafts' slots)."""
        table = self.tables[req_id]
        keep = self.blocks_needed(num_tokens)
        while len(table.blocks) > max(keep, len(table.hashes)):
            self._release(table.blocks.pop())

    def has_new_full_blocks(self, req_id: str, num_computed: int) -> bool:
        """Whether :meth:`commit` would register anything (cheap check for the hot path)."""
        return self.enable_prefix_caching and num_computed // self.block_size > len(self.tables[req_id].hashes)

    def commit(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[req_id]
        bs = self.block_size
        full = min(num_computed // bs, len(table.blocks))
        parent = table.hashes[-1] if table.hashes else table.salt
        for i in range(len(table.hashes), full):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            table.hashes.append(parent)
            bid = table.blocks[i]
            blk = self.blocks[bid]
            if blk.hash is None and parent not in self._hash_to_block:
                blk.hash = parent
                self._hash_to_block[parent] = bid

    def free(self, req_id: str) -> None:
        """Release a request's device blocks (cached ones stay reusable) and its swap blocks."""
        table = self.tables.pop(req_id, None)
        if table is not None:
            # Release tail first so the LRU evicts the end of a prefix before its start.
            for bid in reversed(table.blocks):
                self._release(bid)
        self._free_swap.extend(self.swapped.pop(req_id, ()))
        self.resident.pop(req_id, None)

    # ---- swap tier ----------------------------------------------------------------------------

    def _num_cached_leading(self, table: BlockTable) -> int:
        """How many of the table's leading blocks the prefix cache can find again by hash."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        while n < len(table.hashes) and table.hashes[n] in self._hash_to_block:
            n += 1
        return n

    def swap_copies(self, req_id: str, keep_cached: bool = False) -> int:
        """Blocks :meth:`swap_out` would copy to the swap pool."""
        table = self.tables[req_id]
        return len(table.blocks) - (self._num_cached_leading(table) if keep_cached else 0)

    def can_swap_out(self, req_id: str, keep_cached: bool = False) -> bool:
        return self.swap_copies(req_id, keep_cached) <= len(self._free_swap)

    def swap_out(self, req_id: str, keep_cached: bool = False) -> list[tuple[int, int]]:
        """Move a request's KV to the swap pool; with ``keep_cached``, all but the leading blocks
        the prefix cache holds (those are released to it). Returns (device block, swap block)
        copies that must run before its device blocks are reused."""
        table = self.tables[req_id]
        kept = self._num_cached_leading(table) if keep_cached else 0
        if len(table.blocks) - kept > len(self._free_swap):
            raise NoFreeBlocks(f"{req_id} needs {len(table.blocks) - kept} swap blocks")
        del self.tables[req_id]
        pairs = [(bid, self._free_swap.pop()) for bid in table.blocks[kept:]]
        self.swapped[req_id] = [s for _, s in pairs]
        self.resident[req_id] = ResidentPrefix(tuple(table.hashes[:kept]), table.salt)
        for bid in reversed(table.blocks):
            self._release(bid)
        return pairs

    def resident_blocks(self, req_id: str) -> list[int] | None:
        """The device blocks holding a swapped-out request's resident prefix; None if one of them
        was evicted (the request must be recomputed)."""
        found = [self._hash_to_block.get(h) for h in self.resident[req_id].hashes]
        return None if None in found else found  # type: ignore[return-value]

    def num_swapped_blocks(self, req_id: str) -> int:
        """Blocks a swapped-out request holds, resident prefix included."""
        return len(self.resident[req_id].hashes) + len(self.swapped[req_id])

    def can_swap_in(self, req_id: str, reserve: int = 0) -> bool:
        """Whether the request's KV is all there and fits on device, keeping ``reserve`` blocks free."""
        kept = self.resident_blocks(req_id)
        if kept is None:
            return False
        reused_free = sum(1 for b in kept if not self.blocks[b].used)
        return len(self.swapped[req_id]) + reused_free + reserve <= self.num_free

    def swap_in(self, req_id: str) -> list[tuple[int, int]]:
        """Bring a swapped request back: its resident prefix from the cache, the rest onto fresh
        device blocks. Returns (swap, device) copies."""
        kept = self.resident_blocks(req_id)
        if kept is None:
            raise NoFreeBlocks(f"{req_id}'s cached prefix was evicted: recompute it")
        if not self.can_swap_in(req_id):
            raise NoFreeBlocks(f"{req_id} needs {len(self.swapped[req_id])} blocks to swap in")
        swap_ids = self.swapped.pop(req_id)
        prefix = self.resident.pop(req_id)
        table = BlockTable(hashes=list(prefix.hashes), salt=prefix.salt)
        for bid in kept:
            self._acquire(bid)
            table.blocks.append(bid)
        for _ in swap_ids:
            bid = self._take_free()
            self.blocks[bid].ref_count = 1
            table.blocks.append(bid)
        self.tables[req_id] = table
        self._free_swap.extend(swap_ids)
        return list(zip(swap_ids, table.blocks[len(kept):]))

    # ---- pins ---------------------------------------------------------------------------------

    def cached_blocks(self, req_id: str) -> list[int]:
        """The device blocks the prefix cache would hand a request continuing this one's tokens:
        its leading full blocks, as registered by hash (another request's copy when that one was
        registered first)."""
        found = []
        for h in self.tables[req_id].hashes:
            bid = self._hash_to_block.get(h)
            if bid is None:
                break
            found.append(bid)
        return found if self.enable_prefix_caching else []

    def pin(self, block_ids: list[int]) -> None:
        """Keep blocks resident (and their content cached) until unpinned."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if not blk.used:
                self._free_cached.pop(bid, None)
                if bid in self._free_plain:
                    self._free_plain.remove(bid)
                self.num_used += 1
            if blk.pin_count == 0:
                self._num_pinned += 1
            blk.pin_count += 1

    def unpin(self, block_ids: list[int]) -> None:
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.pin_count <= 0:
                raise ValueError(f"block {bid} is not pinned")
            blk.pin_count -= 1
            if blk.pin_count == 0:
                self._num_pinned -= 1
            if not blk.used:
                self._mark_free(blk)

    # ---- checks -------------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the accounting invariants (used by tests)."""
        used = sum(1 for b in self.blocks if b.used)
        assert used == self.num_used, (used, self.num_used)
        free = len(self._free_plain) + len(self._free_cached)
        assert free + used == self.num_blocks, (free, used, self.num_blocks)
        refs = [0] * self.num_blocks
        for t in self.tables.values():
            for bid in t.blocks:
                refs[bid] += 1
        assert refs == [b.ref_count for b in self.blocks], "reference counts disagree with tables"
        swap_used = sum(len(s) for s in self.swapped.values())
        assert swap_used + len(self._free_swap) == self.num_swap_blocks
        assert set(self.resident) == set(self.swapped)
        if not self.tables:
            assert used == self.num_pinned, (used, self.num_pinned)
        if self.tier is not None:
            self.tier.check()
        assert self._num_pinned == sum(1 for b in self.blocks if b.pin_count > 0)
