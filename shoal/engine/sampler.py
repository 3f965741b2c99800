"""Batched token sampler: penalties, temperature, min-p/top-k/top-p, logprobs.

Random rows are sampled with the exponential race (``argmax(probs / q)``,
``q ~ Exp(1)``), which draws exactly from ``probs``. Each seeded request
draws its noise vector from its own generator, so its tokens do not depend on
which other requests share the batch or on its row. The noise is drawn on the
generator's device (CPU by default, see :func:`make_generator`) and copied to
the logits' device in one transfer per step; unseeded rows share the global
RNG of the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shoal.engine.guided import mask_logits
from shoal.engine.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """Per-request sampling state that lives across steps.

    The engine appends each sampled token to ``output_token_ids``; the sampler
    only reads it.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    matcher: Any = None  # the llguidance matcher of a guided request (the engine advances it)
    speculative: Any = None  # the request's SpeculativeConfig when it drafts (see engine/speculative.py)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator on ``device`` seeded with ``params.seed``; None if unseeded or greedy.

    A CPU generator (the default) works whatever device the logits are on; one
    on the logits' device saves drawing the noise on the CPU and copying it.
    Token streams for a seed differ between CPU and CUDA generators.
    """
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


@dataclass
class Logprob:
    """Log-probability of one token; ``rank`` 1 is the most likely token."""

    token_id: int
    logprob: float
    rank: int


@dataclass
class SampleResult:
    """One sampled token per sampled chunk, plus (sampled, top alternatives) logprobs when asked.
    A chunk that carried draft tokens (speculative decoding) emits its first ``num_accepted[i]``
    drafts, then ``token_ids[i]``; ``num_accepted`` is None when no chunk had drafts."""

    token_ids: list[int]
    logprobs: list[tuple[Logprob, list[Logprob]] | None]
    num_accepted: list[int] | None = None


def _padded(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[N, max_len] long tensor of ``seqs`` right-padded with ``pad`` (width >= 1)."""
    width = max(1, max(map(len, seqs)))
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


LOGIT_LIMIT = 1e4  # penalised logits stay within +-this: far past any real logit gap, never infinite


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Apply repetition (prompt+output), frequency and presence (output only) penalties.

    Repetition: seen tokens' positive logits are divided by the penalty and
    negative ones multiplied. Then ``logit -= frequency * count + presence * (count > 0)``.
    Returns a new tensor; stages no row needs are skipped.
    """
    n, vocab = logits.shape
    dev = logits.device
    rep = [s.params.repetition_penalty for s in states]
    freq = [s.params.frequency_penalty for s in states]
    pres = [s.params.presence_penalty for s in states]
    if any(r != 1.0 for r in rep):
        # Padding id ``vocab`` scatters into an extra column that is dropped.
        seen_ids = _padded(
            [s.prompt_token_ids + s.output_token_ids if r != 1.0 else [] for s, r in zip(states, rep)], vocab, dev
        )
        seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, seen_ids, True)[:, :vocab]
        penalty = torch.where(seen, torch.tensor(rep, device=dev).unsqueeze(1), 1.0)
        # A penalty near 0 (or huge) would send logits to +-inf, and a row of infinities to NaN;
        # kept finite, every stage after (the grammar's mask included) still has a token to pick.
        logits = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    if any(f != 0.0 or p != 0.0 for f, p in zip(freq, pres)):
        out_ids = _padded(
            [s.output_token_ids if f != 0.0 or p != 0.0 else [] for s, f, p in zip(states, freq, pres)], vocab, dev
        )
        counts = torch.zeros(n, vocab + 1, device=dev).scatter_add_(1, out_ids, torch.ones(out_ids.shape, device=dev))
        counts = counts[:, :vocab]
        logits = (
            logits
            - torch.tensor(freq, device=dev).unsqueeze(1) * counts
            - torch.tensor(pres, device=dev).unsqueeze(1) * (counts > 0)
        )
    return logits


def apply_logit_bias(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Add each row's ``logit_bias``; a new tensor when any row has one (the raw logits stay for logprobs)."""
    biased = [i for i, s in enumerate(states) if s.params.logit_bias]
    if not biased:
        return logits
    logits = logits.clone()
    for i in biased:
        bias = states[i].params.logit_bias
        ids = torch.tensor(list(bias), device=logits.device)
        logits[i, ids] += torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
    return logits


