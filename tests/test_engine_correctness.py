"""The engine's logits and tokens against Hugging Face transformers on the same weights.

Every scenario (batching, chunked prefill, prefix-cache hits, swap and recompute preemption,
export -> import) must produce the same per-token log-probabilities as one plain full-sequence
forward pass of the reference model.
"""

from __future__ import annotations

import random

import pytest
import torch

from shoal.engine.sampling_params import SamplingParams
from tests._engine_util import run_all, tokens_of

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)


def prompts(n: int, lo: int = 5, hi: int = 40, seed: int = 0, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_matches_reference(hf, prompt: list[int], outs, atol: float = 2e-4) -> None:
    """Each step's sampled-token and top-5 logprobs equal the reference's teacher-forced ones."""
    generated = tokens_of(outs)
    logprobs = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(logprobs) == len(generated) > 0
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + generated])).logits[0].float(), dim=-1)
    for j, (tok, (chosen, top)) in enumerate(zip(generated, logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert chosen.token_id == tok
        assert chosen.logprob == pytest.approx(row[tok].item(), abs=atol)
        assert tok == int(row.argmax()), f"step {j}: greedy token differs from the reference"
        ref_top = torch.topk(row, len(top))
        assert [a.token_id for a in top] == ref_top.indices.tolist()
        assert [a.logprob for a in top] == pytest.approx(ref_top.values.tolist(), abs=atol)


def run_prompts(engine, ps, params=GREEDY, **add_kw):
    ids = [engine.add(p, params, **add_kw) for p in ps]
    outs = run_all(engine)
    for rid in ids:
        finals = [o for o in outs[rid] if o.finished]
        assert len(finals) == 1, "every request ends exactly once"
    engine.block_manager.check()
    assert engine.block_manager.num_used == engine.block_manager.num_pinned == 0
    return [outs[r] for r in ids]


def test_model_is_loaded_for_inference(make_tiny_engine):
    """No parameter tracks gradients, so the forward (RoPE writes in place) runs outside
    ``inference_mode`` too."""
    model = make_tiny_engine().model
    assert not any(p.requires_grad for p in model.parameters())


def test_batched_prefill_and_decode_match_reference(make_tiny_engine, tiny_hf):
    ps = prompts(5)
    engine = make_tiny_engine()
    for p, outs in zip(ps, run_prompts(engine, ps)):
        assert_matches_reference(tiny_hf, p, outs)


@pytest.mark.parametrize("budget", [3, 7, 16])
def test_chunked_prefill_matches_reference(make_tiny_engine, tiny_hf, budget):
    ps = prompts(3, lo=20, hi=60, seed=budget)
    engine = make_tiny_engine(max_num_batched_tokens=budget)
    for p, outs in zip(ps, run_prompts(engine, ps)):
        assert_matches_reference(tiny_hf, p, outs)


def test_prefix_cache_hit_matches_reference(make_tiny_engine, tiny_hf):
    engine = make_tiny_engine()
    base = prompts(1, lo=30, hi=30, seed=3)[0]
    run_prompts(engine, [base])
    longer = base + [7, 8, 9, 10, 11]
    (outs,) = run_prompts(engine, [longer])
    assert outs[-1].num_cached_tokens >= 28  # 7 full blocks of 4 reused
    hits_before = engine.block_manager.prefix_hits
    assert hits_before > 0
    assert_matches_reference(tiny_hf, longer, outs)
    # An identical prompt reuses all but its last token's block, and still matches.
    (again,) = run_prompts(engine, [longer])
    assert again[-1].num_cached_tokens == (len(longer) - 1) // 4 * 4
    assert_matches_reference(tiny_hf, longer, again)


@pytest.mark.parametrize("on_disk", [False, True])
def test_second_tier_reload_matches_reference(make_tiny_engine, tiny_hf, tmp_path, on_disk):
    """A prefix evicted from a pool too small to keep it is demoted to the second tier (host
    memory, or a file on disk) and loaded back for the next turn: the same logprobs as recompute."""
    path = str(tmp_path / "kv.tier") if on_disk else None
    engine = make_tiny_engine(num_blocks=16, num_tier_blocks=32, kv_tier_path=path)
    base = prompts(1, lo=40, hi=40, seed=21)[0]
    run_prompts(engine, [base])
    run_prompts(engine, prompts(2, lo=44, hi=44, seed=22))  # fills the pool: base's blocks are evicted
    assert None in engine.block_manager.cached_prefix(base), "some of base's blocks left the device pool"
    tier = engine.block_manager.tier
    assert tier.demoted_blocks >= 10
    turn = base + [5, 6, 7, 8, 9]
    (outs,) = run_prompts(engine, [turn])
    assert tier.loaded_blocks >= 10, "the next turn's prefix came back from the tier"
    assert outs[-1].num_cached_tokens >= 40
    assert_matches_reference(tiny_hf, turn, outs)
    load = engine.load()
    assert (load.num_tier_blocks, load.tier_loaded_blocks) == (32, tier.loaded_blocks)
    if on_disk:
        assert (tmp_path / "kv.tier").stat().st_size == 32 * engine.kv.data[:, :, :1].numel() * 4


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_matches_reference(make_tiny_engine, tiny_hf, mode):
    # 24 blocks of 4 tokens cannot hold 6 requests of up to 52 tokens: preemption is forced.
    ps = prompts(6, lo=20, hi=40, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)
    engine = make_tiny_engine(num_blocks=24, preemption_mode=mode)
    results = run_prompts(engine, ps, params)
    assert engine.scheduler.num_preemptions > 0
    for p, outs in zip(ps, results):
        assert_matches_reference(tiny_hf, p, outs)


def test_greedy_output_independent_of_batch_chunk_and_preemption(make_tiny_engine):
    ps = prompts(6, lo=10, hi=50, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [tokens_of(run_prompts(make_tiny_engine(), [p], params)[0]) for p in ps]
    configs = [dict(), dict(max_num_batched_tokens=5), dict(num_blocks=26, preemption_mode="swap"),
               dict(num_blocks=26, preemption_mode="recompute"), dict(max_num_seqs=2)]
    for cfg in configs:
        together = [tokens_of(o) for o in run_prompts(make_tiny_engine(**cfg), ps, params)]
        assert together == alone, cfg


def test_seeded_sampling_independent_of_batch(make_tiny_engine):
    ps = prompts(4, seed=8)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=1234)
    alone = tokens_of(run_prompts(make_tiny_engine(), [ps[0]], seeded)[0])
    other = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    engine = make_tiny_engine(max_num_batched_tokens=9)
    ids = [engine.add(p, other) for p in ps[1:3]] + [engine.add(ps[0], seeded)] + [engine.add(ps[3], other)]
    outs = run_all(engine)
    assert tokens_of(outs[ids[2]]) == alone


@pytest.mark.parametrize("after_steps", [1, 4, 9])
def test_export_import_continues_identically(make_tiny_engine, tiny_hf, after_steps):
    ps = prompts(3, lo=15, hi=30, seed=21)
    greedy = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=5)
    seeded = SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True, seed=7, logprobs=5)
    reference = [tokens_of(o) for o in run_prompts(make_tiny_engine(), ps[:2], greedy)]
    reference.append(tokens_of(run_prompts(make_tiny_engine(), [ps[2]], seeded)[0]))

    src, dst = make_tiny_engine(max_num_batched_tokens=8), make_tiny_engine(num_blocks=64)
    ids = [src.add(ps[0], greedy), src.add(ps[1], greedy), src.add(ps[2], seeded)]
    got: dict[str, list] = {i: [] for i in ids}
    for _ in range(after_steps):
        for o in src.step():
            got[o.req_id].append(o)
    for rid in ids[1:]:
        dst.import_(src.export(rid))
    src.block_manager.check()
    for engine in (src, dst):
        for rid, outs in run_all(engine).items():
            got[rid].extend(outs)
    for rid, ref, p in zip(ids, reference, ps):
        assert tokens_of(got[rid]) == ref
        assert sum(o.finished for o in got[rid]) == 1
    assert_matches_reference(tiny_hf, ps[1], got[ids[1]])
    for engine in (src, dst):
        engine.block_manager.check()
        assert engine.block_manager.num_used == 0


