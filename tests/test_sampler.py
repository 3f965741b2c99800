import math

import pytest
import torch

from shoal.engine.sampler import Sampler, SamplingState, apply_penalties, apply_top_k_top_p, make_generator
from shoal.engine.sampling_params import SamplingParams

sampler = Sampler()


def state(prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SamplingState:
    params = SamplingParams(**kw)
    return SamplingState(params, prompt or [], output or [], make_generator(params))


def test_make_generator():
    assert make_generator(SamplingParams()) is None
    assert make_generator(SamplingParams(seed=3, temperature=0.0)) is None
    g1, g2 = make_generator(SamplingParams(seed=3)), make_generator(SamplingParams(seed=3))
    assert g1.device.type == "cpu"
    assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))


def test_generator_state_restore_replays_tokens():
    logits = _random_logits(1, 300, seed=9)
    s = state(seed=5)
    saved = s.generator.get_state()
    first = [sampler(logits, [s]).token_ids[0] for _ in range(10)]
    s.generator.set_state(saved)
    assert [sampler(logits, [s]).token_ids[0] for _ in range(10)] == first
    assert len(set(first)) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    result = sampler(logits, [state(temperature=0.0) for _ in range(6)])
    assert result.token_ids == logits.float().argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 6


def _random_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    return 3 * torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 1},
        {"top_p": 1e-6},
        {"temperature": 1e-4},
        {"min_p": 1.0},
        {"top_k": 1, "temperature": 5.0},
    ],
)
def test_degenerate_filters_equal_greedy(kw):
    logits = _random_logits(8, 500, seed=1)
    torch.manual_seed(0)
    for step in range(5):
        states = [state(seed=step * 10 + i if i % 2 else None, **kw) for i in range(8)]
        assert sampler(logits, states).token_ids == logits.argmax(dim=-1).tolist()


def test_mixed_greedy_and_random_rows():
    logits = _random_logits(4, 50, seed=2)
    states = [state(temperature=0.0), state(seed=1, top_k=1), state(temperature=0.0), state(seed=7)]
    ids = sampler(logits, states).token_ids
    argmax = logits.argmax(dim=-1).tolist()
    assert ids[:3] == argmax[:3]
    alone = sampler(logits[3:], [state(seed=7)]).token_ids
    assert ids[3] == alone[0]


def test_min_p_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 2000
    logits = probs.log().expand(n, 4)
    torch.manual_seed(0)
    ids = sampler(logits, [state(min_p=0.4) for _ in range(n)]).token_ids  # threshold 0.2
    assert set(ids) == {0, 1}
    ids = sampler(logits, [state(min_p=0.2) for _ in range(n)]).token_ids  # threshold 0.1
    assert set(ids) == {0, 1, 2}


def _reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    order = row.argsort(descending=True).tolist()
    if 0 < k < len(order):
        order = order[:k]
    if p >= 1.0:
        return set(order)
    probs = row[order].softmax(dim=0).tolist()
    keep, total = [], 0.0
    for token, prob in zip(order, probs):
        keep.append(token)
        total += prob
        if total >= p:
            break
    return set(keep)


@pytest.mark.parametrize("with_top_p", [False, True])  # top-k alone takes a partial-topk path
def test_top_k_top_p_match_reference(with_top_p):
    logits = _random_logits(6, 64, seed=4)
    top_k = [0, -1, 1, 5, 64, 70]
    top_p = [0.5, 0.9, 1.0, 0.3, 0.99, 1.0] if with_top_p else [1.0] * 6
    masked = apply_top_k_top_p(logits, top_k, top_p)
    for row in range(6):
        kept = set(torch.isfinite(masked[row]).nonzero().flatten().tolist())
        assert kept == _reference_keep(logits[row], top_k[row], top_p[row])
        assert torch.equal(masked[row][list(kept)], logits[row][list(kept)])


