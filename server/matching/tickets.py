"""A queued player's ticket, the value in ``{mm:<mode>}:tickets``: ``<rating>|<queued_at_ms>|<attrs>``.

``enqueue.lua`` writes it (``queued_at_ms`` comes from the Redis clock there; the rating and
the attributes are the arguments made here); the pairing kernels decode it in bulk
(``kernel_py.decode_tickets`` and the Cython twin, both tested against ``decode``), and the
handoff reads a player's claims back from it for the battle request. This module is the one
place that knows the format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

Attrs = dict[str, str | int | float]
_attrs: Final = msgspec.json.Decoder(Attrs)


@dataclass(frozen=True, slots=True)
class Ticket:
    rating: float
    queued_at_ms: int
    attrs: Attrs = field(default_factory=dict)


def rating_arg(rating: float) -> str:
    """The rating as enqueue.lua stores it: Python's shortest exact repr of the double."""
    return repr(float(rating))


def attrs_arg(attrs: Mapping[str, object]) -> str:
    """The token's attributes as enqueue.lua stores them: compact JSON, keys sorted."""
    return msgspec.json.encode(attrs, order="sorted").decode()


def encode(ticket: Ticket) -> bytes:
    """What enqueue.lua writes for these values (bulk loads and tests write it directly)."""
    return f"{rating_arg(ticket.rating)}|{ticket.queued_at_ms}|{attrs_arg(ticket.attrs)}".encode()


def decode(raw: bytes) -> Ticket:
    """Raises ValueError for anything that is not a ticket (the kernels call it poison)."""
    rating, bar, rest = raw.partition(b"|")
    queued, bar2, attrs = rest.partition(b"|")
    if not (bar and bar2):
        raise ValueError(f"not a ticket: {raw[:80]!r}")
    try:
        return Ticket(float(rating), int(queued), _attrs.decode(attrs) if attrs else {})
    except msgspec.DecodeError as exc:
        raise ValueError(f"ticket attributes are not an object of small values: {exc}") from exc
