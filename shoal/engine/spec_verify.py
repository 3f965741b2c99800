"""Verification of speculative drafts (see :mod:`shoal.engine.speculative`): one forward pass has
scored the newest token and its drafts; keep the longest run of drafts the model accepts, and one
token more."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shoal.engine.sampler import SampleResult, Sampler, SamplingState, apply_logit_bias, warp_logits

if TYPE_CHECKING:
    from shoal.engine.scheduler import ScheduledChunk


def verify(sampler: Sampler, logits: torch.Tensor, states: list[SamplingState],
           chunks: list[ScheduledChunk]) -> SampleResult:
    """Sample the step's chunks from ``logits``, which holds ``1 + chunk.num_drafts`` rows per sampled
    chunk, in order. Chunks without drafts go through ``sampler`` as usual; the others keep their
    accepted drafts and one more token: under greedy decoding exactly the tokens plain
    decoding gives; under sampling drawn from the same distribution."""
    offsets, row = [], 0
    for c in chunks:
        offsets.append(row)
        row += 1 + c.num_drafts
    plain = [i for i, c in enumerate(chunks) if not c.num_drafts]
    token_ids = [0] * len(chunks)
    logprobs: list = [None] * len(chunks)
    accepted = [0] * len(chunks)
    if plain:
        rows = torch.tensor([offsets[i] for i in plain], device=logits.device)
        result = sampler(logits[rows], [states[i] for i in plain])
        for i, t, lp in zip(plain, result.token_ids, result.logprobs):
            token_ids[i], logprobs[i] = t, lp
    spec = [i for i, c in enumerate(chunks) if c.num_drafts]
    row_states = [states[i] for i in spec for _ in range(1 + chunks[i].num_drafts)]
    rows = torch.tensor([offsets[i] + j for i in spec for j in range(1 + chunks[i].num_drafts)], device=logits.device)
    processed = apply_logit_bias(logits[rows].float(), row_states)
    greedy = [s.params.greedy for s in row_states]
    targets = processed.argmax(dim=-1).tolist() if any(greedy) else None
    probs = None if all(greedy) else warp_logits(processed, [s.params for s in row_states]).softmax(dim=-1)
    base = 0
    for i in spec:
        drafts, state = chunks[i].token_ids[1:], states[i]
        k = len(drafts)
        if state.params.greedy:
            a = 0
            while a < k and drafts[a] == targets[base + a]:
                a += 1
            token_ids[i], accepted[i] = targets[base + a], a
        else:
            token_ids[i], accepted[i] = _accept_sampled(probs[base : base + k + 1], drafts, state.generator)
        base += k + 1
    return SampleResult(token_ids=token_ids, logprobs=logprobs, num_accepted=accepted)


def _accept_sampled(probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None) -> tuple[int, int]:
    """Rejection sampling of point-mass drafts against ``probs`` ``[k + 1, vocab]``: returns the
    token after the accepted drafts and how many were accepted."""
    k = len(drafts)
    u = torch.rand(k, generator=generator, device=generator.device if generator else "cpu").tolist()
    p_drafts = probs[torch.arange(k, device=probs.device), torch.tensor(drafts, device=probs.device)].tolist()
    for a in range(k):
        if u[a] >= p_drafts[a]:
            residual = probs[a].clone()
            residual[drafts[a]] = 0.0
            if not residual.sum() > 0:  # p(d) rounded below 1 with nothing else possible
                continue
            return _draw(residual, generator), a
    return _draw(probs[k], generator), k


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token drawn in proportion to ``weights`` (the exponential race, as the sampler draws)."""
    u = torch.rand(weights.shape[0], generator=generator, device=generator.device if generator else "cpu")
    return int((weights / -u.to(weights.device).log()).argmax())