def test_penalties_follow_formulas():
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.5, 3.0, -2.0],
            [2.0, -1.0, 0.5, 3.0, -2.0],
            [2.0, -1.0, 0.5, 3.0, -2.0],
        ]
    )
    states = [
        state(prompt=[0], output=[1, 1, 3], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        state(prompt=[0, 1, 2, 3, 4], output=[4, 4]),  # neutral parameters: untouched
        state(prompt=[0], output=[3, 3, 3], presence_penalty=-1.0),  # prompt ignored by presence
    ]
    out = apply_penalties(logits, states)
    # Row 0. Repetition over prompt+output {0, 1, 3}: 2/2=1, -1*2=-2, 3/2=1.5.
    # Output counts: token 1 twice, token 3 once.
    # token 1: -2 - 0.5*2 - 0.25 = -3.25; token 3: 1.5 - 0.5*1 - 0.25 = 0.75.
    expected = torch.tensor(
        [
            [1.0, -3.25, 0.5, 0.75, -2.0],
            [2.0, -1.0, 0.5, 3.0, -2.0],
            [2.0, -1.0, 0.5, 4.0, -2.0],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits[0], expected[1])  # input not modified


@pytest.mark.parametrize("penalty", [3e-170, 5e-324, 1e300])
def test_extreme_repetition_penalties_keep_logits_finite(penalty):
    """A penalty near 0 or huge (fuzzed bodies send them) must not make a row of infinities whose
    softmax is NaN: every later stage, a grammar's mask included, needs finite logits to choose from."""
    logits = torch.tensor([[2.0, 3.0, -1.0, 0.5]])
    out = apply_penalties(logits, [state(prompt=[0, 1, 2], repetition_penalty=penalty, temperature=1.0)])
    assert torch.isfinite(out).all()
    token = sampler(logits, [state(prompt=[0, 1, 2], repetition_penalty=penalty, temperature=1.0)]).token_ids[0]
    assert 0 <= token < 4


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert sampler(logits, [state(output=[0], temperature=0.0)]).token_ids == [0]
    assert sampler(logits, [state(output=[0], temperature=0.0, presence_penalty=0.5)]).token_ids == [1]
    assert sampler(logits, [state(prompt=[0], temperature=0.0, repetition_penalty=1.1)]).token_ids == [1]
    assert sampler(logits, [state(prompt=[0], temperature=0.0, frequency_penalty=2.0)]).token_ids == [0]


def _run_steps(step_logits: list[torch.Tensor], states: list[SamplingState], row: int) -> list[int]:
    tokens = []
    for logits in step_logits:
        ids = sampler(logits, states).token_ids
        for s, t in zip(states, ids):
            s.output_token_ids.append(t)
        tokens.append(ids[row])
    return tokens


def test_seeded_sampling_is_batch_independent():
    vocab, steps = 1000, 20
    target = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(5))
    kw = {"seed": 1234, "temperature": 0.8, "top_p": 0.95, "top_k": 200}
    alone = _run_steps([t[None] for t in target], [state(**kw)], row=0)

    others = _random_logits(steps * 5, vocab, seed=6).view(steps, 5, vocab)
    batched_logits = []
    for t in range(steps):
        step = others[t].clone()
        step[3] = target[t]
        batched_logits.append(step)
    torch.manual_seed(99)
    batch = [
        state(seed=1),
        state(temperature=0.0),
        state(min_p=0.1, frequency_penalty=1.0, repetition_penalty=1.3),
        state(**kw),
        state(temperature=1.5, top_k=5, presence_penalty=0.5),
    ]
    assert _run_steps(batched_logits, batch, row=3) == alone
    assert len(set(alone)) > 5  # really random, not stuck on one token

    other_seed = _run_steps([t[None] for t in target], [state(**{**kw, "seed": 4321})], row=0)
    assert other_seed != alone


def _chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


# p = [0.5, 0.25, 0.125, 0.125]; each case's expected sampling distribution.
@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, [0.5, 0.25, 0.125, 0.125]),
        ({"temperature": 2.0}, [w / (1 + 2 * 2**0.5) for w in (2**0.5, 1, 2**-0.5, 2**-0.5)]),  # ∝ p ** (1/2)
        ({"top_k": 2}, [2 / 3, 1 / 3, 0, 0]),
        ({"top_p": 0.7}, [2 / 3, 1 / 3, 0, 0]),
        ({"top_k": 3}, [0.5, 0.25, 0.125, 0.125]),  # ties with the k-th logit are kept
        ({"min_p": 0.3}, [2 / 3, 1 / 3, 0, 0]),
        ({"top_k": 3, "top_p": 0.7}, [2 / 3, 1 / 3, 0, 0]),
        ({"top_k": 2, "top_p": 0.6}, [1, 0, 0, 0]),  # top-p applies to the top-k renormalised probs
    ],
)
def test_sampling_distribution(kw, expected):
    n = 4000
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().expand(n, 4)
    torch.manual_seed(0)
    ids = sampler(logits, [state(**kw) for _ in range(n)]).token_ids
    counts = [ids.count(i) for i in range(4)]
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0)
    dof = sum(p > 0 for p in expected) - 1
    # 99.9% quantiles of chi-square with 0..3 degrees of freedom.
    assert _chi_square(counts, expected) <= {0: 0.0, 1: 10.83, 2: 13.82, 3: 16.27}[dof]


