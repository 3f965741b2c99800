"""The engine process's thread governor: its rule on scripted readings, and the reading itself
(the CPU time other processes take) against a real spinning neighbour."""

from __future__ import annotations

import multiprocessing
import time

from shoal.server.thread_governor import CpuOfOthers, ThreadGovernor, threads_for


def test_threads_follow_the_cores_other_tasks_leave():
    assert threads_for(0.0, cores=2, max_threads=2) == 2
    assert threads_for(0.3, cores=2, max_threads=2) == 2  # a client reading its tokens, now and then
    assert threads_for(1.0, cores=2, max_threads=2) == 1  # a neighbour spinning on one core
    assert threads_for(3.0, cores=2, max_threads=2) == 1  # never fewer than one
    assert threads_for(1.0, cores=8, max_threads=4) == 4  # never more than asked for


def test_the_governor_reads_once_a_window_and_sets_only_on_a_change():
    readings = iter([1.0, 0.1, 0.0])  # a neighbour on one core, then (almost) none
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


def test_without_a_reading_nothing_changes():
    calls = []
    gov = ThreadGovernor(2, calls.append, window=1, cores=2, read=lambda: None)
    gov.observe()
    assert calls == [] and gov.threads == 2


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_spinning_neighbour_reads_as_about_one_core_and_this_process_as_none():
    """Each reading is taken against the machine's background over the same length of time while
    this process sleeps, so that other work on the machine (a busy CI host) does not count."""
    others = CpuOfOthers()
    time.sleep(0.4)
    background = others()
    _spin(0.4)  # this process's own work is not another's
    mine = others()
    neighbour = multiprocessing.get_context("spawn").Process(target=_spin, args=(1.5,))
    neighbour.start()
    time.sleep(0.5)  # past its start-up
    others()
    time.sleep(0.8)
    spinning = others()
    neighbour.join()
    if mine is None:  # no /proc here
        return
    assert mine - background < 0.6, (mine, background)
    assert 0.5 < spinning - background < 1.6, (spinning, background)
