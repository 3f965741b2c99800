"""The engine's request API on the tiny random model: bad input, abort, stops, priorities, load,
failed steps, and "every request ends exactly once" under a random mix of all of these.

Logits against transformers are checked in test_engine_correctness.py; here greedy tokens of a
request run alone on a roomy engine serve as the reference.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

import pytest
import torch

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.preemption import PreemptionMode
from shoal.engine.request import FinishReason, Status
from shoal.engine.sampling_params import SamplingParams
from shoal.model.llama import LlamaModel
from shoal.model.loader import load_checkpoint
from tests._engine_util import run_all, tokens_of


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy machine they make each step slow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VOCAB = 384
TINY_EOS = 2  # LlamaConfig's default eos_token_id, saved with the tiny model


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def prompt(n: int, seed: int = 0) -> list[int]:
    return rand_prompt(random.Random(seed), n)


def collect(engine: Engine, outs: dict[str, list], steps: int = 1) -> None:
    for _ in range(steps):
        for o in engine.step():
            outs[o.req_id].append(o)


def finals(outs: list) -> list:
    return [o for o in outs if o.finished]


def alone(make_tiny_engine, p: list[int], params: SamplingParams) -> list[int]:
    """Tokens of ``p`` run alone on a roomy engine."""
    engine = make_tiny_engine()
    rid = engine.add(p, params)
    return tokens_of(run_all(engine)[rid])


def assert_drained(engine: Engine) -> None:
    bm = engine.block_manager
    bm.check()
    assert not engine.has_unfinished()
    assert engine.requests == {}
    assert bm.num_used == 0
    assert bm.num_free_swap == bm.num_swap_blocks
    load = engine.load()
    assert (load.num_running, load.num_waiting, load.num_swapped) == (0, 0, 0)


def engine_snapshot(engine: Engine):
    bm, s = engine.block_manager, engine.scheduler
    return (
        sorted(engine.requests),
        bm.num_used,
        {rid: list(t.blocks) for rid, t in bm.tables.items()},
        {rid: list(b) for rid, b in bm.swapped.items()},
        [r.req_id for r in s.waiting],
        [r.req_id for r in s.running],
        [r.req_id for r in s.swapped],
        engine.load(),
        len(engine._pending),
    )


# ---- bad input --------------------------------------------------------------------------------

MAX_LEN = 48

BAD_ADDS = {
    "empty prompt": (lambda e: e.add([], greedy()), ValueError, r"(?i)empty"),
    "prompt longer than the context": (
        lambda e: e.add(prompt(MAX_LEN + 5), greedy()), ValueError, r"(?i)context|max_model_len|too long"
    ),
    "prompt exactly the context (no room for a token)": (
        lambda e: e.add(prompt(MAX_LEN), greedy()), ValueError, rf"{MAX_LEN}"
    ),
    "token id >= vocab": (lambda e: e.add([5, VOCAB, 7], greedy()), ValueError, r"(?i)vocab"),
    "token id far outside vocab": (lambda e: e.add([5, 10**9], greedy()), ValueError, r"(?i)vocab"),
    "negative token id": (lambda e: e.add([5, -1, 7], greedy()), ValueError, r"(?i)vocab"),
    "duplicate request id": (lambda e: e.add([1, 2, 3], greedy(), req_id="good"), ValueError, r"good"),
    "params not a SamplingParams": (lambda e: e.add([1, 2, 3], {"max_tokens": 3}), TypeError, r"SamplingParams"),
    "max_tokens=0": (lambda e: e.add([1, 2, 3], SamplingParams(max_tokens=0)), ValueError, r"max_tokens"),
    "negative temperature": (
        lambda e: e.add([1, 2, 3], SamplingParams(temperature=-0.5)), ValueError, r"temperature"
    ),
    "top_p=0": (lambda e: e.add([1, 2, 3], SamplingParams(top_p=0.0)), ValueError, r"top_p"),
    "misspelt SamplingParams kwarg": (
        lambda e: e.add([1, 2, 3], SamplingParams(temprature=0.5)), TypeError, r"temprature"
    ),
    "SamplingParams kwarg from another API": (
        lambda e: e.add([1, 2, 3], SamplingParams(max_new_tokens=4)), TypeError, r"max_new_tokens"
    ),
}

BAD_ADDS.update({
    "float token id": (lambda e: e.add([5, 1.5, 7], greedy()), TypeError, r"(?i)token"),
    "None token id": (lambda e: e.add([5, None, 7], greedy()), TypeError, r"(?i)token"),
    "prompt given as a str": (lambda e: e.add("hello world", greedy()), TypeError, r"(?i)token"),
    "non-integer priority": (lambda e: e.add([1, 2, 3], greedy(), priority="high"), TypeError, r"(?i)priority"),
})


@pytest.mark.parametrize(
    ("bad_add", "exc", "pattern"),
    [pytest.param(*v, id=k) for k, v in BAD_ADDS.items()],
)
def test_bad_input_is_rejected_and_engine_keeps_serving(make_tiny_engine, bad_add, exc, pattern):
    engine = make_tiny_engine(max_model_len=MAX_LEN)
    assert engine.max_model_len == MAX_LEN
    p = prompt(10, seed=1)
    params = greedy(12)
    engine.add(p, params, req_id="good")
    other = engine.add(prompt(6, seed=2), greedy(5))  # a waiting one, too
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs, steps=3)
    before = engine_snapshot(engine)
    assert before[1] > 0, "the good request holds KV blocks"

    with pytest.raises(exc, match=pattern):
        bad_add(engine)

    assert engine_snapshot(engine) == before, "a rejected add changed the engine"
    engine.block_manager.check()
    for rid, o in run_all(engine).items():
        outs[rid].extend(o)
    assert set(outs) == {"good", other}
    good = outs["good"]
    assert len(finals(good)) == 1 and good[-1].finished
    assert good[-1].finish_reason is FinishReason.LENGTH
    assert tokens_of(good) == alone(make_tiny_engine, p, params)
    assert len(tokens_of(good)) == 12
    assert len(tokens_of(outs[other])) == 5
    assert_drained(engine)


def test_all_bad_inputs_in_a_row_change_nothing(make_tiny_engine):
    engine = make_tiny_engine(max_model_len=MAX_LEN)
    engine.add(prompt(10, seed=1), greedy(12), req_id="good")
    collect(engine, defaultdict(list), steps=2)
    before = engine_snapshot(engine)
    for name, (bad_add, exc, pattern) in BAD_ADDS.items():
        with pytest.raises(exc, match=pattern):
            bad_add(engine)
        assert engine_snapshot(engine) == before, name
    outs = run_all(engine)
    assert len(tokens_of(outs["good"])) == 12 - 2 and outs["good"][-1].finish_reason is FinishReason.LENGTH


# ---- abort ------------------------------------------------------------------------------------


def assert_one_abort_next_step(engine: Engine, rid: str, outs: dict[str, list]) -> None:
    """The aborted request's only remaining output is one final ABORT, on the next step."""
    step_outs = engine.step()
    mine = [o for o in step_outs if o.req_id == rid]
    assert len(mine) == 1, f"expected one final output for {rid} on the next step, got {mine}"
    (o,) = mine
    assert o.finished and o.finish_reason is FinishReason.ABORT
    assert o.new_token_ids == []
    assert o.error is None
    for x in step_outs:
        outs[x.req_id].append(x)
    assert engine.abort(rid) is False, "abort of an already aborted request"
    rest = run_all(engine)
    assert rid not in rest, "outputs after the final one"
    for k, v in rest.items():
        outs[k].extend(v)