def test_import_into_a_full_engine_is_refused_and_changes_nothing(make_tiny_engine):
    """An engine running max_num_seqs requests takes no more: import_ raises (the cluster then rolls
    the migration back) and both engines carry on as before."""
    ps = prompts(3, lo=12, hi=20, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    src, dst = make_tiny_engine(), make_tiny_engine(max_num_seqs=1)
    moving = src.add(ps[0], params, req_id="moving")
    dst.add(ps[1], params)
    while not src.requests[moving].output_token_ids or not dst.scheduler.running:
        src.step()
        dst.step()
    state = src.export(moving)
    with pytest.raises(ValueError, match="max_num_seqs"):
        dst.import_(state)
    assert moving not in dst.requests and len(dst.scheduler.running) == 1
    dst.block_manager.check()
    src.import_(state)  # it goes back where it came from
    outs = run_all(src)
    assert sum(o.finished for o in outs[moving]) == 1
    run_all(dst)
    for engine in (src, dst):
        assert engine.block_manager.num_used == 0


def test_export_of_swapped_request(make_tiny_engine):
    ps = prompts(6, lo=20, hi=40, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = [tokens_of(o) for o in run_prompts(make_tiny_engine(), ps, params)]
    src, dst = make_tiny_engine(num_blocks=24, preemption_mode="swap"), make_tiny_engine()
    ids = [src.add(p, params) for p in ps]
    got: dict[str, list] = {i: [] for i in ids}
    while not src.scheduler.swapped:
        for o in src.step():
            got[o.req_id].append(o)
    victim = src.scheduler.swapped[0].req_id
    state = src.export(victim)
    assert state.kv is not None
    dst.import_(state)
    for engine in (src, dst):
        for rid, outs in run_all(engine).items():
            got[rid].extend(outs)
    assert [tokens_of(got[i]) for i in ids] == reference


def test_staged_live_migration_and_rollback(make_tiny_engine):
    """Llumnix-style: copy full blocks while the request keeps decoding on the source, then stop
    and copy only the tail; or roll back and continue on the source. Tokens never change."""
    p = prompts(1, lo=30, hi=30, seed=4)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = tokens_of(run_prompts(make_tiny_engine(), [p], params)[0])
    for rollback in (False, True):
        src, dst = make_tiny_engine(), make_tiny_engine()
        rid = src.add(p, params)
        got = []
        next_block = 0
        for _ in range(6):  # stage while decoding
            for o in src.step():
                got.extend(o.new_token_ids)
            kv, end = src.read_blocks(rid, next_block)
            if kv is not None:
                dst.stage_kv(rid, kv, next_block)
                next_block = end
        assert next_block > 0
        state = src.export(rid, from_block=next_block, release=False)
        assert state.kv.shape[3] <= 2  # only the tail moves in the stop-and-copy
        if rollback:
            dst.unstage(rid)
            src.restore(rid)
            engine = src
        else:
            dst.import_(state)
            src.release(rid)
            engine = dst
        for outs in run_all(engine).values():
            got.extend(tokens_of(outs))
        assert got == reference
        for e in (src, dst):
            e.block_manager.check()
            assert e.block_manager.num_used == 0


def test_decode_kv_buffer_matches_reference_as_the_batch_changes(make_tiny_engine, tiny_hf):
    """The decodes' K/V carried between steps (engine/decode_kv.py) gathers the rows of requests
    that join, repacks when they leave, and is rebuilt when they outgrow it; logprobs match the
    reference and equal the gather-every-step path."""
    ps = prompts(4, lo=5, hi=30, seed=11)
    lengths = [30, 6, 17, 25]  # different ends: the batch changes as requests leave; 30 > headroom
    results = {}
    for use_buffer in (True, False):
        engine = make_tiny_engine()
        if not use_buffer:
            engine.runner.decode_kv.max_bytes = 0
        kinds = []
        orig_plan = engine.runner.decode_kv.plan
        engine.runner.decode_kv.plan = lambda *a: kinds.append(p := orig_plan(*a)) or p
        ids, outs = [], {}
        for i, (p, n) in enumerate(zip(ps, lengths)):
            ids.append(engine.add(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=5)))
            for _ in range(3 * i):  # join while others decode
                for o in engine.step():
                    outs.setdefault(o.req_id, []).append(o)
        for rid, os_ in run_all(engine).items():
            outs.setdefault(rid, []).extend(os_)
        if use_buffer:
            assert any(k and k.rebuild for k in kinds) and any(k and not k.rebuild for k in kinds)
            assert any(k and not k.rebuild and k.fills for k in kinds)  # a join gathered only its row
        else:
            assert all(k is None for k in kinds)
        for p, rid in zip(ps, ids):
            assert_matches_reference(tiny_hf, p, outs[rid])
        results[use_buffer] = [tokens_of(outs[r]) for r in ids]
    assert results[True] == results[False]


def test_decode_kv_buffer_holds_a_batch_that_fills_the_cpu_pool(make_tiny_engine):
    """On CPU the carried decode K/V may be as large as the KV pool: a batch of decodes holding
    most of the pool still runs from the buffer instead of gathering every step."""
    engine = make_tiny_engine(num_blocks=64)  # 256 token slots
    kinds = []
    orig_plan = engine.runner.decode_kv.plan
    engine.runner.decode_kv.plan = lambda *a: kinds.append(p := orig_plan(*a)) or p
    for p in prompts(4, lo=40, hi=41, seed=3):  # 4 x 50 tokens: padded, ~240 slots of the 256
        engine.add(p, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    run_all(engine)
    assert kinds and all(k is not None for k in kinds)
    engine.block_manager.check()


def test_a_bf16_models_few_decodes_attend_in_float32(make_tiny_engine, tiny_hf):
    """On a CPU a bf16 model's one or two decodes keep their carried K/V in float32
    (``FLOAT32_DECODE_ROWS``), more decodes in bf16; the buffer switches between a layout per
    dtype as the batch crosses that size (regathering the rows that went stale in the other), and
    every step's logprobs stay those of the float32 reference to within bf16's rounding."""
    from shoal.engine.model_runner import FLOAT32_DECODE_ROWS

    engine = make_tiny_engine(dtype="bfloat16")
    if engine.dtype != torch.bfloat16:
        pytest.skip("this CPU computes no bf16")
    seen = []  # (decodes, buffer dtype, rows gathered) per step
    orig_plan = engine.runner.decode_kv.plan

    def plan(req_ids, *args):
        p = orig_plan(req_ids, *args)
        seen.append((len(req_ids), p.buffers[0].dtype, p.fills))
        return p

    engine.runner.decode_kv.plan = plan
    ps = prompts(4, lo=5, hi=30, seed=5)
    ids, outs = [], {}
    for i, (p, n) in enumerate(zip(ps, [40, 8, 20, 12])):  # the batch grows to 4, then shrinks to 1
        ids.append(engine.add(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=5)))
        for _ in range(4):
            for o in engine.step():
                outs.setdefault(o.req_id, []).append(o)
    for rid, os_ in run_all(engine).items():
        outs.setdefault(rid, []).extend(os_)
    small = {dtype for n, dtype, _ in seen if n <= FLOAT32_DECODE_ROWS}
    large = {dtype for n, dtype, _ in seen if n > FLOAT32_DECODE_ROWS}
    assert small == {torch.float32} and large == {torch.bfloat16}
    switches = [b for a, b in zip(seen, seen[1:]) if a[1] != b[1]]
    assert len(switches) >= 2 and all(fills for _, _, fills in switches)  # stale rows of the other dtype
    for p, rid in zip(ps, ids):
        generated = tokens_of(outs[rid])
        with torch.no_grad():
            ref = torch.log_softmax(tiny_hf(torch.tensor([p + generated])).logits[0].float(), dim=-1)
        got = [chosen.logprob for o in outs[rid] for chosen, _ in (o.logprobs or [])]
        want = [ref[len(p) - 1 + j, t].item() for j, t in enumerate(generated)]
        assert got == pytest.approx(want, abs=0.05)
