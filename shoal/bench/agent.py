"""Agent workloads: programs of LLM turns separated by tool calls, and their job completion time.

One program a JSON line::

    {"program_id": "p0", "arrival_s": 0.0, "tenant": "a", "priority": 0,
     "turns": [{"prompt_tokens": 1800, "output_tokens": 120, "tool_s": 1.4, "tool": "bash"}, ...]}

A turn's ``prompt_tokens`` are new tokens appended to the program's context so far (the first
turn's: the task and system prompt; later turns': the tool's output or the user's message); the
turn's prompt is the whole context, so prefix caches see every earlier turn. ``tool_s`` is the
pause after the turn before the next one is sent (ignored after the last); ``tool`` (optional)
names the tool called, whose pauses the engine learns. ``tenant`` and ``priority`` are optional.

``shoal bench serve --workload agent:PATH`` replays it against a server and ``shoal sim --workload
agent:PATH`` simulates it; both add a ``programs`` object (job completion time and more) to the
result. ``generate`` writes such traces from parameters, with presets shaped after published agent
workloads (see the README).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shoal.bench.report import RequestRecord, stats
from shoal.engine.metadata import SLO, RequestMetadata
from shoal.engine.request import PRIORITY_MAX, PRIORITY_MIN


@dataclass(frozen=True)
class AgentTurn:
    prompt_tokens: int
    output_tokens: int
    tool_s: float = 0.0
    tool: str | None = None


@dataclass(frozen=True)
class AgentProgram:
    program_id: str
    arrival_s: float
    turns: tuple[AgentTurn, ...]
    tenant: str | None = None
    priority: int = 0

    def context_before(self, turn: int) -> int:
        """Tokens of the program's context when ``turn`` is sent (its prompt length)."""
        return sum(t.prompt_tokens + t.output_tokens for t in self.turns[:turn]) + self.turns[turn].prompt_tokens

    def turn_id(self, turn: int) -> str:
        """The request id of ``turn``: ``<program_id>/<turn>``."""
        return f"{self.program_id}/{turn}"

    def turn_metadata(self, turn: int, slo: SLO | None = None) -> RequestMetadata:
        """What ``turn`` tells the engine: its program (the session), whether more turns follow,
        the tool its reply calls, and the program's tenant and priority."""
        return RequestMetadata(priority=self.priority, tenant=self.tenant, session_id=self.program_id,
                               more_turns=turn + 1 < len(self.turns), tool=self.turns[turn].tool, slo=slo)

    def turn_record(self, turn: int, prompt_len: int, now: float) -> TurnRecord:
        """The record of ``turn`` sent at ``now`` with a prompt of ``prompt_len`` tokens."""
        # the previous reply's last token was sampled, never computed: it is new to the KV too
        return TurnRecord(now, prompt_len, self.turns[turn].output_tokens, start_s=now, tenant=self.tenant,
                          program_id=self.program_id, turn=turn, new_tokens=self.turns[turn].prompt_tokens + (turn > 0))


@dataclass
class AgentWorkload:
    kind: str
    programs: list[AgentProgram]
    description: dict = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return sum(len(p.turns) for p in self.programs)