def test_abort_waiting_request(make_tiny_engine):
    engine = make_tiny_engine(max_num_seqs=1)
    a = engine.add(prompt(8, 1), greedy(6))
    b = engine.add(prompt(8, 2), greedy(6))
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs)
    assert engine.requests[b].status is Status.WAITING
    used = engine.block_manager.num_used
    assert engine.abort(b) is True
    assert b not in engine.requests
    assert engine.block_manager.num_used == used  # it held no blocks
    assert engine.load().num_waiting == 0
    assert_one_abort_next_step(engine, b, outs)
    assert tokens_of(outs[b]) == [] and outs[b][-1].num_output_tokens == 0
    assert len(tokens_of(outs[a])) == 6 and outs[a][-1].finish_reason is FinishReason.LENGTH
    assert_drained(engine)


def test_abort_before_first_step(make_tiny_engine):
    engine = make_tiny_engine()
    a = engine.add(prompt(8, 1), greedy(6))
    assert engine.abort(a) is True
    out = engine.step()
    assert [(o.req_id, o.finish_reason) for o in out] == [(a, FinishReason.ABORT)]
    assert engine.step() == []
    assert_drained(engine)


def test_abort_decoding_request_frees_blocks_at_once(make_tiny_engine):
    engine = make_tiny_engine()
    p, params = prompt(17, 3), greedy(20)
    a = engine.add(p, params)
    b = engine.add(prompt(9, 4), greedy(20))
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs, steps=5)
    assert engine.requests[a].status is Status.RUNNING and len(engine.requests[a].output_token_ids) == 5
    bm = engine.block_manager
    held = len(bm.table(a))
    used = bm.num_used
    assert held >= 5  # 22 tokens in blocks of 4
    assert engine.abort(a) is True
    assert bm.num_used == used - held, "the aborted request's blocks are freed at once"
    assert a not in bm.tables
    bm.check()
    assert_one_abort_next_step(engine, a, outs)
    assert tokens_of(outs[a]) == alone(make_tiny_engine, p, params)[:5]
    assert outs[a][-1].num_output_tokens == 5
    assert len(tokens_of(outs[b])) == 20
    assert_drained(engine)


