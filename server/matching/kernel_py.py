"""Pure-Python twin of ``_fastmatch/kernel.pyx``: the reference and the fallback.

Must accept and reject exactly what the extension does (tests compare them on random input).
"""

from __future__ import annotations

import math
import re
from array import array
from typing import Final

_RATING: Final = re.compile(rb"[0-9.eE+\-]+")
_QUEUED: Final = re.compile(rb"[0-9]{1,15}")

Decoded = tuple["array[int]", "array[float]", "array[int]", list[int]]


def _parse(value: object) -> tuple[float, int] | None:
    if type(value) is not bytes:
        return None
    parts = value.split(b"|", 2)
    if len(parts) < 3 or not _RATING.fullmatch(parts[0]) or not _QUEUED.fullmatch(parts[1]):
        return None
    try:
        rating = float(parts[0])
    except ValueError:
        return None
    if not math.isfinite(rating):
        return None
    return rating, int(parts[1])


def decode_tickets(values: list[bytes | None]) -> Decoded:
    """(index, ratings, queued_at, bad): see the extension's docstring."""
    index: array[int] = array("q")
    ratings: array[float] = array("d")
    queued: array[int] = array("q")
    bad: list[int] = []
    for i, value in enumerate(values):
        parsed = _parse(value)
        if parsed is None:
            bad.append(i)
            continue
        index.append(i)
        ratings.append(parsed[0])
        queued.append(parsed[1])
    return index, ratings, queued, bad
