"""Property tests of the paged KV block manager (no model).

A hypothesis state machine drives random allocate / compute / commit / free / swap / pin
sequences against a shadow model of the KV *content*: the test plays the runner, writing each
computed token into the slot the block table names, and applying swap copies. So a prefix-cache
hit, a swap or a block reuse that would hand a request the wrong KV shows up as a content mismatch.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shoal.engine.block_manager import BlockManager, NoFreeBlocks
from shoal.engine.kv_tier import PrefixTier, TierCost

# Prompts start with one of a few shared prefixes, so the prefix cache hits often.
BASES = [
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    [1, 2, 3, 4, 9, 9, 9, 9, 8, 8, 8, 8],
    [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5],
]


@st.composite
def prompts(draw) -> list[int]:
    base = draw(st.sampled_from(BASES))
    head = base[: draw(st.integers(0, len(base)))]
    tail = draw(st.lists(st.integers(0, 2), max_size=6))
    return head + tail


def snapshot(bm: BlockManager) -> tuple:
    """Everything observable about the manager's state (for 'nothing changed' checks)."""
    return (
        [(b.ref_count, b.pin_count, b.hash) for b in bm.blocks],
        list(bm._free_plain),
        list(bm._free_cached),
        dict(bm._hash_to_block),
        list(bm._free_swap),
        {k: (list(t.blocks), list(t.hashes)) for k, t in bm.tables.items()},
        {k: list(v) for k, v in bm.swapped.items()},
        dict(bm.resident),
        bm.num_used,
        bm.prefix_queries,
        bm.prefix_hits,
    )