def test_abort_swapped_request(make_tiny_engine):
    ps = [prompt(30, s) for s in range(6)]
    params = greedy(24)
    engine = make_tiny_engine(num_blocks=24, preemption_mode="swap")
    ids = [engine.add(p, params) for p in ps]
    outs: dict[str, list] = defaultdict(list)
    for _ in range(200):
        if engine.scheduler.swapped:
            break
        collect(engine, outs)
    assert engine.scheduler.swapped, "no request was swapped out"
    victim = engine.scheduler.swapped[0].req_id
    bm = engine.block_manager
    swap_blocks = len(bm.swapped[victim])
    free_swap, used = bm.num_free_swap, bm.num_used
    assert engine.requests[victim].status is Status.SWAPPED and swap_blocks > 0
    assert engine.abort(victim) is True
    assert victim not in bm.swapped and victim not in bm.tables
    assert bm.num_free_swap == free_swap + swap_blocks, "its swap blocks are freed at once"
    assert bm.num_used == used
    assert engine.load().num_swapped == len(engine.scheduler.swapped)
    bm.check()
    assert_one_abort_next_step(engine, victim, outs)
    for rid, p in zip(ids, ps):
        assert len(finals(outs[rid])) == 1
        if rid != victim:
            assert tokens_of(outs[rid]) == alone(make_tiny_engine, p, params)
    assert_drained(engine)


def test_abort_mid_chunked_prefill(make_tiny_engine):
    engine = make_tiny_engine(max_num_batched_tokens=6)
    a = engine.add(prompt(30, 5), greedy(4))
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs, steps=2)
    req = engine.requests[a]
    assert 0 < req.num_computed_tokens < 30 and req.output_token_ids == []
    assert outs[a] == []  # nothing sampled yet
    assert engine.block_manager.num_used == len(engine.block_manager.table(a)) > 0
    assert engine.abort(a) is True
    assert engine.block_manager.num_used == 0
    assert_one_abort_next_step(engine, a, outs)
    assert_drained(engine)
    # The engine serves the same prompt afterwards (its cached prefix blocks are sound).
    b = engine.add(prompt(30, 5), greedy(4))
    assert tokens_of(run_all(engine)[b]) == alone(make_tiny_engine, prompt(30, 5), greedy(4))


def test_abort_unknown_or_finished_returns_false(make_tiny_engine):
    engine = make_tiny_engine()
    assert engine.abort("nope") is False
    a = engine.add(prompt(5, 1), greedy(2))
    outs = run_all(engine)
    assert outs[a][-1].finish_reason is FinishReason.LENGTH
    assert engine.abort(a) is False
    assert engine.step() == []
    # A finished request's id may be used again.
    engine.add(prompt(5, 1), greedy(2), req_id=a)
    assert tokens_of(run_all(engine)[a]) == tokens_of(outs[a])


# ---- every request ends exactly once ----------------------------------------------------------


def _random_mix(make_tiny_engine, seed: int, mixed_priorities: bool) -> dict[str, list]:
    """Random prompts, lengths, stop ids, EOS handling, seeded sampling, priorities, arrivals and
    aborts on a small KV. Checks the block manager after every step and, per request, exactly one
    final output with the reference tokens and reason. Returns the failed (ERROR) requests' outputs."""
    rng = random.Random(seed)
    bs = 4
    num_blocks = rng.randint(12, 40)
    cfg = {
        "num_blocks": num_blocks,
        "num_swap_blocks": rng.choice([0, 10, 64]),
        "max_num_batched_tokens": rng.choice([3, 8, 16, 64]),
        "max_num_seqs": rng.choice([2, 3, 64]),
        "preemption_mode": rng.choice(["auto", "swap", "recompute"]),
        "enable_prefix_caching": rng.random() < 0.8,
    }
    # Up to the whole KV (max_model_len == num_blocks * bs): see the tests on big requests below.
    cap = num_blocks * bs
    shared = rand_prompt(rng, 16)
    specs = []
    for i in range(rng.randint(4, 14)):
        plen = rng.randint(1, min(40, cap - 2))
        p = (shared[: rng.choice([0, 4, 9, 16])] + rand_prompt(rng, plen))[:plen]
        max_tokens = rng.randint(1, min(30, cap - plen))
        seeded = rng.random() < 0.3
        specs.append(
            {
                "rid": f"r{i}",
                "prompt": p,
                "max_tokens": max_tokens,
                "temperature": 0.9 if seeded else 0.0,
                "seed": rng.randrange(1000) if seeded else None,
                "ignore_eos": rng.random() < 0.5,
                "priority": rng.choice([-1, 0, 0, 1]) if mixed_priorities else 0,
                "arrive": rng.randint(0, 25),
                "abort": rng.randint(0, 30) if rng.random() < 0.25 else None,
            }
        )
    # Reference tokens: each request alone, ignoring EOS; stop ids partly picked from them.
    ref_engine = make_tiny_engine()
    for s in specs:
        ref_engine.add(
            s["prompt"],
            SamplingParams(temperature=s["temperature"], seed=s["seed"], max_tokens=s["max_tokens"], ignore_eos=True),
            req_id=s["rid"],
        )
    ref = {rid: tokens_of(o) for rid, o in run_all(ref_engine).items()}
    for s in specs:
        stops = rng.sample(range(3, VOCAB), rng.randint(0, 2))
        if ref[s["rid"]] and rng.random() < 0.5:
            stops.append(rng.choice(ref[s["rid"]]))
        s["stop_token_ids"] = stops
        expected, reason, stop_reason = ref[s["rid"]], FinishReason.LENGTH, None
        for j, t in enumerate(expected):
            if t in stops or (t == TINY_EOS and not s["ignore_eos"]):
                expected, reason = expected[: j + 1], FinishReason.STOP
                stop_reason = t if t in stops else None
                break
        s["expected"], s["reason"], s["stop_reason"] = expected, reason, stop_reason

    engine = make_tiny_engine(**cfg)
    bm = engine.block_manager
    outs: dict[str, list] = defaultdict(list)
    ended: set[str] = set()
    aborted: set[str] = set()
    step = 0
    while True:
        for s in specs:
            if s["arrive"] == step:
                params = SamplingParams(
                    temperature=s["temperature"], seed=s["seed"], max_tokens=s["max_tokens"],
                    ignore_eos=s["ignore_eos"], stop_token_ids=s["stop_token_ids"],
                )
                engine.add(s["prompt"], params, req_id=s["rid"], priority=s["priority"])
            if s["abort"] is not None and s["arrive"] + s["abort"] == step:
                live = s["rid"] in engine.requests
                assert engine.abort(s["rid"]) is live
                assert engine.abort(s["rid"]) is False
                if live:
                    aborted.add(s["rid"])
        if rng.random() < 0.1:
            assert engine.abort(f"ghost{step}") is False
        for o in engine.step():
            assert o.req_id not in ended, f"{o.req_id}: output after its final one"
            outs[o.req_id].append(o)
            if o.finished:
                ended.add(o.req_id)
        bm.check()
        load = engine.load()
        assert load.num_free_blocks + load.num_used_blocks == load.num_total_blocks
        assert load.num_running + load.num_waiting + load.num_swapped == len(engine.requests)
        step += 1
        if step > 26 and not engine.has_unfinished():
            break
        assert step < 3000, f"hang: {engine.load()}"

    assert ended == {s["rid"] for s in specs}, "every request ends"
    failed = {}
    for s in specs:
        rid, got = s["rid"], outs[s["rid"]]
        assert len(finals(got)) == 1 and got[-1].finished, rid
        toks = tokens_of(got)
        assert got[-1].num_output_tokens == len(toks)
        if got[-1].finish_reason is FinishReason.ERROR:
            assert got[-1].error, "a failed request says why"
            failed[rid] = got
        elif rid in aborted:
            assert got[-1].finish_reason is FinishReason.ABORT, rid
            assert toks == s["expected"][: len(toks)], rid
        else:
            assert (toks, got[-1].finish_reason, got[-1].stop_reason) == (
                s["expected"], s["reason"], s["stop_reason"]
            ), (rid, cfg)
    assert_drained(engine)
    return failed


