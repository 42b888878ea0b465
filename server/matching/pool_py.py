"""Pure-Python twin of ``_fastmatch/pool.pyx``: the reference semantics of the pool, and the
fallback. ``server/matching/pool.py`` is the typed front; tests compare both cores step by step.

The pool is one mode's queue as the leader knows it: every queued player (grace included) with
its decoded ticket, in queue order, which is the order of the ``{mm:<mode>}:queue`` ZSET:
``(queued_at_ms, player)``. The ZSET's score and the ticket's ``queued_at`` are written
together (``enqueue.lua``; a requeue restores both), so the ticket's is used. Python orders
strings by code point, which is the byte order of their UTF-8 form: Redis' order of members.

What pairing reads (``view``) is the matchable players in that order, exactly what a full
re-read of the queue (``snapshot.lua``, grace left out) decodes to, so pairing the pool gives
the same matches, teams and tie-breaks as pairing a re-read.

Poison: an ``Added`` whose ticket does not decode is not added; the player is reported when,
at the end of the batch, its last ``Added`` was undecodable and nothing removed it since (the
queue still holds it with that ticket: the caller removes it). ``load`` is ``apply`` of one
``Added`` per snapshot entry (a repeated player: the last one wins) then ``GraceOn`` for each
player in grace, on an empty pool.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from server.matching import changes as ch
from server.matching.changes import Change
from server.matching.kernel_py import decode_tickets

View = tuple[Sequence[str], "array[int]", "array[float]", "array[int]"]


class PoolCore:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._entries: dict[str, tuple[int, float]] = {}  # player -> (queued_at, rating)
        self._graced: set[str] = set()
        self._order: list[tuple[int, str]] = []  # (queued_at, player), sorted: queue order
        self._view: View | None = None

    def load(self, players: Sequence[str], tickets: Sequence[bytes | None],
             grace: Iterable[str] = ()) -> list[str]:
        if len(players) != len(tickets):
            raise ValueError("players and tickets differ in length")
        self._reset()
        poison = self.apply([ch.Added(p, t) for p, t in zip(players, tickets, strict=True)])
        self.apply([ch.GraceOn(p) for p in grace])
        return poison

    def apply(self, changes: Iterable[Change]) -> list[str]:
        batch = _checked(changes)
        adds = iter(_decode_adds(batch))
        touched: set[str] = set()
        poison: dict[str, None] = {}
        for change in batch:
            p = change.player
            if change.op == ch.ADD:
                entry = next(adds)
                touched.add(p)
                self._entries.pop(p, None)
                self._graced.discard(p)
                poison.pop(p, None)
                if entry is None:
                    poison[p] = None
                else:
                    self._entries[p] = entry
            elif change.op == ch.REMOVE:
                poison.pop(p, None)
                if self._entries.pop(p, None) is not None:
                    touched.add(p)
                    self._graced.discard(p)
            elif change.op == ch.GRACE_ON:
                if p in self._entries:
                    self._graced.add(p)
            else:
                self._graced.discard(p)
        if touched:
            kept = [key for key in self._order if key[1] not in touched]
            kept.extend((self._entries[p][0], p) for p in touched if p in self._entries)
            kept.sort()
            self._order = kept
        self._view = None
        return list(poison)

    def view(self) -> View:
        """(players, index, ratings, queued): ``players[index[c]]`` is the c-th matchable
        entry in queue order, with ``ratings[c]`` and ``queued[c]``. Here ``players`` is every
        entry in queue order; the compiled pool's holds departed players too."""
        if self._view is None:
            players = [p for _, p in self._order]
            index: array[int] = array("q")
            ratings: array[float] = array("d")
            queued: array[int] = array("q")
            for i, p in enumerate(players):
                if p not in self._graced:
                    q, r = self._entries[p]
                    index.append(i)
                    ratings.append(r)
                    queued.append(q)
            self._view = (players, index, ratings, queued)
        return self._view

    def queue(self) -> list[str]:
        """Every player in queue order, grace included (for checks; O(n))."""
        return [p for _, p in self._order]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def graced(self) -> int:
        return len(self._graced)

    @property
    def queued_sum(self) -> int:
        return sum(q for q, _ in self._entries.values())


def _checked(changes: Iterable[Change]) -> list[Change]:
    """The batch, refused as a whole (before any change) if anything in it is not a change."""
    batch = list(changes)
    for change in batch:
        if change.op not in (ch.ADD, ch.REMOVE, ch.GRACE_ON, ch.GRACE_OFF):
            raise TypeError(f"not a queue change: {change!r}")
        if type(change.player) is not str:
            raise TypeError(f"player ids are str: {change!r}")
    return batch


def _decode_adds(batch: list[Change]) -> list[tuple[int, float] | None]:
    """(queued_at, rating) of each ``Added`` in order, None for an undecodable ticket."""
    tickets = [c.ticket for c in batch if isinstance(c, ch.Added)]
    index, ratings, queued, _ = decode_tickets(tickets)
    decoded: list[tuple[int, float] | None] = [None] * len(tickets)
    for c, i in enumerate(index):
        decoded[i] = (queued[c], ratings[c])
    return decoded
