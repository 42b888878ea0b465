# cython: language_level=3
"""Decode candidate tickets fetched from Redis (the twin is server/matching/kernel_py.py).

A ticket is ``<rating>|<queued_at_ms>|<attrs json>``. Both implementations accept exactly the
same inputs: rating = [0-9.eE+-]+ that strtod consumes whole and that is finite; queued_at = 1 to
15 ASCII digits. Anything else is a poison ticket, reported by its input position.
"""

from cpython.array cimport array, clone
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.math cimport isfinite
from libc.stdlib cimport strtod

cdef array _DOUBLES = array("d")
cdef array _INT64 = array("q")


cdef inline bint _rating_char(char c) noexcept:
    return (c'0' <= c <= c'9') or c == c'.' or c == c'e' or c == c'E' or c == c'+' or c == c'-'


cdef inline bint _parse(const char* s, Py_ssize_t n, double* rating, long long* queued) noexcept:
    cdef Py_ssize_t i = 0, bar
    cdef char* end
    cdef char c
    cdef long long q = 0
    cdef Py_ssize_t digits = 0
    while i < n and s[i] != c'|':
        if not _rating_char(s[i]):
            return False
        i += 1
    if i == 0 or i >= n:
        return False
    bar = i
    rating[0] = strtod(s, &end)
    if end != s + bar or not isfinite(rating[0]):
        return False
    i = bar + 1
    while i < n and s[i] != c'|':
        c = s[i]
        if c < c'0' or c > c'9' or digits >= 15:
            return False
        q = q * 10 + (c - c'0')
        digits += 1
        i += 1
    if digits == 0 or i >= n:
        return False
    queued[0] = q
    return True


def decode_tickets(list values):
    """Return (index, ratings, queued_at, bad): parallel arrays of the good tickets, the input
    position of each, and the positions of undecodable ones (None or not bytes included)."""
    cdef Py_ssize_t n = len(values), i, k = 0
    cdef array index = clone(_INT64, n, False)
    cdef array ratings = clone(_DOUBLES, n, False)
    cdef array queued = clone(_INT64, n, False)
    cdef list bad = []
    cdef object value
    cdef double r
    cdef long long q
    for i in range(n):
        value = values[i]
        if type(value) is not bytes or not _parse(
            PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), &r, &q
        ):
            bad.append(i)
            continue
        index.data.as_longlongs[k] = i
        ratings.data.as_doubles[k] = r
        queued.data.as_longlongs[k] = q
        k += 1
    del index[k:]
    del ratings[k:]
    del queued[k:]
    return index, ratings, queued, bad