@pytest.mark.parametrize("seed", range(20))
def test_every_request_ends_exactly_once_random_mix(make_tiny_engine, seed):
    # Every 4th seed with equal priorities; the others mix -1 / 0 / 1, so urgent arrivals preempt
    # running requests (seeds 13, 14 and 18 caught a scheduler bug there, seed 16 another).
    failed = _random_mix(make_tiny_engine, seed, mixed_priorities=seed % 4 != 0)
    assert not failed, {rid: o[-1].error for rid, o in failed.items()}


# ---- stops ------------------------------------------------------------------------------------


def _first_new(tokens: list[int], start: int) -> int:
    """Index of the first token at or after ``start`` that did not occur before it."""
    return next(j for j in range(start, len(tokens)) if tokens[j] not in tokens[:j])


def test_stop_token_id_ends_with_stop(make_tiny_engine):
    p = prompt(12, 7)
    ref = alone(make_tiny_engine, p, greedy(12))
    assert len(ref) == 12
    k = _first_new(ref, 2)
    t = ref[k]
    engine = make_tiny_engine()
    a = engine.add(p, greedy(12, stop_token_ids=[t]))
    b = engine.add(p, greedy(12, stop_token_ids=[VOCAB + 5]))  # never produced: runs to max_tokens
    outs = run_all(engine)
    assert tokens_of(outs[a]) == ref[: k + 1]
    assert outs[a][-1].finish_reason is FinishReason.STOP and outs[a][-1].stop_reason == t
    assert len(finals(outs[a])) == 1
    assert tokens_of(outs[b]) == ref and outs[b][-1].finish_reason is FinishReason.LENGTH
    assert outs[b][-1].stop_reason is None


def test_earliest_of_several_stop_token_ids_wins(make_tiny_engine):
    p = prompt(12, 7)
    ref = alone(make_tiny_engine, p, greedy(12))
    k1 = _first_new(ref, 2)
    k2 = _first_new(ref, k1 + 1)
    engine = make_tiny_engine()
    a = engine.add(p, greedy(12, stop_token_ids=[ref[k2], ref[k1]]))
    outs = run_all(engine)[a]
    assert tokens_of(outs) == ref[: k1 + 1] and outs[-1].stop_reason == ref[k1]


def _engine_with_eos(tiny_model_dir, eos: int, **overrides) -> Engine:
    config, state = load_checkpoint(tiny_model_dir, dtype=torch.float32)
    config = dataclasses.replace(config, eos_token_ids=(eos,))
    model = LlamaModel(config)
    model.load_weights(state)
    opts = {"dtype": "float32", "device": "cpu", "block_size": 4, "num_blocks": 256, "num_swap_blocks": 256}
    opts.update(overrides)
    return Engine(EngineConfig(**opts), model=model)


