"""Agent programs inside one engine: program-level FCFS and KV time-to-live pins (Continuum).

An agent program is a chain of turns (requests with the same ``session_id``) separated by tool
calls. Two things keep its turns fast under load:

- **Program-level FCFS**: a turn is ordered by when its program arrived, not when the turn did,
  so a returning turn goes ahead of new programs; with aging, by at most ``aging_s`` (a new
  program that has waited that long is not passed by returning turns any more).
- **TTL pins**: when a turn ends and its metadata says more turns follow, the blocks holding its
  context (the prefix cache's full blocks) are pinned in the block manager for a time-to-live
  chosen from the pauses seen so far: a quantile of the pauses after the same tool (else of this
  program, else of every program), with a margin, at most ``max_ttl_s``. The next turn's
  admission takes the blocks as its cached prefix and drops the pin; so do expiry and the
  program's end; once the next turn has arrived its pin no longer expires. Pins hold at most
  ``max_pinned_fraction`` of the pool, the youngest program's giving way first, and yield to
  running requests that need blocks, and to a waiting request that an idle engine cannot start
  otherwise: idle compute is never won back, while a yielded pin costs its program at most the
  prefill of its context.

Nothing here reads a clock: times are handed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from shoal.engine.block_manager import BlockManager
from shoal.engine.request import Request


PROGRAM_SCHEDULING = ("none", "continuum")
MAX_PROGRAMS = 65536  # programs remembered (LRU): their first arrival and pauses


@dataclass(frozen=True)
class ProgramConfig:
    """``scheduling``: ``continuum`` (program-level FCFS and TTL pins) or ``none`` (request-level
    FCFS, no pins: what engines without a notion of programs do)."""

    scheduling: str = "continuum"
    aging_s: float = 10.0
    max_pinned_fraction: float = 0.7
    default_ttl_s: float = 2.0  # before any pause has been seen
    max_ttl_s: float = 30.0
    ttl_quantile: float = 0.9
    ttl_margin: float = 1.25
    history: int = 64  # pauses remembered per tool and per program

    def __post_init__(self) -> None:
        if self.scheduling not in PROGRAM_SCHEDULING:
            raise ValueError(f"program scheduling must be one of {', '.join(PROGRAM_SCHEDULING)}, got {self.scheduling!r}")
        for name in ("aging_s", "default_ttl_s", "max_ttl_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.max_pinned_fraction <= 1 or not 0 < self.ttl_quantile <= 1 or not self.ttl_margin >= 1:
            raise ValueError("max_pinned_fraction must be in [0, 1], ttl_quantile in (0, 1], ttl_margin >= 1")
        if self.history < 1:
            raise ValueError("history must be >= 1")

    @classmethod
    def from_dict(cls, options: dict) -> "ProgramConfig":
        """From JSON options (``--program-config``); ValueError naming an unknown key."""
        if not isinstance(options, dict):
            raise ValueError(f"program options are a JSON object, got {type(options).__name__}")
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown program option(s) {sorted(unknown)}; known: {', '.join(cls.__dataclass_fields__)}")
        try:
            return cls(**options)
        except TypeError as exc:  # a string where a number belongs
            raise ValueError(f"bad program option: {exc}") from None

    @property
    def enabled(self) -> bool:
        return self.scheduling == "continuum"


class PauseEstimator:
    """Tool-call pauses seen so far (time from a turn's end to the next turn's arrival), by tool
    name, by program and overall; each a bounded window of the latest."""

    MIN_SAMPLES = 3  # of a tool's or program's own before they are trusted

    def __init__(self, history: int) -> None:
        self.history = history
        self._by_tool: dict[str, deque[float]] = {}
        self._by_program: dict[str, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=4 * history)

    def observe(self, program: str, tool: str | None, pause_s: float) -> None:
        self._all.append(pause_s)
        self._by_program.setdefault(program, deque(maxlen=self.history)).append(pause_s)
        if tool is not None:
            self._by_tool.setdefault(tool, deque(maxlen=self.history)).append(pause_s)

    def forget(self, program: str) -> None:
        self._by_program.pop(program, None)

    def quantile(self, program: str, tool: str | None, q: float) -> float | None:
        """The ``q`` quantile of the most specific window with enough samples; None before any."""
        for window in (self._by_tool.get(tool) if tool is not None else None, self._by_program.get(program)):
            if window is not None and len(window) >= self.MIN_SAMPLES:
                return _quantile(window, q)
        return _quantile(self._all, q) if self._all else None


def _quantile(xs, q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class Program:
    """What the engine knows of one program."""

    program_id: str
    first_arrival: float
    turns: int = 0  # turns finished
    last_end: float | None = None  # when the latest turn finished (while a next turn is awaited)
    tool: str | None = None  # the tool the latest turn said it calls
    pin: list[int] = field(default_factory=list)  # blocks pinned for the next turn
    expires: float = math.inf

    @property
    def value(self) -> tuple[float, int]:
        """Which pins are kept when not all can be: the older program's (program-level FCFS: the
        programs served first finish first), then the one with more turns."""
        return (-self.first_arrival, self.turns)


@dataclass
class ProgramStats:
    pins: int = 0  # pins made
    pin_hits: int = 0  # next turns admitted while their pin held
    expired: int = 0
    yielded: int = 0  # pins dropped for a running request's blocks (or an idle engine's next request)
    displaced: int = 0  # pins dropped for a more valuable pin


class ProgramTable:
    """The engine's programs and their pins, all through the block manager."""

    def __init__(self, config: ProgramConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.programs: OrderedDict[str, Program] = OrderedDict()
        self.pinned: dict[str, Program] = {}  # the programs holding a pin (a step looks only at these)
        self.pauses = PauseEstimator(config.history)
        self.stats = ProgramStats()

    @staticmethod
    def program_of(req: Request) -> str | None:
        return None if req.metadata is None else req.metadata.session_id

    # ---- turns --------------------------------------------------------------------------------

    def arrive(self, req: Request) -> None:
        """A turn arrived: remember its program, and learn the pause after the previous turn."""
        pid = self.program_of(req)
        if pid is None or not self.config.enabled:
            return
        prog = self.programs.get(pid)
        if prog is None:
            prog = self.programs[pid] = Program(pid, req.arrival_time)
            if len(self.programs) > MAX_PROGRAMS:
                old, dropped = self.programs.popitem(last=False)
                self._unpin(dropped)
                self.pauses.forget(old)
        else:
            self.programs.move_to_end(pid)
            if prog.last_end is not None:
                self.pauses.observe(pid, prog.tool, max(0.0, req.arrival_time - prog.last_end))
                prog.last_end = None
            prog.expires = math.inf  # its turn is here: the pin holds until the turn is admitted

    def order_time(self, req: Request) -> float:
        """The arrival time that orders the request: its program's, or at most ``aging_s``
        earlier than its own."""
        pid = self.program_of(req)
        prog = self.programs.get(pid) if pid is not None and self.config.enabled else None
        if prog is None:
            return req.arrival_time
        return max(prog.first_arrival, req.arrival_time - self.config.aging_s)

    def admitted(self, req: Request) -> None:
        """The turn holds its blocks now: its program's pin is not needed any more."""
        prog = self._program(req)
        if prog is not None and prog.pin:
            self.stats.pin_hits += 1
            self._unpin(prog)

    def finished(self, req: Request, now: float, completed: bool) -> None:
        """Before the turn's blocks are freed: pin its context if its program continues
        (``completed``: it ended by stop / length, not abort or error)."""
        prog = self._program(req)
        if prog is None:
            return
        pid = self.program_of(req)
        meta = req.metadata
        if not (completed and meta is not None and meta.more_turns):
            self._unpin(prog)
            del self.programs[pid]
            self.pauses.forget(pid)
            return
        prog.turns += 1
        prog.last_end = now
        prog.tool = meta.tool
        self._unpin(prog)
        blocks = self.bm.cached_blocks(req.req_id) if req.req_id in self.bm.tables else []
        ttl = self.ttl(pid, meta.tool)
        if not blocks or ttl <= 0 or not self._make_pin_room(len(blocks), prog.value):
            return
        self.bm.pin(blocks)
        prog.pin, prog.expires = blocks, now + ttl
        self.pinned[pid] = prog
        self.stats.pins += 1

    def ttl(self, program: str, tool: str | None) -> float:
        cfg = self.config
        q = self.pauses.quantile(program, tool, cfg.ttl_quantile)
        return min(cfg.max_ttl_s, cfg.default_ttl_s if q is None else q * cfg.ttl_margin)

    # ---- pins under time and pressure ---------------------------------------------------------

    def expire(self, now: float) -> None:
        """Release the pins whose time-to-live has run out."""
        for prog in [p for p in self.pinned.values() if p.expires <= now]:
            self._unpin(prog)
            self.stats.expired += 1

    def yield_until(self, done: Callable[[], bool]) -> bool:
        """Drop pins, the youngest program's first, until ``done()``; False if that did not make it
        true (the caller preempts then)."""
        for prog in sorted(self.pinned.values(), key=lambda p: p.value):
            if done():
                return True
            self._unpin(prog)
            self.stats.yielded += 1
        return done()

    @property
    def num_pinned_programs(self) -> int:
        return len(self.pinned)

    def _make_pin_room(self, n: int, value: tuple[float, int]) -> bool:
        """Whether ``n`` more pinned blocks fit the share of the pool pins may hold, after dropping
        pins less valuable than ``value``."""
        limit = int(self.config.max_pinned_fraction * self.bm.num_blocks)
        if n > limit:
            return False
        for prog in sorted(self.pinned.values(), key=lambda p: p.value):
            if self.bm.num_pinned + n <= limit or prog.value >= value:
                break
            self._unpin(prog)
            self.stats.displaced += 1
        return self.bm.num_pinned + n <= limit

    def _program(self, req: Request) -> Program | None:
        pid = self.program_of(req)
        return self.programs.get(pid) if pid is not None and self.config.enabled else None

    def _unpin(self, prog: Program) -> None:
        if prog.pin:
            self.bm.unpin(prog.pin)
            prog.pin, prog.expires = [], math.inf
            del self.pinned[prog.program_id]
