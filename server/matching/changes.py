"""Changes of one mode's queue, in the order they happened: what the leader's pool applies.

Each change states the player's new state rather than a delta, so applying a change the pool
already reflects is harmless: a pool loaded from a snapshot and then given every change since a
stream position recorded *before* that snapshot ends up as if it had followed the stream all
along (``Added`` replaces, ``Removed`` of an absent player and grace of an absent player do
nothing). Both pool implementations dispatch on ``op`` (the compiled one knows no classes).

A player requeued after a failed match comes back with its original ticket, and so with its
original ``queued_at``: its ``Added`` lands at its old place in queue order, not at the end.
A player requeued while disconnected is ``Added`` then ``GraceOn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

ADD: Final = 0
REMOVE: Final = 1
GRACE_ON: Final = 2
GRACE_OFF: Final = 3


@dataclass(frozen=True, slots=True)
class Added:
    """Queued (enqueue, or requeue with the original ticket): matchable, replacing any entry
    of the player. An undecodable ticket makes the player poison: reported, not added."""

    player: str
    ticket: bytes | None  # the value in {mm:<mode>}:tickets (tickets.py)
    op: ClassVar[int] = ADD


@dataclass(frozen=True, slots=True)
class Removed:
    """Out of the queue: dequeued, grace expired, matched (committed) or poison removed."""

    player: str
    op: ClassVar[int] = REMOVE


@dataclass(frozen=True, slots=True)
class GraceOn:
    """Disconnected while queued: keeps its place, not matchable until ``GraceOff``."""

    player: str
    op: ClassVar[int] = GRACE_ON


@dataclass(frozen=True, slots=True)
class GraceOff:
    """Resumed (reattached): matchable again, at its old place."""

    player: str
    op: ClassVar[int] = GRACE_OFF


Change = Added | Removed | GraceOn | GraceOff