def test_eos_stops_unless_ignore_eos(make_tiny_engine, tiny_model_dir):
    p = prompt(12, 8)
    ref = alone(make_tiny_engine, p, greedy(10))
    k = _first_new(ref, 2)
    eos = ref[k]  # make the 3rd(ish) greedy token the model's EOS
    engine = _engine_with_eos(tiny_model_dir, eos)
    stop = engine.add(p, SamplingParams(temperature=0.0, max_tokens=10))
    keep = engine.add(p, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    outs = run_all(engine)
    assert tokens_of(outs[stop]) == ref[: k + 1]
    assert outs[stop][-1].finish_reason is FinishReason.STOP and outs[stop][-1].stop_reason is None
    assert tokens_of(outs[keep]) == ref and outs[keep][-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_gives_length(make_tiny_engine, max_tokens):
    engine = make_tiny_engine()
    a = engine.add(prompt(9, 9), greedy(max_tokens))
    outs = run_all(engine)[a]
    assert len(tokens_of(outs)) == max_tokens == outs[-1].num_output_tokens
    assert len(outs) == max_tokens, "one output per generated token"
    assert [o.finished for o in outs] == [False] * (max_tokens - 1) + [True]
    assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].stop_reason is None


@pytest.mark.parametrize(("plen", "expect"), [(20, 4), (23, 1), (12, 12)])
def test_reaching_max_model_len_gives_length(make_tiny_engine, plen, expect):
    engine = make_tiny_engine(max_model_len=24)
    a = engine.add(prompt(plen, 10), greedy(100))
    outs = run_all(engine)[a]
    assert len(tokens_of(outs)) == expect
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert plen + expect == 24
    assert_drained(engine)


def test_prompt_needing_all_kv_blocks_is_served(make_tiny_engine):
    """max_model_len bounded by the KV size: a prompt that needs every block still runs (the
    admission watermark must not keep it out forever)."""
    engine = make_tiny_engine(num_blocks=8)  # 32 tokens of KV, so max_model_len == 32
    assert engine.max_model_len == 32
    a = engine.add(prompt(30, 11), greedy(100))  # accepted by add(): 30 < 32
    outs = run_all(engine, max_steps=200)[a]
    assert len(tokens_of(outs)) == 2 and outs[-1].finish_reason is FinishReason.LENGTH


def test_big_swapped_request_comes_back(make_tiny_engine):
    """A request swapped out while holding all but one KV block is swapped back in once the
    others are done (no watermark may keep it out forever)."""
    engine = make_tiny_engine(num_blocks=10, preemption_mode="swap")  # max_model_len 40
    pa, pb = prompt(32, 12), prompt(2, 13)
    big = engine.add(pa, greedy(5), priority=1)  # 8 blocks, 9 once it decodes
    small = engine.add(pb, greedy(6), priority=0)  # 1 block, 2 from its 5th token
    outs: dict[str, list] = defaultdict(list)
    for _ in range(20):
        collect(engine, outs)
        if engine.scheduler.swapped:
            break
    req = engine.requests[big]
    assert req.status is Status.SWAPPED, "the low-priority big request was the victim"
    assert len(engine.block_manager.swapped[big]) == 9
    for rid, o in run_all(engine, max_steps=200).items():
        outs[rid].extend(o)
    assert tokens_of(outs[small]) == alone(make_tiny_engine, pb, greedy(6))
    assert tokens_of(outs[big]) == alone(make_tiny_engine, pa, greedy(5))
    assert_drained(engine)


def test_request_swapped_mid_prefill_is_swapped_back_in(make_tiny_engine):
    """Swap-in must make room for the rest of the prompt chunk, not just one token (this once
    raised NoFreeBlocks out of step())."""
    engine = make_tiny_engine(num_blocks=10, max_num_batched_tokens=12, preemption_mode="swap")
    rng = random.Random(0)
    specs = [("A", rand_prompt(rng, 8), greedy(10), 0), ("B", rand_prompt(rng, 8), greedy(10), 0),
             ("R", rand_prompt(rng, 20), greedy(4), 1)]
    for rid, p, params, prio in specs:
        engine.add(p, params, req_id=rid, priority=prio)
    outs = run_all(engine, max_steps=300)
    for rid, p, params, _ in specs:
        assert tokens_of(outs[rid]) == alone(make_tiny_engine, p, params), rid
    assert engine.scheduler.num_preemptions > 0
    assert_drained(engine)


# ---- priorities -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_low_priority_requests_are_preempted_first(make_tiny_engine, mode):
    """KV runs out as decodes grow: the victim is a priority-0 request even though the priority -1
    one arrived last (FCFS alone would pick it); that one finishes before every preempted request,
    and every request ends with the tokens it gets alone."""
    params = greedy(24)
    ps = [prompt(16, 70 + i) for i in range(3)]
    refs = [alone(make_tiny_engine, p, params) for p in ps]
    engine = make_tiny_engine(num_blocks=20, preemption_mode=mode)
    lo = [engine.add(ps[0], params, priority=0), engine.add(ps[1], params, priority=0)]
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs, steps=2)
    hi = engine.add(ps[2], params, priority=-1)
    collect(engine, outs)
    assert engine.scheduler.num_preemptions == 0, "it was admitted without preempting"
    assert all(engine.requests[r].status is Status.RUNNING for r in lo + [hi])
    finish_step: dict[str, int] = {}
    victims: set[str] = set()
    step = 3
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.req_id].append(o)
            if o.finished:
                finish_step[o.req_id] = step
        for rid, req in engine.requests.items():
            if req.num_preemptions:
                victims.add(rid)
                assert req.priority == 0, "a preempted request keeps its priority"
        step += 1
        assert step < 500
    assert engine.scheduler.num_preemptions > 0 and victims
    assert hi not in victims, "the priority -1 request is never the victim"
    assert all(finish_step[hi] < finish_step[v] for v in victims), (finish_step, victims)
    for rid, ref in zip(lo + [hi], refs):
        assert tokens_of(outs[rid]) == ref, rid
        assert len(finals(outs[rid])) == 1 and outs[rid][-1].finish_reason is FinishReason.LENGTH
    assert_drained(engine)


