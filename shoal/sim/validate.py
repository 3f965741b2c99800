"""Fidelity: run one workload on the real engine and in the simulator, compare the percentiles.

The real run drives an in-process :class:`Engine` open-loop (requests enter at their arrival times
by the wall clock, the engine steps continuously), so it measures exactly what the simulator
models: the engine and its scheduler, without HTTP in between. Each real step is also timed and
priced by the cost model (``step_time`` in the result), so a latency error can be split into the
cost model missing this machine's speed and the schedules diverging.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable

import numpy as np

from shoal.bench.agent import AgentProgram, AgentWorkload, TurnRecord, program_summary
from shoal.bench.prompts import PromptMaker
from shoal.bench.report import RequestRecord, summarize
from shoal.bench.workloads import Workload
from shoal.control.policies import LeastLoad
from shoal.engine.core import EngineCore
from shoal.engine.engine import Engine
from shoal.engine.metadata import RequestMetadata
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import StepPlan
from shoal.engine.cost_model import FEATURES, CostModel, LinearCostModel, plan_features
from shoal.progress import Progress
from shoal.sim.profile import fit_steps
from shoal.sim.simulator import InstanceSpec, simulate


DECODE_BUCKETS = (("0", 0, 0), ("1-8", 1, 8), ("9-32", 9, 32), ("33+", 33, float("inf")))  # decodes a step
_DECODES = FEATURES.index("decodes")


class StepLog:
    """An engine's executor, wrapped for a real run: the features and wall time of every step."""

    def __init__(self, executor) -> None:
        self.inner = executor
        self.features: list[list[float]] = []
        self.seconds: list[float] = []

    def execute(self, plan: StepPlan, states):
        t0 = time.perf_counter()
        result = self.inner.execute(plan, states)
        self.seconds.append(time.perf_counter() - t0)
        self.features.append(plan_features(plan))
        return result

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def fitted(self, engine: Engine) -> LinearCostModel | None:
        """A cost model fitted on these steps of ``engine`` (None with fewer than 4 a feature)."""
        if len(self.seconds) < 4 * len(FEATURES):
            return None
        return fit_steps(engine, np.array(self.features), np.array(self.seconds))

    def report(self, cost_model: CostModel) -> dict:
        """The real steps' total time against the cost model's price of the same steps, overall
        and (``by_decodes``) for steps of 0, 1-8, 9-32 and more decodes: where a profile fitted on
        a grid of small batches misprices a busy engine."""
        predicted = [cost_model.time(f) for f in self.features]
        real, priced = sum(self.seconds), sum(predicted)
        by_decodes = {}
        for label, lo, hi in DECODE_BUCKETS:
            picked = [i for i, f in enumerate(self.features) if lo <= f[_DECODES] <= hi]
            if picked:
                r, p = sum(self.seconds[i] for i in picked), sum(predicted[i] for i in picked)
                by_decodes[label] = {"steps": len(picked), "real_s": r, "predicted_s": p,
                                     "rel_error": (p - r) / r if r else None}
        return {"steps": len(self.seconds), "real_s": real, "predicted_s": priced,
                "rel_error": (priced - real) / real if real else None,
                "mean_abs_rel_error": (float(np.mean([abs(p - s) / s for p, s in zip(predicted, self.seconds) if s > 0]))
                                       if self.seconds else None),
                "by_decodes": by_decodes}


def logged_steps(engine: Engine, run: Callable[[], tuple]) -> tuple[tuple, StepLog]:
    """``run()`` with the engine's steps logged (its executor is restored after)."""
    log = StepLog(engine.executor)
    engine.executor = log
    try:
        return run(), log
    finally:
        engine.executor = log.inner


STALE_STEP_ERROR = 0.2  # a cost model that prices real steps further off than this is stale here


def stale_cost_model(fidelity: dict, calibrated_path: str) -> str | None:
    """A warning when the cost model priced the real run's steps more than :data:`STALE_STEP_ERROR`
    off (every simulated latency inherits that error), naming the remedies; None otherwise."""
    error = fidelity["step_time"]["rel_error"]
    if error is None or abs(error) <= STALE_STEP_ERROR:
        return None
    remedy = f" or pass --cost-model {calibrated_path}" if "calibrated" in fidelity else ""
    return (f"the cost model prices this machine's steps {error:+.0%} off (step_time): re-profile with "
            f"`shoal profile`{remedy}")