def apply_grammar(logits: torch.Tensor, raw: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Mask guided rows to the tokens their grammar allows. Applied after the penalties and before
    temperature, min-p and top-k/top-p, so every later stage keeps at least one allowed token."""
    if all(s.matcher is None for s in states):
        return logits
    if logits is raw:
        logits = logits.clone()
    mask_logits(logits, [s.matcher for s in states])
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus.

    ``top_k <= 0`` (or >= vocab) disables top-k for that row; ties with the k-th
    logit are kept. Top-p keeps the smallest set of most likely tokens whose
    probability (after top-k) reaches ``top_p``; the most likely token always survives.
    """
    vocab = logits.shape[1]
    dev = logits.device
    ks = [k if 0 < k < vocab else 0 for k in top_k]  # 0: disabled
    if all(p >= 1.0 for p in top_p):
        # Top-k alone only needs each row's k-th largest logit: a partial topk beats a full sort.
        k = torch.tensor(ks, device=dev).unsqueeze(1)
        kth = logits.topk(max(ks), dim=-1).values.gather(1, (k - 1).clamp(min=0))
        return logits.masked_fill((logits < kth) & (k > 0), float("-inf"))
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if any(ks):
        k = torch.tensor([k or vocab for k in ks], device=dev)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - torch.tensor(top_p, device=dev).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = torch.tensor(min_p, device=logits.device).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def exponential_noise(states: list[SamplingState], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, vocab] Exp(1) noise, as ``-log(U)`` with U uniform on [0, 1).

    Seeded rows draw U from their own generator on that generator's device (then
    copied to ``device`` in one transfer); the other rows share the global RNG of ``device``.
    Uniform draws are ~6x cheaper than ``exponential_`` on the CPU.
    """
    seeded = [i for i, s in enumerate(states) if s.generator is not None]
    if len(seeded) < len(states):
        u = torch.rand(len(states), vocab, device=device)
    else:
        u = torch.empty(len(states), vocab, device=device)
    if seeded:
        gens = [states[i].generator for i in seeded]
        draws = torch.stack([torch.rand(vocab, generator=g, device=g.device) for g in gens])
        u[torch.tensor(seeded, device=device)] = draws.to(device)
    return -u.log()


def compute_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]
) -> list[tuple[Logprob, list[Logprob]]]:
    """Logprob and rank of ``token_ids`` under ``log_softmax(raw_logits)``, plus each row's top alternatives."""
    logprobs = raw_logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_vals, top_ids = logprobs.topk(max(num_top), dim=-1)
    result = []
    for t, lp, r, ids, vals, k in zip(
        token_ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), top_ids.tolist(), top_vals.tolist(), num_top
    ):
        top = [Logprob(i, v, rank) for rank, (i, v) in enumerate(zip(ids[:k], vals[:k]), start=1)]
        result.append((Logprob(t, lp, r), top))
    return result

class Sampler:
    """Samples one token per row of a logits batch according to each request's state."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        """Sample from ``logits`` [N, V] (any float dtype/device; computed in float32)."""
        raw = logits.float()
        logits = apply_penalties(apply_logit_bias(raw, states), states)
        logits = apply_grammar(logits, raw, states)
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if len(random_rows) == len(states):
            token_ids = self._sample_random(logits, states)
        else:
            token_ids = logits.argmax(dim=-1)
            if random_rows:
                idx = torch.tensor(random_rows, device=logits.device)
                sampled = self._sample_random(logits[idx], [states[i] for i in random_rows])
                token_ids = token_ids.index_copy(0, idx, sampled)

        want = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        logprobs: list[tuple[Logprob, list[Logprob]] | None] = [None] * len(states)
        if want:
            idx = torch.tensor(want, device=raw.device)
            computed = compute_logprobs(raw[idx], token_ids[idx], [states[i].params.logprobs for i in want])
            for i, lp in zip(want, computed):
                logprobs[i] = lp
        return SampleResult(token_ids=token_ids.tolist(), logprobs=logprobs)

    @staticmethod
    def _sample_random(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Temperature, min-p, top-k/top-p, then the exponential race, for non-greedy rows."""
        logits = warp_logits(logits, [s.params for s in states])
        noise = exponential_noise(states, logits.shape[1], logits.device)
        return (logits.softmax(dim=-1) / noise).argmax(dim=-1)


def warp_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, min-p, then top-k / top-p for rows that sample (stages no row needs are skipped);
    their softmax is the distribution a token is drawn from."""
    vocab = logits.shape[1]
    if any(p.temperature != 1.0 for p in params):
        logits = logits / torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, [p.min_p for p in params])
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        logits = apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    return logits