def test_admission_preemption_drops_the_victims_chunk(make_tiny_engine):
    """An arriving urgent request preempts a running one that was already planned for this step:
    the victim's chunk must leave the plan (else it runs on blocks it no longer owns)."""
    engine = make_tiny_engine(num_blocks=20, preemption_mode="swap")
    for i in range(2):
        engine.add(prompt(24, 20 + i), greedy(20), priority=0)
    collect(engine, defaultdict(list), steps=2)
    engine.add(prompt(24, 22), greedy(20), priority=-1)
    plan = engine.scheduler.schedule(engine.clock())
    preempted = {rid for rid, _ in plan.preempted}
    assert preempted, "the urgent request had to preempt"
    assert not preempted & {c.req_id for c in plan.chunks}, "a preempted request still has a chunk"


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_urgent_arrival_preempts_running_request(make_tiny_engine, mode):
    params = greedy(20)
    ps = [prompt(24, 20 + i) for i in range(3)]
    refs = [alone(make_tiny_engine, p, params) for p in ps]
    # 20 blocks of 4: the two running requests hold 14, the urgent one needs 6 + 1 (watermark).
    engine = make_tiny_engine(num_blocks=20, preemption_mode=mode)
    lo = [engine.add(ps[0], params, priority=0), engine.add(ps[1], params, priority=0)]
    outs: dict[str, list] = defaultdict(list)
    finish_step: dict[str, int] = {}
    collect(engine, outs, steps=2)
    assert all(engine.requests[r].status is Status.RUNNING for r in lo)
    hi = engine.add(ps[2], params, priority=-1)
    step = 2
    preempted_seen: set[str] = set()
    first_step: dict[str, int] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.req_id].append(o)
            first_step.setdefault(o.req_id, step)
            if o.finished:
                finish_step[o.req_id] = step
        for r in lo:
            req = engine.requests.get(r)
            if req is not None and req.status in (Status.SWAPPED, Status.WAITING):
                preempted_seen.add(r)
                assert req.priority == 0, "a preempted request keeps its priority"
        if hi in engine.requests:
            assert engine.requests[hi].num_preemptions == 0, "the urgent request is never the victim"
        step += 1
        assert step < 500
    assert engine.scheduler.num_preemptions > 0 and preempted_seen
    # The urgent request got its first token on the step right after it arrived.
    assert first_step[hi] == 2 and outs[hi][0].new_token_ids
    assert len(outs[hi]) == 20
    assert all(finish_step[hi] < finish_step[r] for r in preempted_seen), finish_step
    for rid, ref in zip(lo + [hi], refs):
        assert tokens_of(outs[rid]) == ref, rid
        assert len(finals(outs[rid])) == 1
    assert_drained(engine)


def test_priority_orders_admission_when_one_fits(make_tiny_engine):
    # Room for one request at a time (max_num_seqs=1): the -1 request, though it arrives last,
    # takes the running 0 request's slot (preempted, it then goes first among its equals); equal
    # priorities go first come first served.
    engine = make_tiny_engine(num_blocks=12, max_num_seqs=1)
    params = greedy(6)
    first = engine.add(prompt(10, 30), params, priority=0)
    collect(engine, defaultdict(list))
    a = engine.add(prompt(10, 31), params, priority=0)
    b = engine.add(prompt(10, 32), params, priority=1)
    c = engine.add(prompt(10, 33), params, priority=-1)
    order = []
    while engine.has_unfinished():
        order += [o.req_id for o in engine.step() if o.finished]
    assert order == [c, first, a, b]
    assert engine.scheduler.num_preemptions == 1


