"""Progress of long commands, on stderr only and only on a terminal.

Library code that runs for a while takes an optional :data:`Progress` callback and calls it with
``(done, total)``; it knows nothing of how (or whether) that is drawn. The CLI passes a
:class:`Bar` from :func:`bar`: a rich progress bar on stderr when stderr is a terminal, and
nothing at all otherwise, so that pipes and CI logs carry no escape codes and stdout carries only
the result.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Progress = Callable[[int, int], None]
"""Called with (units done, units in all) as work completes."""

_MIN_INTERVAL_S = 0.1  # redraw at most this often (a simulation may finish thousands of requests a second)


class Bar:
    """A :data:`Progress` callback drawing one rich task, or doing nothing when ``progress`` is None."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if done < total and now - self._last < _MIN_INTERVAL_S:
            return
        self._last = now
        self._progress.update(self._task, completed=done, total=total)

    def describe(self, text: str) -> None:
        """Rename the task (a new phase of the work)."""
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def bar(description: str, total: int | None = None) -> Iterator[Bar]:
    """A progress bar (a spinner while ``total`` is unknown) on stderr while the block runs, removed
    when it ends; a silent :class:`Bar` when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    # stdout is never redirected: a result printed meanwhile must stay on stdout
    with RichProgress(*columns, console=Console(stderr=True), transient=True, redirect_stdout=False) as progress:
        yield Bar(progress, progress.add_task(description, total=total))
