"""Speculative decoding by prompt lookup: the proposer, the verifier's exactness, and the engine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.engine.sampler import Sampler, SamplingState
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import ScheduledChunk
from shoal.engine.spec_verify import verify
from shoal.engine.speculative import SpeculativeConfig, propose_ngram, speculates
from tests._engine_util import run_all, tokens_of

NGRAM = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)


# ---- the proposer -------------------------------------------------------------------------------

def naive_propose(tokens: list[int], cfg: SpeculativeConfig, max_drafts: int) -> list[int]:
    k = min(cfg.num_speculative_tokens, max_drafts)
    if k <= 0:
        return []
    for n in range(min(cfg.prompt_lookup_max, len(tokens) - 1), cfg.prompt_lookup_min - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_the_latest_longest_match_is_proposed():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6]
    # "5 6" occurs at 0 and 4; the latest (4) is followed by 8, 2, 5
    assert propose_ngram(tokens, NGRAM, 8) == [8, 2, 5]
    assert propose_ngram(tokens, NGRAM, 2) == [8, 2]
    assert propose_ngram(tokens, NGRAM, 0) == []
    assert propose_ngram([1, 2, 3, 4], NGRAM, 8) == []  # nothing repeats
    longest_first = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=2, prompt_lookup_min=1)
    # "4 6" matches only at 0 (then 9, 9); "6" alone matches later (then 4)
    assert propose_ngram([4, 6, 9, 9, 6, 4, 4, 6], longest_first, 8) == [9, 9]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 256, 257, 65536, 16777216, 2**31 - 1]), min_size=0, max_size=40),
       st.integers(1, 4), st.integers(0, 3), st.integers(0, 6))
def test_the_byte_search_agrees_with_a_plain_scan(tokens, lookup_max, lookup_min_less, max_drafts):
    # multi-byte token values make unaligned byte matches, which the search must skip
    cfg = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=lookup_max,
                            prompt_lookup_min=max(1, lookup_max - lookup_min_less))
    assert propose_ngram(tokens, cfg, max_drafts) == naive_propose(tokens, cfg, max_drafts)


@pytest.mark.parametrize("bad, field", [
    ({"method": "eagle"}, "method"),
    ({"num_speculative_tokens": 17}, "num_speculative_tokens"),
    ({"num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"),
    ({"draft_model": "x"}, "unknown fields"),
])
def test_a_bad_speculative_config_names_its_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(speculative_config=bad)


def test_requests_whose_tokens_the_verifier_cannot_replay_do_not_speculate():
    assert speculates(SamplingParams(), NGRAM) is NGRAM
    assert speculates(SamplingParams(speculative_config={"num_speculative_tokens": 0}), NGRAM) is None
    assert speculates(SamplingParams(speculative_config={"num_speculative_tokens": 2}), None).num_speculative_tokens == 2
    for params in (SamplingParams(logprobs=0), SamplingParams(frequency_penalty=0.5),
                   SamplingParams(repetition_penalty=1.2), SamplingParams(presence_penalty=1.0)):
        assert speculates(params, NGRAM) is None


# ---- the verifier -------------------------------------------------------------------------------

def _state(**params) -> SamplingState:
    return SamplingState(SamplingParams(**params), [0], [], None)


def _chunk(req_id: str, drafts: list[int]) -> ScheduledChunk:
    return ScheduledChunk(req_id, 0, [9] + drafts, [0], True, num_drafts=len(drafts))


def test_greedy_keeps_drafts_up_to_the_first_the_model_would_not_pick():
    # rows score positions 0..2; the model's choices are 1, 2, 0
    logits = torch.full((3 + 1, 4), -5.0)
    for row, best in enumerate([1, 2, 0]):
        logits[row, best] = 5.0
    logits[3, 3] = 5.0  # a plain request sharing the step
    states = [_state(temperature=0), _state(temperature=0)]
    chunks = [_chunk("a", [1, 3]), ScheduledChunk("b", 0, [9], [0], True)]
    result = verify(Sampler(), logits, states, chunks)
    assert result.num_accepted == [1, 0]
    assert result.token_ids == [2, 3]  # the correction after one draft; b's own token
    all_right = verify(Sampler(), logits[:3], states[:1], [_chunk("a", [1, 2])])
    assert (all_right.num_accepted, all_right.token_ids) == ([2], [0])  # both drafts, and one more


def test_sampled_tokens_keep_the_model_distribution():
    """Rejection sampling against fixed drafts: the emitted pair (first two tokens) must follow
    p0(x) * p1(y | x = draft) exactly as plain sampling would."""
    torch.manual_seed(0)
    p0 = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p2 = torch.tensor([0.25, 0.25, 0.25, 0.25])
    rows = torch.stack([p0, p1, p2]).log()
    trials = 20_000
    counts = torch.zeros(4, 4)
    single = torch.zeros(4)
    generator = torch.Generator().manual_seed(1)
    state = SamplingState(SamplingParams(temperature=1.0, seed=1), [0], [], generator)
    for _ in range(trials):
        r = verify(Sampler(), rows, [state], [_chunk("a", [1, 3])])
        emitted = [1, 3][: r.num_accepted[0]] + [r.token_ids[0]]
        single[emitted[0]] += 1
        if emitted[0] == 1:
            counts[1, emitted[1]] += 1
    assert torch.allclose(single / trials, p0, atol=0.012)
    # given the first token was the draft, the second follows p1
    assert torch.allclose(counts[1] / counts[1].sum(), p1, atol=0.02)


# ---- in the engine ------------------------------------------------------------------------------

LOOP = [11, 12, 13, 14, 15, 16, 17, 18]


def generate(engine, prompt: list[int], params: SamplingParams) -> list[int]:
    rid = engine.add(prompt, params)
    return tokens_of(run_all(engine)[rid])


def test_greedy_output_is_unchanged_and_drafts_are_accepted(make_tiny_engine):
    prompts = [LOOP * 6, [3, 4, 5] * 10, list(range(40, 90))]
    plain = make_tiny_engine()
    spec = make_tiny_engine(speculative_config={"num_speculative_tokens": 4, "prompt_lookup_max": 3})
    expected = {}
    for engine in (plain, spec):
        ids = [engine.add(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for p in prompts]
        # a request that turns it off, batched with the others
        ids.append(engine.add(prompts[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                         speculative_config={"num_speculative_tokens": 0})))
        outs = run_all(engine)
        got = [tokens_of(outs[i]) for i in ids]
        expected.setdefault("tokens", got)
        assert got == expected["tokens"]
        assert all(len(t) == 40 for t in got)  # max_tokens holds exactly, drafts or not
        bm = engine.block_manager
        bm.check()
        assert bm.num_used == 0
    assert plain.num_draft_tokens == 0
    assert spec.num_accepted_tokens > 0
    assert spec.load().num_draft_tokens == spec.num_draft_tokens >= spec.num_accepted_tokens


def test_a_stop_token_inside_accepted_drafts_ends_the_request_there(make_tiny_engine):
    engine = make_tiny_engine()
    prompt = LOOP * 6
    free = generate(engine, prompt, SamplingParams(max_tokens=30, temperature=0))
    stop = free[12]
    first = free.index(stop)
    for cfg in (None, {"num_speculative_tokens": 4}):
        rid = engine.add(prompt, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop],
                                                speculative_config=cfg))
        outs = run_all(engine)[rid]
        assert tokens_of(outs) == free[: first + 1]
        assert outs[-1].finish_reason.value == "stop" and outs[-1].stop_reason == stop


def test_drafts_publish_only_verified_blocks_to_the_prefix_cache(make_tiny_engine):
    """A request's blocks filled through accepted drafts are shared by a later request with the
    same tokens, and the shared KV gives that request the same output."""
    engine = make_tiny_engine(speculative_config={"num_speculative_tokens": 4})
    prompt = LOOP * 4
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    first = generate(engine, prompt, params)
    assert engine.num_accepted_tokens > 0
    hits = engine.block_manager.prefix_hits
    second = generate(engine, prompt + first[:16], params)
    assert engine.block_manager.prefix_hits - hits >= len(prompt) + 12  # blocks of 4 tokens
    reference = make_tiny_engine(enable_prefix_caching=False)
    assert second == generate(reference, prompt + first[:16], params)


def test_seeded_sampling_with_drafts_is_reproducible(make_tiny_engine):
    engine = make_tiny_engine(speculative_config={"num_speculative_tokens": 3})
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    runs = [generate(engine, LOOP * 5, params) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 30