@pytest.mark.parametrize("resident_swap", [True, False])
def test_a_slot_preemption_swaps_only_what_the_prefix_cache_does_not_hold(make_tiny_engine, resident_swap):
    # One slot, swaps forced: the urgent request takes the running one's slot. With resident swaps
    # the victim's full (cached) blocks stay in the prefix cache and only its partial last block is
    # copied; it resumes on them with the same greedy tokens as a run with no preemption.
    params = greedy(10)
    ref = tokens_of(run_all_one(make_tiny_engine(), prompt(29, 50), params))
    engine = make_tiny_engine(max_num_seqs=1, preemption_mode="swap", resident_swap=resident_swap)
    lo = engine.add(prompt(29, 50), params, priority=0)
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs, steps=3)  # prefill (29 tokens) and two decodes: 31 computed, 8 blocks
    engine.add(prompt(6, 51), greedy(2), priority=-1)
    collect(engine, outs)
    plan = engine.last_plan
    assert plan.preempted == [(lo, PreemptionMode.SWAP)]
    bm = engine.block_manager
    assert len(plan.swap_out) == (1 if resident_swap else 8)
    assert len(bm.resident[lo].hashes) == (7 if resident_swap else 0)
    while engine.has_unfinished():
        collect(engine, outs)
    assert tokens_of(outs[lo]) == ref
    assert engine.scheduler.num_preemptions == 1 and engine.requests == {}
    bm.check()


def test_a_swapped_request_whose_cached_prefix_was_evicted_is_recomputed(make_tiny_engine):
    # 12 blocks: the urgent request's long prompt evicts the victim's resident prefix while it
    # waits; at re-admission it recomputes (from its tokens) instead of reading the evicted blocks.
    params = greedy(6)
    ref = tokens_of(run_all_one(make_tiny_engine(), prompt(17, 60), params))
    engine = make_tiny_engine(num_blocks=12, max_num_seqs=1, preemption_mode="swap")
    lo = engine.add(prompt(17, 60), params, priority=0)
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs, steps=2)
    engine.add(prompt(40, 61), greedy(3), priority=-1)
    collect(engine, outs)
    assert engine.last_plan.preempted == [(lo, PreemptionMode.SWAP)]
    assert engine.block_manager.resident_blocks(lo) is None  # the urgent prompt took those blocks
    while engine.has_unfinished():
        collect(engine, outs)
    assert tokens_of(outs[lo]) == ref
    engine.block_manager.check()


def run_all_one(engine: Engine, token_ids: list[int], params: SamplingParams) -> list:
    rid = engine.add(token_ids, params)
    return run_all(engine)[rid]


# ---- load -------------------------------------------------------------------------------------


def test_load_snapshots(make_tiny_engine):
    engine = make_tiny_engine(num_blocks=40, max_num_seqs=2, preemption_mode="swap")
    load = engine.load()
    assert (load.num_running, load.num_waiting, load.num_swapped) == (0, 0, 0)
    assert load.num_total_blocks == 40 and load.num_free_blocks == 40 and load.num_used_blocks == 0
    assert load.tokens_in_flight == 0 and load.waiting_prompt_tokens == 0 and load.kv_usage == 0
    assert load.block_size == 4

    lens = [13, 21, 8]
    ids = [engine.add(prompt(n, 40 + n), greedy(16)) for n in lens]
    load = engine.load()
    assert load.num_waiting == 3 and load.num_running == 0
    assert load.waiting_prompt_tokens == sum(lens)
    assert load.num_used_blocks == 0

    outs: dict[str, list] = defaultdict(list)
    seen_running = False
    while engine.has_unfinished():
        collect(engine, outs)
        load = engine.load()
        bm = engine.block_manager
        assert load.num_free_blocks + load.num_used_blocks == load.num_total_blocks == 40
        assert load.num_used_blocks == bm.num_used
        assert 0 <= load.kv_usage <= 1
        assert load.num_running <= 2
        assert load.num_running + load.num_waiting + load.num_swapped == len(engine.requests)
        running = [r for r in engine.requests.values() if r.status is Status.RUNNING]
        assert load.num_running == len(running)
        assert load.tokens_in_flight == sum(r.num_computed_tokens for r in running)
        if running:
            seen_running = True
            assert load.tokens_in_flight > 0 and load.num_used_blocks > 0
            assert load.num_used_blocks * 4 >= max(r.num_computed_tokens for r in running)
        waiting = [r for r in engine.requests.values() if r.status is Status.WAITING]
        prefilling = [r for r in running if r.num_computed_tokens < r.num_prompt_tokens]
        assert load.waiting_prompt_tokens == (sum(r.num_tokens - r.num_computed_tokens for r in waiting)
                                              + sum(r.num_prompt_tokens - r.num_computed_tokens for r in prefilling))
    assert seen_running
    assert all(len(finals(outs[r])) == 1 and len(tokens_of(outs[r])) == 16 for r in ids)
    load = engine.load()
    assert (load.num_running, load.num_waiting, load.num_swapped, load.num_used_blocks) == (0, 0, 0, 0)
    assert load.tokens_in_flight == 0 and load.num_free_blocks == 40 and load.waiting_prompt_tokens == 0


def test_load_counts_the_rest_of_a_chunked_prefill_as_demand(make_tiny_engine):
    """A running request mid-prefill still wants KV for its uncomputed prompt: dispatch must not
    see its instance as free."""
    engine = make_tiny_engine(num_blocks=40, max_num_batched_tokens=8)
    engine.add(prompt(30, 7), greedy(4))
    engine.step()
    load = engine.load()
    assert load.num_running == 1 and load.tokens_in_flight == 8
    assert load.waiting_prompt_tokens == 22