def test_seeded_stream_distribution():
    probs = [0.6, 0.3, 0.1]
    logits = torch.tensor(probs).log()[None]
    s = state(seed=42)
    counts = [0, 0, 0]
    for _ in range(1500):
        counts[sampler(logits, [s]).token_ids[0]] += 1
    assert _chi_square(counts, probs) < 13.82


def test_logprobs_from_raw_logits():
    logits = _random_logits(3, 100, seed=3)
    states = [
        state(temperature=0.0, logprobs=5, presence_penalty=2.0, output=[int(logits[0].argmax())]),
        state(seed=0, temperature=0.5, logprobs=0),
        state(seed=1),
    ]
    result = sampler(logits, states)
    ref = logits.log_softmax(dim=-1)
    assert result.logprobs[2] is None
    for row in (0, 1):
        sampled, top = result.logprobs[row]
        token = result.token_ids[row]
        assert sampled.token_id == token
        assert math.isclose(sampled.logprob, ref[row, token].item(), abs_tol=1e-5)
        assert sampled.rank == int((ref[row] > ref[row, token]).sum()) + 1
    # Row 0's penalty moved it off the raw argmax, so the sampled rank is > 1.
    assert result.logprobs[0][0].rank > 1
    top = result.logprobs[0][1]
    assert [lp.rank for lp in top] == [1, 2, 3, 4, 5]
    assert [lp.token_id for lp in top] == ref[0].argsort(descending=True)[:5].tolist()
    assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
    for lp in top:
        assert math.isclose(lp.logprob, ref[0, lp.token_id].item(), abs_tol=1e-5)
    assert result.logprobs[1][1] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_with_cpu_generators_match_cpu():
    logits = _random_logits(4, 2000, seed=8)
    kw = [{"seed": 1}, {"seed": 2, "top_p": 0.9, "temperature": 0.7}, {"temperature": 0.0}, {"seed": 3, "min_p": 0.05}]
    cpu = sampler(logits, [state(**k) for k in kw])
    assert sampler(logits.cuda(), [state(**k) for k in kw]).token_ids == cpu.token_ids
    # Generators on the logits' device: still batch-independent.
    cuda_states = [SamplingState(SamplingParams(**k), [], [], make_generator(SamplingParams(**k), "cuda")) for k in kw]
    alone = sampler(logits[1:2].cuda(), [cuda_states[1]]).token_ids
    cuda_states[1].generator.manual_seed(2)
    assert sampler(logits.cuda(), cuda_states).token_ids[1] == alone[0]
