"""The engine process's thread governor, on scripted ``procs_running`` readings."""

from __future__ import annotations

import os

from shoal.server.thread_governor import ThreadGovernor, read_procs_running, running_tasks, threads_for


def test_threads_follow_the_cores_other_tasks_leave():
    assert threads_for(0.0, cores=2, max_threads=2) == 2
    assert threads_for(0.3, cores=2, max_threads=2) == 2  # the API process, now and then
    assert threads_for(1.0, cores=2, max_threads=2) == 1  # a neighbour spinning on one core
    assert threads_for(3.0, cores=2, max_threads=2) == 1  # never fewer than one
    assert threads_for(1.0, cores=8, max_threads=4) == 4  # never more than asked for


def test_the_governor_decides_once_a_window_and_only_on_a_change():
    readings = iter([1] * 4 + [0] * 4 + [0] * 4)  # one other task, then none
    calls = []
    gov = ThreadGovernor(2, calls.append, window=4, cores=2, read=lambda: next(readings))
    for _ in range(3):
        gov.observe()
    assert calls == []
    gov.observe()
    assert calls == [1] and gov.threads == 1
    for _ in range(8):
        gov.observe()
    assert calls == [1, 2]  # back to two once the neighbour left; not set again while unchanged


def test_without_proc_stat_nothing_changes():
    calls = []
    gov = ThreadGovernor(2, calls.append, window=1, cores=2, read=lambda: None)
    gov.observe()
    assert calls == [] and gov.threads == 2
    assert read_procs_running() is None or read_procs_running() >= 1
    assert running_tasks(os.getpid()) in (0, 1)  # this thread, reading (0 without /proc)
