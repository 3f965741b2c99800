"""Keeping a planned live migration only where it is predicted to raise SLO attainment.

A migration policy (Llumnix's rules) proposes moves from load alone; whether a move helps
depends on the SLO and on how fast each instance computes. For a move of request ``r`` from
``src`` to ``dst``, the gate predicts with :class:`LatencyPredictor` what a typical request
(``probe_len`` prompt tokens) sees on each instance before and after the move — TTFT behind the
queued prefill work, and TPOT with the running batch — as a violation ratio (1.0: exactly at the
SLO). The worst of the pair is the figure of merit:

- ``drain`` moves are always kept (the instance is to be emptied, whatever it costs);
- a ``relieve`` move (the source is about to preempt, which no latency prediction prices) is kept
  when the destination still meets the SLO with ``r`` on it, or when the pair's worst violation
  drops;
- any other move is kept only when some of the pair misses the SLO now and the move lowers the
  pair's worst violation (by at least ``min_gain``): if both meet it, a move cannot raise
  attainment and only costs a copy and a stall.

A P/D hand-off goes where the request's TPOT is predicted to meet the SLO (or miss it least), and
not at all when decoding on its prefill instance is predicted better than anywhere else.

Declined moves are named by why (``slo_met``, ``no_gain``, ``dst_would_miss``); the global
scheduler counts them and the simulator's result JSON reports them beside the moves made.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from shoal.control.predictor import InstanceProfile, LatencyPredictor
from shoal.engine.metadata import SLO
from shoal.engine.outputs import InstanceLoad, RunningRequest

ALWAYS_KEPT = ("drain",)


def moved(load: InstanceLoad, req: RunningRequest, sign: int) -> InstanceLoad:
    """``load`` with ``req`` taken off (``sign`` -1) or put on (+1) its running batch."""
    blocks = -(-req.num_tokens // load.block_size)
    running = load.running + (req,) if sign > 0 else tuple(r for r in load.running if r.req_id != req.req_id)
    return replace(load, num_running=max(0, load.num_running + sign),
                   tokens_in_flight=max(0, load.tokens_in_flight + sign * req.num_tokens),
                   num_free_blocks=max(0, load.num_free_blocks - sign * blocks),
                   num_used_blocks=max(0, load.num_used_blocks + sign * blocks), running=running)


class MigrationGate:
    """Judges planned moves against the SLO with each instance's cost profile (by id; an
    instance without one is predicted with the first profile)."""

    def __init__(self, profiles: Mapping[int, InstanceProfile], slo: SLO,
                 predictor: LatencyPredictor | None = None, min_gain: float = 0.02) -> None:
        self.profiles = profiles  # the global scheduler's own mapping
        self.slo = slo
        self.predictor = predictor or LatencyPredictor()
        self.min_gain = min_gain

    def violation(self, instance_id: int, load: InstanceLoad, probe_len: int) -> float:
        """How far past the SLO a request of ``probe_len`` tokens arriving now is predicted to be."""
        return self.predictor.predict(self._profile(instance_id), load, probe_len).violation(self.slo)

    def decode_violation(self, instance_id: int, load: InstanceLoad, context_len: int) -> float:
        """How far past the TPOT SLO a request of ``context_len`` tokens decoding there is predicted to be."""
        return self.predictor.predict(self._profile(instance_id), load, max(1, context_len)).tpot_s / self.slo.tpot_s

    def _profile(self, instance_id: int) -> InstanceProfile:
        return self.profiles.get(instance_id) or next(iter(self.profiles.values()))

    def gains(self, after: float, before: float) -> bool:
        """Whether a violation of ``after`` instead of ``before`` is worth a move."""
        return after < before * (1 - self.min_gain)

    def judge(self, reason: str, req: RunningRequest, src: int, dst: int, loads: Mapping[int, InstanceLoad],
              probe_len: int) -> str | None:
        """None to keep the move of ``req`` (planned for ``reason``) from ``src`` to ``dst``;
        otherwise why it is declined."""
        if reason in ALWAYS_KEPT:
            return None
        before = max(self.violation(src, loads[src], probe_len), self.violation(dst, loads[dst], probe_len))
        dst_after = self.violation(dst, moved(loads[dst], req, +1), probe_len)
        after = max(self.violation(src, moved(loads[src], req, -1), probe_len), dst_after)
        gains = self.gains(after, before)
        if reason == "relieve":
            return None if dst_after <= 1.0 or gains else "dst_would_miss"
        if before <= 1.0:
            return "slo_met"
        return None if gains else "no_gain"
