"""Torch threads that follow the CPU left over: an engine process whose cores are shared.

On a small machine the engine's intra-op threads wait for each other at every operator, so one
busy neighbour on one of two cores makes every step wait for the descheduled thread (a 2-thread
engine falls to ~30% of its speed beside one spinning process; a 1-thread one keeps ~70%). Every
``window`` steps, the governor reads how much CPU time other processes took meanwhile (the machine's
busy time in ``/proc/stat`` less its own and the server process's, whose work is part of serving),
and sets torch's thread count to the cores the others leave: a neighbour that ran at least ``busy``
(half) of the time counts as a whole core taken — a spinning neighbour beside a 2-thread engine gets
only ~0.7 of a core, so it must count, while a client streaming 32 requests takes ~0.1.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

log = logging.getLogger(__name__)


def _proc_jiffies(pid: int | str) -> int:
    """CPU time (user + system, clock ticks) of every thread of process ``pid``; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
    except (OSError, IndexError, ValueError):
        return 0


class CpuOfOthers:
    """Cores that other processes kept busy since the previous call: the machine's busy time in
    ``/proc/stat`` less this process's and its parent's (the server process, whose work is part of
    serving), over the time elapsed. A time average, unlike a count of running tasks sampled after
    each step, which catches the step's own consumers (the client reading its token) every time."""

    def __init__(self) -> None:
        self._cpus = os.cpu_count() or 1
        self._last = self._sample()

    def _sample(self) -> tuple[int, int] | None:
        """(all CPUs' ticks, ticks busy outside this process and its parent); None without /proc."""
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        total, idle = sum(ticks), ticks[3] + ticks[4]  # idle + iowait
        return total, total - idle - _proc_jiffies("self") - _proc_jiffies(os.getppid())

    def __call__(self) -> float | None:
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[0] <= last[0]:
            return None
        return max(0.0, (now[1] - last[1]) * self._cpus / (now[0] - last[0]))


def threads_for(others: float, cores: int, max_threads: int, busy: float = 0.5) -> int:
    """Threads to run when other tasks keep ``others`` cores busy on average."""
    taken = math.floor(others + (1.0 - busy))
    return max(1, min(max_threads, cores - taken))


class ThreadGovernor:
    """Call :meth:`observe` after every step; every ``window`` steps it reads the cores others used
    meanwhile and calls ``set_threads`` when the count should change."""

    def __init__(self, max_threads: int, set_threads: Callable[[int], None], *, window: int = 16,
                 cores: int | None = None, read: Callable[[], float | None] | None = None) -> None:
        self.max_threads = max_threads
        self.cores = cores or len(os.sched_getaffinity(0))
        self.window = window
        self.threads = max_threads
        self._set, self._read = set_threads, read or CpuOfOthers()
        self._steps = 0

    def observe(self) -> None:
        self._steps += 1
        if self._steps < self.window:
            return
        self._steps = 0
        others = self._read()
        if others is None:
            return
        want = threads_for(others, self.cores, self.max_threads)
        log.debug("other processes used %.2f cores: %d torch threads", others, want)
        if want != self.threads:
            self.threads = want
            self._set(want)