class TraceError(ValueError):
    """A malformed agent trace; the message names the line and the field."""


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise TraceError(f"{where}: {what}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_program(obj, where: str) -> AgentProgram:
    """One program from its decoded JSON object; TraceError saying what is wrong."""
    _check(isinstance(obj, dict), where, "a program must be a JSON object")
    unknown = set(obj) - {"program_id", "arrival_s", "turns", "tenant", "priority"}
    _check(not unknown, where, f"unknown fields {sorted(unknown)}")
    pid = obj.get("program_id")
    _check(isinstance(pid, str) and 0 < len(pid) <= 256, where, "program_id must be a non-empty string (at most 256 characters)")
    _check(_is_num(obj.get("arrival_s")) and obj["arrival_s"] >= 0, where, "arrival_s must be a number >= 0")
    turns = obj.get("turns")
    _check(isinstance(turns, list) and turns, where, "turns must be a non-empty list")
    tenant = obj.get("tenant")
    _check(tenant is None or isinstance(tenant, str), where, "tenant must be a string")
    prio = obj.get("priority", 0)
    _check(_is_int(prio) and PRIORITY_MIN <= prio <= PRIORITY_MAX, where, "priority must be a 32-bit integer")
    parsed = []
    for k, t in enumerate(turns):
        at = f"{where}, turn {k}"
        _check(isinstance(t, dict), at, "a turn must be a JSON object")
        unknown = set(t) - {"prompt_tokens", "output_tokens", "tool_s", "tool"}
        _check(not unknown, at, f"unknown fields {sorted(unknown)}")
        _check(_is_int(t.get("prompt_tokens")) and t["prompt_tokens"] >= 1, at, "prompt_tokens must be an integer >= 1")
        _check(_is_int(t.get("output_tokens")) and t["output_tokens"] >= 1, at, "output_tokens must be an integer >= 1")
        _check(_is_num(t.get("tool_s", 0.0)) and t.get("tool_s", 0.0) >= 0, at, "tool_s must be a number >= 0")
        _check(t.get("tool") is None or isinstance(t["tool"], str), at, "tool must be a string")
        parsed.append(AgentTurn(t["prompt_tokens"], t["output_tokens"], float(t.get("tool_s", 0.0)), t.get("tool")))
    return AgentProgram(pid, float(obj["arrival_s"]), tuple(parsed), tenant, prio)


def json_lines(path: Path):
    """``(path:line, object)`` for each non-blank line of a JSON-lines trace; TraceError at a line
    that is not JSON."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{n}: not JSON ({exc.msg})") from None


def load(path: str | Path, time_scale: float = 1.0, max_context: int | None = None) -> AgentWorkload:
    """Read a JSON-lines agent trace (programs sorted by arrival). ``time_scale`` multiplies arrival
    times (not pauses: tools take as long as they take). A program whose context would outgrow
    ``max_context`` loses its last turns (counted in the description as ``clipped_programs``)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"agent trace not found: {path}")
    if not time_scale > 0:
        raise TraceError("time_scale must be positive")
    programs, seen = [], set()
    for where, obj in json_lines(path):
        prog = parse_program(obj, where)
        _check(prog.program_id not in seen, where, f"program_id {prog.program_id!r} appears twice")
        seen.add(prog.program_id)
        programs.append(prog)
    _check(bool(programs), str(path), "no programs")
    clipped = 0
    if max_context is not None:
        kept = []
        for p in programs:
            k = len(p.turns)
            while k > 0 and p.context_before(k - 1) + p.turns[k - 1].output_tokens > max_context:
                k -= 1
            _check(k > 0, str(path), f"program {p.program_id!r}'s first turn alone exceeds max_context {max_context}")
            clipped += k < len(p.turns)
            kept.append(AgentProgram(p.program_id, p.arrival_s, p.turns[:k], p.tenant, p.priority))
        programs = kept
    programs = sorted((AgentProgram(p.program_id, p.arrival_s * time_scale, p.turns, p.tenant, p.priority)
                       for p in programs), key=lambda p: (p.arrival_s, p.program_id))
    span = programs[-1].arrival_s
    return AgentWorkload("agent", programs, {
        "kind": "agent", "trace": path.name, "time_scale": time_scale, "num_programs": len(programs),
        "num_turns": sum(len(p.turns) for p in programs), "span_s": span,
        "rate": len(programs) / span if span else None, "max_context": max_context, "clipped_programs": clipped})


def dump(programs: list[AgentProgram], path: str | Path) -> None:
    """Write programs as a JSON-lines trace (what :func:`load` reads back)."""
    with Path(path).open("w") as f:
        for p in programs:
            obj = asdict(p)
            obj["turns"] = [{k: v for k, v in asdict(t).items() if v is not None} for t in p.turns]
            for key in ("tenant",):
                if obj[key] is None:
                    del obj[key]
            f.write(json.dumps(obj) + "\n")


@dataclass(frozen=True)
class AgentShape:
    """The distributions a generated program is drawn from. Turns per program: 1 + Poisson(mean
    - 1), capped; token counts: lognormal with the given median and spread (sigma of the log);
    pauses: each turn calls one of ``tools`` (by weight), whose pause is lognormal."""

    turns_mean: float
    turns_max: int
    first_prompt_median: int
    append_median: int
    output_median: int
    tools: dict[str, tuple[float, float, float]]  # name -> (weight, median pause s, sigma)
    sigma: float = 0.5