def test_load_counts_swapped_and_preemptions(make_tiny_engine):
    engine = make_tiny_engine(num_blocks=24, preemption_mode="swap")
    for s in range(6):
        engine.add(prompt(30, s), greedy(24))
    max_swapped = 0
    while engine.has_unfinished():
        engine.step()
        load = engine.load()
        max_swapped = max(max_swapped, load.num_swapped)
        assert load.num_swapped == len(engine.block_manager.swapped)
        assert load.num_preemptions == engine.scheduler.num_preemptions
    assert max_swapped > 0 and engine.load().num_preemptions > 0


# ---- a failing forward pass -------------------------------------------------------------------


def _fail_once(monkeypatch, engine: Engine, message: str = "device fell over") -> list:
    """Make the next ``runner.execute`` raise; returns the list of plans it was called with."""
    real = engine.runner.execute
    calls: list = []

    def execute(plan):
        calls.append(plan)
        if len(calls) == 1:
            raise RuntimeError(message)
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)
    return calls


def test_failed_step_fails_its_batch_and_engine_recovers(make_tiny_engine, monkeypatch):
    engine = make_tiny_engine(max_num_seqs=2)
    pa, pb, pc, pd = (prompt(n, 50 + n) for n in (11, 14, 9, 12))
    params = greedy(8)
    a, b = engine.add(pa, params), engine.add(pb, params)
    c = engine.add(pc, params)  # waits: max_num_seqs=2
    outs: dict[str, list] = defaultdict(list)
    collect(engine, outs, steps=2)
    assert engine.requests[c].status is Status.WAITING
    dead = engine.add(pd, params)
    assert engine.abort(dead)  # its final output is pending: it is not part of the failing batch

    calls = _fail_once(monkeypatch, engine)
    step_outs = engine.step()
    assert len(calls) == 1
    in_step = {ch.req_id for ch in calls[0].chunks}
    assert in_step == {a, b}
    by_id = {o.req_id: o for o in step_outs}
    assert set(by_id) == {a, b, dead}
    assert by_id[dead].finish_reason is FinishReason.ABORT
    for rid in (a, b):
        o = by_id[rid]
        assert o.finished and o.finish_reason is FinishReason.ERROR
        assert o.error and "device fell over" in o.error
        assert o.new_token_ids == []
        assert rid not in engine.requests
        assert engine.abort(rid) is False
    bm = engine.block_manager
    bm.check()
    assert bm.num_used == 0, "the failed requests' KV is freed"
    assert c in engine.requests and engine.requests[c].status is Status.WAITING
    for o in step_outs:
        outs[o.req_id].append(o)

    e = engine.add(prompt(10, 60), params)
    for rid, o in run_all(engine).items():
        outs[rid].extend(o)
    for rid in (a, b):
        assert len(finals(outs[rid])) == 1 and len(tokens_of(outs[rid])) == 2
    assert tokens_of(outs[c]) == alone(make_tiny_engine, pc, params)
    assert tokens_of(outs[e]) == alone(make_tiny_engine, prompt(10, 60), params)
    assert outs[c][-1].finish_reason is outs[e][-1].finish_reason is FinishReason.LENGTH
    assert_drained(engine)


def test_failed_model_forward_mid_chunked_prefill(make_tiny_engine, monkeypatch):
    """The model itself raising (inside execute, after KV copies) fails the batch the same way."""
    engine = make_tiny_engine(max_num_batched_tokens=8)
    p = prompt(30, 61)
    a = engine.add(p, greedy(4))
    collect(engine, defaultdict(list))
    assert 0 < engine.requests[a].num_computed_tokens < 30
    real = engine.model.forward
    state = {"n": 0}

    def forward(*args, **kw):
        state["n"] += 1
        if state["n"] == 1:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(engine.model, "forward", forward)
    (o,) = engine.step()
    assert o.req_id == a and o.finish_reason is FinishReason.ERROR and "out of memory" in o.error
    assert engine.block_manager.num_used == 0
    b = engine.add(p, greedy(4))  # same prompt again: its partly computed blocks must not be reused wrongly
    assert tokens_of(run_all(engine)[b]) == alone(make_tiny_engine, p, greedy(4))
    assert_drained(engine)


def test_failed_step_does_not_corrupt_swapped_victims(make_tiny_engine, monkeypatch):
    ps = [prompt(30, s) for s in range(6)]
    params = greedy(24)
    engine = make_tiny_engine(num_blocks=24, preemption_mode="swap")
    ids = [engine.add(p, params) for p in ps]
    outs: dict[str, list] = defaultdict(list)
    real = engine.runner.execute
    failed: list = []

    def execute(plan):
        if plan.swap_out and not failed:
            failed.append(plan)
            raise RuntimeError("copy failed")
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)
    for rid, o in run_all(engine).items():
        outs[rid].extend(o)
    assert failed, "no step swapped anything out"
    in_step = {c.req_id for c in failed[0].chunks}
    for rid, p in zip(ids, ps):
        assert len(finals(outs[rid])) == 1
        if rid in in_step:
            assert outs[rid][-1].finish_reason is FinishReason.ERROR
        elif outs[rid][-1].finish_reason is not FinishReason.ERROR:
            assert tokens_of(outs[rid]) == alone(make_tiny_engine, p, params), rid
    assert_drained(engine)