class Req:
    def __init__(self, tokens: list[int], computed: int) -> None:
        self.tokens = tokens
        self.computed = computed
        self.swapped = False


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(2, 12),
        block_size=st.integers(1, 4),
        num_swap=st.integers(0, 10),
        prefix_caching=st.sampled_from([True, True, True, False]),
        num_tier=st.sampled_from([0, 0, 1, 3, 8]),
    )
    def setup(self, num_blocks: int, block_size: int, num_swap: int, prefix_caching: bool, num_tier: int) -> None:
        tier = PrefixTier(num_tier, TierCost(1e-6, 1e-3)) if num_tier else None
        self.bm = BlockManager(num_blocks, block_size, num_swap, prefix_caching, tier)
        # Shadow content of the second tier's slots.
        self.tier: dict[int, list[int | None]] = {s: [None] * block_size for s in range(num_tier)}
        self.bs = block_size
        self.reqs: dict[str, Req] = {}
        self.next_id = 0
        # Shadow KV content: device block -> slot tokens (None = garbage), same for swap blocks.
        self.dev: dict[int, list[int | None]] = {b: [None] * block_size for b in range(num_blocks)}
        self.swap: dict[int, list[int | None]] = {b: [None] * block_size for b in range(num_swap)}
        self.pins: dict[int, int] = {}
        # Chain hash -> the full token prefix it stands for (from every commit the test made).
        self.hash_prefix: dict[int, tuple[int, ...]] = {}
        self.history: list[list[int]] = []  # token lists of every request so far (kept growing)

    # ---- helpers --------------------------------------------------------------------------------

    def _fresh(self, block_ids: list[int]) -> None:
        """Newly taken blocks hold garbage until written."""
        for bid in block_ids:
            assert not self._was_used[bid], f"block {bid} handed out while in use"
            self.dev[bid] = [None] * self.bs

    def _run_tier_copies(self) -> None:
        """Play the executor: demotions read device blocks before anything writes them, then loads."""
        out, in_ = self.bm.take_tier_copies()
        for bid, slot in out:
            self.tier[slot] = list(self.dev[bid])
            event("demoted to the tier")
        for slot, bid in in_:
            self.dev[bid] = list(self.tier[slot])
            event("loaded from the tier")

    def _used_now(self) -> list[bool]:
        return [b.used for b in self.bm.blocks]

    def _dev_ids(self) -> list[str]:
        return sorted(r for r, q in self.reqs.items() if not q.swapped)

    def _swapped_ids(self) -> list[str]:
        return sorted(r for r, q in self.reqs.items() if q.swapped)

    def _expect_no_free(self, fn, *args) -> None:
        before = snapshot(self.bm)
        with pytest.raises(NoFreeBlocks):
            fn(*args)
        assert snapshot(self.bm) == before, f"{fn.__name__} changed state before raising NoFreeBlocks"

    # ---- rules ----------------------------------------------------------------------------------

    @rule(prompt=prompts(), data=st.data())
    def allocate(self, prompt: list[int], data) -> None:
        self._allocate(prompt, data)

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data())
    def allocate_seen(self, data) -> None:
        """A prompt that starts like one seen before (a follow-up turn, a retried request)."""
        seen = data.draw(st.sampled_from(self.history), label="seen")
        head = seen[: data.draw(st.integers(0, len(seen)), label="keep")]
        self._allocate(head + data.draw(st.lists(st.integers(0, 2), max_size=3), label="tail"), data)

    def _allocate(self, prompt: list[int], data) -> None:
        bm = self.bm
        num_tokens = data.draw(st.integers(0, len(prompt)), label="num_tokens")
        rid = f"r{self.next_id}"
        self.next_id += 1
        expected_hits = bm.cached_prefix(prompt)
        if not bm.can_allocate(prompt, num_tokens):
            self._expect_no_free(bm.allocate, rid, prompt, num_tokens)
            return
        self._was_used = self._used_now()
        computed = bm.allocate(rid, prompt, num_tokens)
        self._run_tier_copies()
        table = bm.table(rid)
        n_hits = computed // self.bs
        assert computed % self.bs == 0
        assert len(expected_hits) == n_hits
        assert all(e is None or e == b for e, b in zip(expected_hits, table))
        if prompt:
            assert computed < len(prompt), "a hit must leave one token to compute"
        else:
            assert computed == 0
        if not bm.enable_prefix_caching:
            assert computed == 0
        assert len(table) == bm.blocks_needed(max(num_tokens, computed))
        assert len(set(table)) == len(table)
        # A hit never returns wrong content.
        for i, bid in enumerate(table[:n_hits]):
            assert self.dev[bid] == prompt[i * self.bs : (i + 1) * self.bs], (
                f"prefix hit on block {bid} holds {self.dev[bid]}, prompt has "
                f"{prompt[i * self.bs:(i + 1) * self.bs]}"
            )
        self._fresh(table[n_hits:])
        if n_hits:
            event("prefix hit")
        if any(not u for u, b in zip(self._was_used, table[:n_hits])):
            event("prefix hit on a free cached block")
        self.reqs[rid] = Req(list(prompt), computed)
        self.history.append(self.reqs[rid].tokens)
        prefill = data.draw(st.integers(0, len(prompt) - computed), label="prefill")
        if prefill:
            self._compute(rid, prefill, True)

    @precondition(lambda self: any(not q.swapped for q in self.reqs.values()))
    @rule(data=st.data())
    def compute(self, data) -> None:
        """Play one forward pass over the next ``k`` tokens (appending decoded tokens first)."""
        rid = data.draw(st.sampled_from(self._dev_ids()), label="req")
        req = self.reqs[rid]
        req.tokens += data.draw(st.lists(st.integers(0, 2), max_size=2), label="decoded")
        left = len(req.tokens) - req.computed
        if left:
            self._compute(rid, data.draw(st.integers(1, left), label="k"), data.draw(st.booleans(), label="commit"))

    @precondition(lambda self: any(not q.swapped for q in self.reqs.values()))
    @rule(data=st.data())
    def finish(self, data) -> None:
        """Compute a request to its end (if there is room), commit, and free it."""
        rid = data.draw(st.sampled_from(self._dev_ids()), label="req")
        left = len(self.reqs[rid].tokens) - self.reqs[rid].computed
        if left:
            self._compute(rid, left, True)
        self._free(rid)

    def _compute(self, rid: str, k: int, commit: bool) -> None:
        bm = self.bm
        req = self.reqs[rid]
        need = bm.slots_needed(rid, req.computed + k)
        if need > bm.num_free:
            self._expect_no_free(bm.ensure_slots, rid, req.computed + k)
            return
        plain_before = bm.num_free - bm.num_cached_free
        cached_before = dict(bm._hash_to_block)
        self._was_used = self._used_now()
        new = bm.ensure_slots(rid, req.computed + k)
        self._run_tier_copies()
        assert len(new) == need
        self._fresh(new)
        # Plain free blocks go before cached ones; only the shortfall is evicted from the cache.
        evicted = [h for h in cached_before if h not in bm._hash_to_block]
        assert len(evicted) == max(0, need - plain_before)
        if evicted:
            event("evicted cached blocks")
        for h in evicted:
            assert bm.blocks[cached_before[h]].hash != h
        table = bm.table(rid)
        assert len(table) * self.bs >= req.computed + k
        for p in range(req.computed, req.computed + k):
            blk = bm.blocks[table[p // self.bs]]
            assert blk.ref_count == 1 and blk.hash is None, f"writing into shared/cached block {blk}"
            self.dev[blk.block_id][p % self.bs] = req.tokens[p]
        req.computed += k
        if commit:
            self._commit(rid)

    @precondition(lambda self: any(not q.swapped for q in self.reqs.values()))
    @rule(data=st.data())
    def commit(self, data) -> None:
        self._commit(data.draw(st.sampled_from(self._dev_ids()), label="req"))

    def _commit(self, rid: str) -> None:
        bm = self.bm
        req = self.reqs[rid]
        will = bm.has_new_full_blocks(rid, req.computed)
        before = list(bm.tables[rid].hashes)
        bm.commit(rid, req.tokens, req.computed)
        hashes = bm.tables[rid].hashes
        assert will == (hashes != before)
        if bm.enable_prefix_caching:
            full = req.computed // self.bs
            assert len(hashes) == full
            assert hashes == bm.prefix_hashes(req.tokens, full)
            for i, h in enumerate(hashes):
                self.hash_prefix[h] = tuple(req.tokens[: (i + 1) * self.bs])

    @precondition(lambda self: bool(self.reqs))
    @rule(data=st.data())
    def free(self, data) -> None:
        self._free(data.draw(st.sampled_from(sorted(self.reqs)), label="req"))

    def _free(self, rid: str) -> None:
        n_swap = len(self.bm.swapped.get(rid, ()))
        free_swap = self.bm.num_free_swap
        self.bm.free(rid)
        assert rid not in self.bm.tables and rid not in self.bm.swapped
        assert self.bm.num_free_swap == free_swap + n_swap
        del self.reqs[rid]

    @precondition(lambda self: any(not q.swapped for q in self.reqs.values()))
    @rule(data=st.data())
    def swap_out(self, data) -> None:
        bm = self.bm
        rid = data.draw(st.sampled_from(self._dev_ids()), label="req")
        keep_cached = data.draw(st.booleans(), label="keep_cached")
        table = list(bm.table(rid))
        if not bm.can_swap_out(rid, keep_cached):
            assert bm.swap_copies(rid, keep_cached) > bm.num_free_swap
            self._expect_no_free(bm.swap_out, rid, keep_cached)
            return
        free_swap = set(bm._free_swap)
        pairs = bm.swap_out(rid, keep_cached)
        kept = len(bm.resident[rid].hashes)
        assert kept == 0 or keep_cached
        assert [d for d, _ in pairs] == table[kept:]
        if kept:
            event("swapped out with a resident prefix")
        assert {s for _, s in pairs} <= free_swap and len({s for _, s in pairs}) == len(pairs)
        assert bm.swapped[rid] == [s for _, s in pairs]
        for d, s in pairs:
            self.swap[s] = list(self.dev[d])
        self.reqs[rid].swapped = True

    @precondition(lambda self: any(q.swapped for q in self.reqs.values()))
    @rule(data=st.data())
    def swap_in(self, data) -> None:
        bm = self.bm
        rid = data.draw(st.sampled_from(self._swapped_ids()), label="req")
        swap_ids = list(bm.swapped[rid])
        resident = bm.resident_blocks(rid)
        if not bm.can_swap_in(rid):
            if resident is None:
                event("resident prefix evicted")
            self._expect_no_free(bm.swap_in, rid)
            return
        self._was_used = self._used_now()
        pairs = bm.swap_in(rid)
        self._run_tier_copies()
        assert [s for s, _ in pairs] == swap_ids
        device = [d for _, d in pairs]
        self._fresh(device)
        assert bm.table(rid) == resident + device and rid not in bm.swapped and rid not in bm.resident
        for s, d in pairs:
            self.dev[d] = list(self.swap[s])
        self.reqs[rid].swapped = False
        event("swapped in")

    @rule(data=st.data())
    def pin(self, data) -> None:
        bids = data.draw(st.lists(st.integers(0, self.bm.num_blocks - 1), max_size=3), label="blocks")
        free_before = self.bm.num_free
        newly_used = {b for b in bids if not self.bm.blocks[b].used}
        self.bm.pin(bids)
        assert self.bm.num_free == free_before - len(newly_used)
        for b in bids:
            self.pins[b] = self.pins.get(b, 0) + 1

    @rule(data=st.data())
    def unpin(self, data) -> None:
        pinned = sorted(b for b, n in self.pins.items() if n)
        bid = data.draw(st.sampled_from(pinned) if pinned else st.integers(0, self.bm.num_blocks - 1), label="block")
        if not self.pins.get(bid):
            before = snapshot(self.bm)
            with pytest.raises(ValueError):
                self.bm.unpin([bid])
            assert snapshot(self.bm) == before
            return
        self.bm.unpin([bid])
        self.pins[bid] -= 1

    # ---- invariants -----------------------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        bm = self.bm
        bm.check()
        used = [b for b in bm.blocks if b.used]
        assert bm.num_free + bm.num_used == bm.num_blocks
        assert bm.num_used == len(used)
        plain, cached = bm._free_plain, list(bm._free_cached)
        assert len(set(plain)) == len(plain) and not set(plain) & set(cached)
        assert set(plain) | set(cached) == {b.block_id for b in bm.blocks if not b.used}
        assert all(bm.blocks[b].hash is None for b in plain)
        for h, b in bm._hash_to_block.items():
            assert bm.blocks[b].hash == h
        for b in bm.blocks:
            assert b.pin_count == self.pins.get(b.block_id, 0)
            if b.hash is not None:
                assert bm._hash_to_block[b.hash] == b.block_id
        if not bm.tables:
            assert bm.num_used == bm.num_pinned
        assert set(bm.tables) == set(self._dev_ids())
        assert set(bm.swapped) == set(self._swapped_ids())
        swap_ids = [s for ids in bm.swapped.values() for s in ids] + bm._free_swap
        assert sorted(swap_ids) == list(range(bm.num_swap_blocks))

    @invariant()
    def content(self) -> None:
        """Every computed token of every request sits in the slot its table names; every cached
        block holds the tokens its hash stands for."""
        bs = self.bs
        for rid, req in self.reqs.items():
            if req.swapped:
                resident = self.bm.resident_blocks(rid)
                if resident is None:  # evicted: it can only be recomputed
                    continue
                for p in range(req.computed):
                    i = p // bs
                    slot = self.dev[resident[i]] if i < len(resident) else self.swap[self.bm.swapped[rid][i - len(resident)]]
                    assert slot[p % bs] == req.tokens[p], (rid, p)
                continue
            else:
                ids, store = self.bm.table(rid), self.dev
                assert len(ids) * bs >= req.computed
            for p in range(req.computed):
                assert store[ids[p // bs]][p % bs] == req.tokens[p], (rid, p)
        for h, b in self.bm._hash_to_block.items():
            prefix = self.hash_prefix[h]
            assert tuple(self.dev[b]) == prefix[-bs:], f"cached block {b} holds wrong content"
        if self.bm.tier is not None:
            for h, slot in self.bm.tier._slots.items():
                assert tuple(self.tier[slot]) == self.hash_prefix[h][-bs:], f"tier slot {slot} holds wrong content"


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- targeted examples ------------------------------------------------------------------------


def test_prefix_hit_reuses_blocks_and_leaves_one_token():
    bm = BlockManager(8, 4)
    prompt = list(range(12))
    assert bm.allocate("a", prompt, 12) == 0
    bm.commit("a", prompt, 12)
    # Same prompt: two full blocks hit, the last block is recomputed for its logits.
    assert bm.allocate("b", prompt, 12) == 8
    assert bm.table("b")[:2] == bm.table("a")[:2]
    assert bm.table("b")[2] != bm.table("a")[2]
    assert [bm.blocks[b].ref_count for b in bm.table("a")] == [2, 2, 1]
    bm.free("a")
    bm.free("b")
    bm.check()
    assert bm.num_used == 0 and bm.num_cached_free == 3
    # Longer prompt with the same start hits all three cached blocks.
    assert bm.allocate("c", prompt + [99], 13) == 12
    assert bm.prefix_hits == 8 + 12


def test_eviction_is_least_recently_freed_and_drops_the_hash():
    bm = BlockManager(3, 2)
    p1, p2 = [1, 1, 2, 2, 3], [7, 7, 8, 8, 9]
    bm.allocate("a", p1, 5)
    bm.commit("a", p1, 5)
    bm.free("a")  # two cached blocks (tail freed first) + one plain
    assert bm.num_cached_free == 2
    bm.allocate("b", p2, 3)  # the plain block, then the cached tail of p1
    assert bm.num_cached_free == 1
    assert len(bm.cached_prefix(p1)) == 1
    bm.ensure_slots("b", 5)  # evicts p1's first block too
    assert bm.cached_prefix(p1) == []
    bm.check()


def test_no_free_blocks_changes_nothing():
    bm = BlockManager(4, 2, num_swap_blocks=1)
    bm.allocate("a", [1, 2, 3, 4], 4)
    bm.commit("a", [1, 2, 3, 4], 4)
    assert bm.allocate("b", [1, 2, 9, 9, 5], 3) == 2  # hits block 0, takes one more
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocks):
        bm.allocate("c", [1, 2, 3, 4, 5, 6, 7, 8, 9], 9)
    assert snapshot(bm) == before and "c" not in bm.tables
    with pytest.raises(NoFreeBlocks):
        bm.ensure_slots("b", 20)
    with pytest.raises(NoFreeBlocks):
        bm.swap_out("a")
    assert snapshot(bm) == before
    bm.check()


def test_pinned_blocks_stay_cached_and_count_as_used():
    bm = BlockManager(2, 2)
    bm.allocate("a", [1, 2, 3], 3)
    bm.commit("a", [1, 2, 3], 3)
    first = bm.table("a")[0]
    bm.pin([first])
    bm.free("a")
    assert bm.num_used == bm.num_pinned == 1
    bm.check()
    bm.allocate("b", [5, 6], 2)  # may only take the one unpinned block
    with pytest.raises(NoFreeBlocks):
        bm.ensure_slots("b", 3)
    bm.free("b")
    assert bm.cached_prefix([1, 2, 3]) == [first]
    bm.unpin([first])
    assert bm.num_used == 0 and bm.num_pinned == 0
    bm.check()


def test_prefix_hashes_are_a_sha256_chain():
    """Block hashes are SHA-256 over the parent's hash and the block's token ids: no crafted prompt
    can collide with another's prefix as it could with Python's 64-bit ``hash``."""
    import hashlib
    from array import array

    from shoal.engine.block_manager import hash_block, prefix_hashes

    first = int.from_bytes(hashlib.sha256(array("q", [1, 2, 3, 4]).tobytes()).digest(), "big")
    second = int.from_bytes(hashlib.sha256(first.to_bytes(32, "big") + array("q", [5, 6, 7, 8]).tobytes()).digest(), "big")
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4) == [first, second]
    assert hash_block(None, [5, 6, 7, 8]) != second  # the same block after another prefix differs
    assert BlockManager(8, 4, 0).prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], max_blocks=1) == [first]


