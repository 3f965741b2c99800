"""Moving a request between instances, written once: live migration (Llumnix) and the P/D
hand-off, as generators of engine operations.

A protocol yields :class:`Op` values, each an engine call on the source or the destination
(``EngineCore.read_blocks``, ``stage_kv``, ``export``, ``import_``, ``release``, ``restore``,
``unstage``). Whoever drives it carries the call out and sends the result back — or throws the
engine's ``ValueError`` in when it refused — and the protocol decides what comes next, including
every rollback. The Ray cluster drives it with actor calls; the simulator with direct calls on
its engines at link-timed events. So the two cannot disagree on what a migration does; they differ
only in how long each step takes. The generator's return value is the outcome: ``done``,
``rolled_back`` or ``finished_first``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

SRC, DST = "src", "dst"


@dataclass(frozen=True)
class Op:
    """``side``'s engine is to run ``call(*args)`` for the request being moved."""

    side: str  # SRC or DST
    call: str  # an EngineCore method: read_blocks, stage_kv, export, import_, release, restore, unstage
    args: tuple = ()

    @property
    def needs_live_request(self) -> bool:
        """Whether the request must still be running on the source: if it ended meanwhile the
        driver throws :class:`RequestGone` in instead of making the call."""
        return self.side == SRC and self.call in ("read_blocks", "export")


class RequestGone(Exception):
    """Thrown into a protocol when the request ended on the source meanwhile."""


Protocol = Generator[Op, Any, str]


def live_migration(req_id: str, max_stages: int) -> Protocol:
    """Copy the request's full KV blocks in up to ``max_stages`` rounds while it keeps decoding on
    the source, then stop-and-copy: export the tail, import on the destination, free the source.
    Any refusal rolls back and the request continues on the source."""
    next_block = 0
    for _ in range(max_stages):
        try:
            kv, end = yield Op(SRC, "read_blocks", (req_id, next_block))
        except (ValueError, RequestGone):  # ended meanwhile
            yield Op(DST, "unstage", (req_id,))
            return "finished_first"
        if kv is None:  # no new full block since the last round
            break
        try:
            yield Op(DST, "stage_kv", (req_id, kv, next_block))
        except ValueError:  # no room on the destination
            yield Op(DST, "unstage", (req_id,))
            return "rolled_back"
        next_block = end
    try:
        state = yield Op(SRC, "export", (req_id, next_block, False))
    except RequestGone:
        yield Op(DST, "unstage", (req_id,))
        return "finished_first"
    except ValueError:  # lost its KV to a recompute preemption: move it without the staged blocks
        yield Op(DST, "unstage", (req_id,))
        state = yield Op(SRC, "export", (req_id, 0, False))
    return (yield from _land(req_id, state))


def pd_handoff(req_id: str, state: Any) -> Protocol:
    """A prefilled request parked on a prefill instance (``state``: its export, KV kept there)
    moves to its decode instance; if the import is refused it continues where it is."""
    return (yield from _land(req_id, state))


def _land(req_id: str, state: Any) -> Protocol:
    try:
        yield Op(DST, "import_", (state,))
    except ValueError:  # no room: continue on the source
        yield Op(DST, "unstage", (req_id,))
        yield Op(SRC, "restore", (req_id,))
        return "rolled_back"
    yield Op(SRC, "release", (req_id,))
    return "done"