def real_run(engine: Engine, workload: Workload,
             progress: Progress | None = None) -> tuple[list[RequestRecord], float]:
    """Replay ``workload`` on the engine in real time (``progress`` hears of each request ended);
    returns the records and the duration."""
    maker = PromptMaker(engine.tokenizer) if engine.tokenizer is not None else None
    rng = np.random.default_rng(0)
    groups: dict[int, list[int]] = {}
    prompts = [maker.for_request(r, i, groups) if maker else rng.integers(1, engine.vocab_size, r.prompt_len).tolist()
               for i, r in enumerate(workload.requests)]
    records = [RequestRecord(r.arrival_s, r.prompt_len, r.output_len, tenant=r.tenant) for r in workload.requests]
    by_id: dict[str, RequestRecord] = {}
    t0 = time.perf_counter()
    nxt = ended = 0
    while nxt < len(records) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(records) and records[nxt].arrival_s <= now:
            rec = records[nxt]
            spec = workload.requests[nxt]
            rid = engine.add(prompts[nxt], SamplingParams(temperature=0.0, max_tokens=rec.output_len, ignore_eos=True),
                             metadata=RequestMetadata(tenant=spec.tenant, weight=spec.weight))
            rec.start_s = rec.arrival_s
            by_id[rid] = rec
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, records[nxt].arrival_s - (time.perf_counter() - t0)))
            continue
        outputs = engine.step()
        end = time.perf_counter() - t0
        for out in outputs:
            rec = by_id[out.req_id]
            if out.new_token_ids:
                rec.first_token_s = rec.first_token_s if rec.first_token_s is not None else end
                rec.token_times_s.append(end)
            if out.finished:
                rec.end_s, rec.output_tokens, rec.error = end, out.num_output_tokens, out.error
                ended += 1
                if progress is not None:
                    progress(ended, len(records))
    return records, time.perf_counter() - t0


def spec_of(engine: Engine, cost_model: CostModel) -> InstanceSpec:
    """The simulated instance shaped like ``engine`` (pool, second tier, batch limits, its scheduler's
    policies: admission, fair share and program scheduling)."""
    cfg = engine.scheduler.config
    return InstanceSpec(
        cost_model,
        num_blocks=engine.block_manager.num_blocks,
        block_size=engine.block_manager.block_size,
        num_swap_blocks=engine.block_manager.num_swap_blocks,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        scheduling_policy=cfg.policy,
        admission=cfg.admission,
        urgent_slack_s=cfg.urgent_slack_s,
        fair_preempt_tokens=cfg.fair_preempt_tokens,
        resident_swap=cfg.resident_swap,
        fair_first_token=cfg.fair_first_token,
        fair_prefill_tokens=cfg.fair_prefill_tokens,
        fair_prefill_stretch=None if cfg.fair_prefill_stretch is None else cfg.fair_prefill_stretch.fraction,
        step_time_limit_s=None if cfg.step_time_budget is None else cfg.step_time_budget.limit_s,
        programs=cfg.programs,
        num_tier_blocks=engine.block_manager.tier.num_slots if engine.block_manager.tier else 0,
    )


def compare(workload: Workload, engine: Engine, cost_model: CostModel, slo=(1000.0, 100.0),
            progress: Progress | None = None, also: dict[str, CostModel] | None = None) -> dict:
    """Real vs simulated p50 / p90 of TTFT, TPOT and E2E, with relative errors (``progress``
    follows the real run, the long part); see :func:`_verdicts` for ``step_time`` and ``calibrated``.
    ``also``: more cost models to simulate with (e.g. one calibrated on another run), by name."""
    (real, real_dur), log = logged_steps(engine, lambda: real_run(engine, workload, progress))
    r = summarize(real, workload.description, *slo, real_dur)

    def rows(cm: CostModel) -> tuple[dict, dict]:
        s = simulated_summary(workload, engine, cm, slo)
        return {k: metric_row(quantile(r, k), quantile(s, k), "ms") for k in COMPARED}, {}

    return {"workload": workload.description, **_verdicts(rows, cost_model, log, engine, also)}


COMPARED = tuple(f"{m}_{q}" for m in ("ttft", "tpot", "e2e") for q in ("p50", "p90"))
"""The latencies :func:`compare` sets real against simulated, as its rows are keyed."""


def quantile(summary: dict, key: str) -> float:
    """The latency a :data:`COMPARED` key names (e.g. ``tpot_p50``), in ms, from a run's summary."""
    metric, q = key.rsplit("_", 1)
    return summary[f"{metric}_ms"][q]


def simulated_summary(workload: Workload, engine: Engine, cost_model: CostModel, slo=(1000.0, 100.0)) -> dict:
    """``workload`` run in the simulator on one instance shaped like ``engine``, priced by ``cost_model``."""
    sim, duration = simulate(workload, [spec_of(engine, cost_model)], LeastLoad())[:2]
    return summarize(sim, workload.description, *slo, duration)


def metric_row(real: float, sim: float, unit: str) -> dict:
    """One metric, real against simulated, with the simulator's relative error."""
    return {f"real_{unit}": real, f"sim_{unit}": sim, "rel_error": abs(sim - real) / real if real else None}


def _max_error(rows: dict) -> float:
    return max(v["rel_error"] for v in rows.values() if v["rel_error"] is not None)