def test_prefix_hash_memo_is_bounded_and_exact():
    """Admission asks for a prompt's hash chain several times; the block manager keeps recent ones,
    and what it returns is always the chain itself."""
    from shoal.engine.block_manager import HASH_MEMO_SIZE, prefix_hashes

    bm = BlockManager(8, 4, 0)
    prompts = [[i, i + 1, 7, 7, 9, 9, 9, 9, 1] for i in range(HASH_MEMO_SIZE + 10)]
    for _ in range(2):
        for p in prompts:
            assert bm.prefix_hashes(p, 2) == prefix_hashes(p, 4)
            assert bm.prefix_hashes(p, 1) == prefix_hashes(p, 4)[:1]
    assert len(bm._hash_memo) <= HASH_MEMO_SIZE
    bm.prefix_hashes(prompts[0], 2).append(0)  # callers own what they get back
    assert bm.prefix_hashes(prompts[0], 2) == prefix_hashes(prompts[0], 4)


@pytest.mark.parametrize("keep_cached", [True, False])
def test_a_swapped_in_table_keeps_its_salt(keep_cached):
    # A tenant's request swapped out and back publishes its later blocks under its own salt:
    # another tenant's identical prompt (another salt, or none) never hits them.
    bm = BlockManager(16, 4, num_swap_blocks=16)
    tokens = list(range(20))
    bm.allocate("a", tokens, 10, salt=7)
    bm.commit("a", tokens, 10)
    bm.swap_out("a", keep_cached)
    bm.swap_in("a")
    bm.ensure_slots("a", 20)
    bm.commit("a", tokens, 20)
    assert bm.tables["a"].hashes == bm.prefix_hashes(tokens, 5, salt=7)
    assert len(bm.cached_prefix(tokens + [0], salt=7)) == 5
    assert bm.cached_prefix(tokens + [0]) == [] and bm.cached_prefix(tokens + [0], salt=8) == []
    bm.check()
