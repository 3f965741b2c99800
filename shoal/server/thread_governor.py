"""Torch threads that follow the CPU left over: an engine process whose cores are shared.

On a small machine the engine's intra-op threads wait for each other at every operator, so one
busy neighbour on one of two cores makes every step wait for the descheduled thread (a 2-thread
engine falls to ~30% of its speed beside one spinning process; a 1-thread one keeps ~70%). Between
steps, the governor samples how many other tasks are running on the machine (``procs_running`` in
``/proc/stat``, less itself — its OpenMP workers sleep between steps under ``OMP_WAIT_POLICY=PASSIVE``
— and less the server process that feeds it, whose work is part of serving), and every ``window``
steps sets torch's thread count to the cores the others leave: a neighbour that ran at least
``busy`` of the time counts as a whole core taken.
"""

from __future__ import annotations

import math
import os
from typing import Callable


def read_procs_running() -> int | None:
    """Tasks running on the machine now (this one included); None where ``/proc/stat`` is not."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def running_tasks(pid: int) -> int:
    """Threads of process ``pid`` running now (0 if it cannot be read)."""
    n = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    n += f.read().rpartition(")")[2].split()[0] == "R"
            except OSError:
                pass
    except OSError:
        pass
    return n


def read_others() -> int | None:
    """Tasks running now other than this one and its parent's (the server process)."""
    running = read_procs_running()
    return None if running is None else max(0, running - 1 - running_tasks(os.getppid()))


def threads_for(others: float, cores: int, max_threads: int, busy: float = 0.75) -> int:
    """Threads to run when other tasks keep ``others`` cores busy on average."""
    taken = math.floor(others + (1.0 - busy))
    return max(1, min(max_threads, cores - taken))


class ThreadGovernor:
    """Call :meth:`observe` after every step; it calls ``set_threads`` when the count should change."""

    def __init__(self, max_threads: int, set_threads: Callable[[int], None], *, window: int = 16,
                 cores: int | None = None, read: Callable[[], int | None] = read_others) -> None:
        self.max_threads = max_threads
        self.cores = cores or len(os.sched_getaffinity(0))
        self.window = window
        self.threads = max_threads
        self._set, self._read = set_threads, read
        self._samples: list[int] = []

    def observe(self) -> None:
        others = self._read()
        if others is None:
            return
        self._samples.append(others)
        if len(self._samples) < self.window:
            return
        want = threads_for(sum(self._samples) / len(self._samples), self.cores, self.max_threads)
        self._samples.clear()
        if want != self.threads:
            self.threads = want
            self._set(want)
