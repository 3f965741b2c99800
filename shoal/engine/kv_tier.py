"""The second KV tier's bookkeeping: which evicted prefix blocks it holds, and the copies to run.

When the device pool evicts a cached prefix block (its reference count and pins are zero and a new
request needs the room), the block is *demoted*: copied to a slot of this larger, cheaper tier (host
memory beside an accelerator, a file on local disk, or plain host memory on a CPU) and still found
by its hash. A later request whose prompt continues past its device-cached prefix with blocks the
tier holds gets them *loaded* into fresh device blocks instead of prefilling those tokens again,
when the copy is cheaper than the recompute. The tier keeps its copy after a load (inclusive), so a
block evicted again costs no second copy. Slots are reused least recently used first.

This object only keeps the books; the :class:`~shoal.engine.block_manager.BlockManager` calls it,
the scheduler puts the copies into the step plan (device -> tier before device writes, tier ->
device before the forward pass) and the executor runs them. A copy that did not run (a failed step)
is forgotten, so the tier never names a slot whose content is not there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class TierCost:
    """When loading blocks beats recomputing them: ``load_s_per_block`` to copy one block from the
    tier to the device, ``recompute_s_per_token`` to prefill one token again."""

    load_s_per_block: float
    recompute_s_per_token: float

    def worth_loading(self, num_blocks: int, block_size: int) -> bool:
        return num_blocks * self.load_s_per_block < num_blocks * block_size * self.recompute_s_per_token


class PrefixTier:
    """Slots of the second tier, keyed by block hash, least recently used first."""

    def __init__(self, num_slots: int, cost: TierCost) -> None:
        if num_slots <= 0:
            raise ValueError("a KV tier needs at least one slot")
        self.num_slots = num_slots
        self.cost = cost
        self._slots: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, least recently used first
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._busy: set[int] = set()  # slots a copy of this step reads or writes: not reused before it runs
        self.pending_out: list[tuple[int, int]] = []  # (device block, slot): demotions to copy
        self.pending_in: dict[int, int] = {}  # device block -> slot: loads to copy
        self.demoted_blocks = 0  # blocks copied into the tier
        self.loaded_blocks = 0  # blocks copied back instead of recomputed (tier hits)

    @property
    def num_used(self) -> int:
        return len(self._slots)

    def lookup(self, hashes: list[int]) -> int:
        """How many of the leading ``hashes`` the tier holds."""
        n = 0
        while n < len(hashes) and hashes[n] in self._slots:
            n += 1
        return n

    def demote(self, block_hash: int, block_id: int) -> None:
        """A device block holding ``block_hash`` is being evicted: keep a copy (nothing to copy if
        the tier already holds it; nothing kept if every slot is busy this step)."""
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)
            return
        slot = self._take_slot()
        if slot is None:
            return
        self._slots[block_hash] = slot
        self._busy.add(slot)
        self.pending_out.append((block_id, slot))
        self.demoted_blocks += 1

    def load(self, block_hash: int, block_id: int) -> None:
        """Copy the tier's ``block_hash`` into device block ``block_id`` before the next forward."""
        slot = self._slots[block_hash]
        self._slots.move_to_end(block_hash)
        self._busy.add(slot)
        self.pending_in[block_id] = slot
        self.loaded_blocks += 1

    def loading(self, block_id: int) -> bool:
        """Whether a load into this device block is still to run."""
        return block_id in self.pending_in

    def cancel_load(self, block_id: int) -> None:
        """The device block is taken for other content before its load ran: do not write it."""
        if self.pending_in.pop(block_id, None) is not None:
            self.loaded_blocks -= 1

    def protect(self, hashes: list[int]) -> None:
        """Keep these entries' slots from reuse until the step's copies are taken (they are about
        to be loaded, and loading takes device blocks whose eviction demotes others)."""
        self._busy.update(self._slots[h] for h in hashes)

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The demotions and loads to run, in that order, before the forward pass; clears them."""
        out, in_ = self.pending_out, [(slot, bid) for bid, slot in self.pending_in.items()]
        self.pending_out, self.pending_in = [], {}
        self._busy.clear()
        return out, in_

    def forget(self, copies_out: list[tuple[int, int]]) -> None:
        """Demotions that did not run: drop the entries they were to fill."""
        lost = {slot for _, slot in copies_out}
        for h in [h for h, s in self._slots.items() if s in lost]:
            self._free.append(self._slots.pop(h))

    def clear(self) -> None:
        """Forget every entry (the engine starts over)."""
        self._slots.clear()
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._busy.clear()
        self.pending_out, self.pending_in = [], {}

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        victim = next((h for h, s in self._slots.items() if s not in self._busy), None)
        return None if victim is None else self._slots.pop(victim)

    def check(self) -> None:
        """Assert the tier's accounting (used by tests)."""
        slots = list(self._slots.values())
        assert len(set(slots)) == len(slots), "two hashes share a tier slot"
        assert len(slots) + len(self._free) == self.num_slots, (len(slots), len(self._free), self.num_slots)
        assert not set(slots) & set(self._free), "a tier slot is both used and free"