def _verdicts(rows: Callable[[CostModel], tuple[dict, dict]], cost_model: CostModel, log: StepLog,
              engine: Engine, also: dict[str, CostModel] | None = None) -> dict:
    """``rows(cm)`` simulates with ``cm``: (the rows whose worst error is the verdict, other facts).
    Returns them with ``cost_model``, the real steps against its price (``step_time``), and, given
    enough steps, the rows again with a cost model fitted on the run's own steps (``calibrated``:
    what error is left there is the schedules diverging, not the step times), and with each of
    ``also`` (``also``)."""
    metrics, facts = rows(cost_model)
    out = {"metrics": metrics, **facts, "max_rel_error": _max_error(metrics), "step_time": log.report(cost_model)}
    fitted = log.fitted(engine)
    if fitted is not None:
        again, facts = rows(fitted)
        out["calibrated"] = {"metrics": again, **facts, "max_rel_error": _max_error(again), "cost_model": fitted.to_dict()}
    for name, cm in (also or {}).items():
        again, facts = rows(cm)
        out.setdefault("also", {})[name] = {"metrics": again, **facts, "max_rel_error": _max_error(again),
                                            "step_time": log.report(cm)}
    return out


def real_agent_run(engine: EngineCore, workload: AgentWorkload, clock: Callable[[], float] | None = None,
                   seed: int = 0, progress: Progress | None = None) -> tuple[list[TurnRecord], float]:
    """Replay an agent workload on the engine: each program's turns in order, the next one sent
    ``tool_s`` after the previous one ended, its prompt the real previous prompt and reply plus
    new (random) tokens. Times come from ``clock`` (default: the wall clock; it must be the
    engine's own clock); while nothing is due, the run sleeps on the wall clock. ``progress`` hears
    of each program ended."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    now = clock or (lambda: time.perf_counter() - t0)
    start = now()
    due: list[tuple[float, int, AgentProgram, int, list[int]]] = []  # (time, order, program, turn, context)
    for i, prog in enumerate(workload.programs):
        heapq.heappush(due, (start + prog.arrival_s, i, prog, 0, []))
    order = len(workload.programs)
    programs_ended = 0
    records: list[TurnRecord] = []
    live: dict[str, tuple[TurnRecord, AgentProgram, int, list[int], list[int]]] = {}
    while due or engine.has_unfinished():
        t = now()
        while due and due[0][0] <= t:
            _, _, prog, k, context = heapq.heappop(due)
            turn = prog.turns[k]
            prompt = context + rng.integers(1, engine.vocab_size, turn.prompt_tokens).tolist()
            rec = prog.turn_record(k, len(prompt), t - start)
            records.append(rec)
            rid = engine.add(prompt, SamplingParams(temperature=0.0, max_tokens=turn.output_tokens, ignore_eos=True),
                             req_id=prog.turn_id(k), metadata=prog.turn_metadata(k))
            live[rid] = (rec, prog, k, prompt, [])
        if not engine.has_unfinished():
            if clock is None:
                time.sleep(max(0.0, due[0][0] - now()))
            else:
                clock.t = max(clock.t, due[0][0])  # type: ignore[attr-defined]
            continue
        outputs = engine.step()
        end = now() - start
        for out in outputs:
            rec, prog, k, prompt, reply = live[out.req_id]
            reply.extend(out.new_token_ids)
            if out.new_token_ids and rec.first_token_s is None:
                rec.first_token_s = end
            rec.token_times_s.extend([end] * bool(out.new_token_ids))
            if out.finished:
                del live[out.req_id]
                rec.end_s, rec.output_tokens, rec.error = end, out.num_output_tokens, out.error
                rec.cached_tokens = out.num_cached_tokens
                if out.error is None and k + 1 < len(prog.turns):
                    order += 1
                    heapq.heappush(due, (start + end + prog.turns[k].tool_s, order, prog, k + 1, prompt + reply))
                else:
                    programs_ended += 1
                    if progress is not None:
                        progress(programs_ended, len(workload.programs))
    return records, now() - start


def compare_agent(workload: AgentWorkload, engine: Engine, cost_model: CostModel,
                  progress: Progress | None = None) -> dict:
    """Real vs simulated job completion time (mean, p50, p90) and recomputed prefill of an agent
    workload on one instance shaped like ``engine``, with relative errors (``progress`` follows
    the real run's programs); see :func:`_verdicts` for ``step_time`` and ``calibrated``."""
    (real, _), log = logged_steps(engine, lambda: real_agent_run(engine, workload, progress=progress))
    r = program_summary(workload, real)

    def rows(cm: CostModel) -> tuple[dict, dict]:
        s = program_summary(workload, simulate(workload, [spec_of(engine, cm)], LeastLoad())[0])  # type: ignore[arg-type]
        return ({f"jct_{q}": metric_row(r["jct_s"][q], s["jct_s"][q], "s") for q in ("mean", "p50", "p90")},
                {"recomputed_prefill_tokens_per_program": {"real": r["recomputed_prefill_tokens_per_program"]["mean"],
                                                           "sim": s["recomputed_prefill_tokens_per_program"]["mean"]},
                 "completed": {"real": r["completed"], "sim": s["completed"]}})

    return {"workload": workload.description, "scheduling": engine.scheduler.config.programs.scheduling,
            **_verdicts(rows, cost_model, log, engine)}