PRESETS = {
    # Software-engineering agents (SWE-agent / OpenHands on SWE-bench): long tasks with a large
    # first prompt (instructions, issue, tool docs), tool outputs appended each turn, short actions.
    "swe": AgentShape(turns_mean=12, turns_max=40, first_prompt_median=1800, append_median=350, output_median=110,
                      tools={"bash": (0.45, 0.8, 0.8), "edit": (0.25, 0.3, 0.5), "search": (0.2, 0.5, 0.6),
                             "run_tests": (0.1, 6.0, 0.7)}),
    # Function-calling agents (BFCL multi-turn): a few turns, function docs up front, fast API tools.
    "bfcl": AgentShape(turns_mean=4, turns_max=10, first_prompt_median=700, append_median=90, output_median=50,
                       tools={"api_call": (0.7, 0.3, 0.6), "lookup": (0.3, 0.12, 0.5)}),
}


def generate(preset: str = "swe", num_programs: int = 50, rate: float = 0.5, seed: int = 0,
             scale_tokens: float = 1.0, turns_mean: float | None = None, burstiness: float = 1.0,
             tenants: dict[str, float] | None = None) -> list[AgentProgram]:
    """Programs arriving at ``rate`` per second (Gamma gaps of shape ``burstiness``; 1 is Poisson),
    shaped by ``PRESETS[preset]``; ``scale_tokens`` multiplies every token count (a small model on
    a CPU wants smaller programs), ``turns_mean`` overrides the preset's, and ``tenants`` (name ->
    share) assigns each program a tenant."""
    if preset not in PRESETS:
        raise ValueError(f"unknown agent preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not (num_programs >= 1 and rate > 0 and scale_tokens > 0 and burstiness > 0):
        raise ValueError("num_programs, rate, scale_tokens and burstiness must be positive")
    shape = PRESETS[preset]
    mean = shape.turns_mean if turns_mean is None else turns_mean
    if not mean >= 1:
        raise ValueError("turns_mean must be >= 1")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num_programs)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    names = list(shape.tools)
    weights = np.array([shape.tools[n][0] for n in names])
    tenant_names = list(tenants or {})
    tenant_p = np.array([tenants[n] for n in tenant_names]) if tenants else None

    def tokens(median: float) -> int:
        return max(1, round(median * scale_tokens * math.exp(rng.normal(0.0, shape.sigma))))

    programs = []
    for i, t0 in enumerate(arrivals):
        n = int(min(shape.turns_max, 1 + rng.poisson(mean - 1)))
        turns = []
        for k in range(n):
            tool = names[rng.choice(len(names), p=weights / weights.sum())]
            _, median, sigma = shape.tools[tool]
            last = k == n - 1
            turns.append(AgentTurn(tokens(shape.first_prompt_median if k == 0 else shape.append_median),
                                   tokens(shape.output_median),
                                   0.0 if last else round(median * math.exp(rng.normal(0.0, sigma)), 4),
                                   None if last else tool))
        tenant = tenant_names[rng.choice(len(tenant_names), p=tenant_p / tenant_p.sum())] if tenants else None
        programs.append(AgentProgram(f"p{i}", round(float(t0), 4), tuple(turns), tenant))
    return programs


@dataclass
class TurnRecord(RequestRecord):
    """One turn of a program: a request record, plus its program and the tokens it had to prefill."""

    program_id: str = ""
    turn: int = 0
    new_tokens: int = 0  # tokens that were not in the context before (its appended prompt, the last reply's end)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


def program_summary(workload: AgentWorkload, records: list[TurnRecord]) -> dict:
    """Job completion time (program arrival to its last turn's end; programs with a failed or
    missing turn count as failed) and the prompt tokens prefilled again per program: what each turn
    prefilled beyond its new tokens (its context's earlier tokens, lost from the cache)."""
    by_prog: dict[str, list[TurnRecord]] = {}
    for r in records:
        by_prog.setdefault(r.program_id, []).append(r)
    jct, recomputed, ok_turns = [], [], 0
    for p in workload.programs:
        turns = by_prog.get(p.program_id, [])
        done = len(turns) == len(p.turns) and all(t.ok for t in turns)
        if done:
            jct.append(max(t.end_s for t in turns) - p.arrival_s)  # type: ignore[type-var]
            recomputed.append(sum(max(0, t.prompt_len - t.cached_tokens - t.new_tokens) for t in turns))
        ok_turns += sum(t.ok for t in turns)
    return {
        "num_programs": len(workload.programs),
        "completed": len(jct),
        "failed": len(workload.programs) - len(jct),
        "turns_completed": ok_turns,
        "jct_s": stats(jct, scale=1.0),
        "recomputed_prefill_tokens_per_program": stats(recomputed, scale=1.0),
    }
