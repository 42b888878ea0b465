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


cdef double[23] _POW10 = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                          1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22]


cdef inline bint _fast_double(const char* s, Py_ssize_t n, double* out) noexcept:
    """Clinger's fast path: [-+]digits[.digits] with at most 15 digits is exact.

    The mantissa (< 10**15 < 2**53) and 10**k (k <= 22) are exact doubles, so one IEEE
    division is correctly rounded: the same double strtod and Python's float() return.
    Anything else (exponents, more digits) returns False and goes to strtod.
    """
    cdef Py_ssize_t i = 0, digits = 0, frac = 0
    cdef long long mant = 0
    cdef bint neg = False, dot = False
    cdef char c
    if n and (s[0] == c'-' or s[0] == c'+'):
        neg = s[0] == c'-'
        i = 1
    while i < n:
        c = s[i]
        if c'0' <= c <= c'9':
            digits += 1
            if digits > 15:
                return False
            mant = mant * 10 + (c - c'0')
            if dot:
                frac += 1
        elif c == c'.' and not dot:
            dot = True
        else:
            return False
        i += 1
    if digits == 0:
        return False
    out[0] = <double>mant / _POW10[frac]
    if neg:
        out[0] = -out[0]
    return True


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
    if not _fast_double(s, bar, rating):
        rating[0] = strtod(s, &end)
        if end != s + bar:
            return False
    if not isfinite(rating[0]):
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


# -- pairing (twin: server/matching/kernel_py.py, which documents the algorithm) ---------------
#
# Same result as the twin's two sorts, computed faster: the wait order (queued, position) is
# checked first and only sorted when the input is not already in it (a queue snapshot always
# is); the rating order is then a *stable* LSD radix sort of the wait order by rating alone,
# which yields exactly (rating, queued, position) order.

from libc.math cimport INFINITY, fabs
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy, memset

DEF EXACT_SPLIT_MAX = 16


cdef struct Cand:
    long long queued
    Py_ssize_t idx


cdef int _by_wait(const void* a, const void* b) noexcept nogil:
    cdef const Cand* x = <const Cand*>a
    cdef const Cand* y = <const Cand*>b
    if x.queued != y.queued:
        return -1 if x.queued < y.queued else 1
    return -1 if x.idx < y.idx else (1 if x.idx > y.idx else 0)


cdef inline uint64_t _rating_key(double r) noexcept nogil:
    """Order-preserving unsigned key of a finite double (-0.0 and 0.0 map to one key)."""
    cdef double z = r + 0.0
    cdef uint64_t bits
    memcpy(&bits, &z, 8)
    if bits >> 63:
        return ~bits
    return bits | (<uint64_t>1 << 63)


cdef class _Buffers:
    """Owns every C buffer of one pairing run; freed when the run ends, whatever happens."""
    cdef Py_ssize_t* order      # positions in rating order
    cdef Py_ssize_t* tmp
    cdef uint64_t* keys
    cdef uint64_t* tmpkeys
    cdef Cand* by_wait
    cdef double* win
    cdef Py_ssize_t* pos
    cdef Py_ssize_t* prev
    cdef Py_ssize_t* nxt
    cdef char* used
    cdef Py_ssize_t* seq
    cdef Py_ssize_t* members

    def __cinit__(self, Py_ssize_t n, Py_ssize_t k):
        self.order = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
        self.tmp = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
        self.keys = <uint64_t*>malloc(n * sizeof(uint64_t))
        self.tmpkeys = <uint64_t*>malloc(n * sizeof(uint64_t))
        self.by_wait = <Cand*>malloc(n * sizeof(Cand))
        self.win = <double*>malloc(n * sizeof(double))
        self.pos = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
        self.prev = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
        self.nxt = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
        self.used = <char*>malloc(n)
        self.seq = <Py_ssize_t*>malloc((2 * k) * sizeof(Py_ssize_t))
        self.members = <Py_ssize_t*>malloc(k * sizeof(Py_ssize_t))
        if (not self.order or not self.tmp or not self.keys or not self.tmpkeys
                or not self.by_wait or not self.win or not self.pos or not self.prev
                or not self.nxt or not self.used or not self.seq or not self.members):
            raise MemoryError()

    def __dealloc__(self):
        free(self.order); free(self.tmp); free(self.keys); free(self.tmpkeys)
        free(self.by_wait); free(self.win); free(self.pos); free(self.prev); free(self.nxt)
        free(self.used); free(self.seq); free(self.members)


cdef void _wait_order(_Buffers b, const long long[:] queued, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef bint sorted_already = True
    for i in range(n):
        b.by_wait[i].queued = queued[i]
        b.by_wait[i].idx = i
        if i and queued[i] < queued[i - 1]:
            sorted_already = False
    if not sorted_already:
        qsort(b.by_wait, n, sizeof(Cand), _by_wait)


cdef void _rating_order(_Buffers b, const double[:] ratings, Py_ssize_t n) noexcept nogil:
    """Stable LSD radix sort (8-bit digits) of the wait order by rating key."""
    cdef Py_ssize_t i, counts[256]
    cdef Py_ssize_t total, c
    cdef int shift, d
    cdef uint64_t same_and = <uint64_t>0xFFFFFFFFFFFFFFFF, same_or = 0, key
    cdef Py_ssize_t* src = b.order
    cdef Py_ssize_t* dst = b.tmp
    cdef uint64_t* ksrc = b.keys
    cdef uint64_t* kdst = b.tmpkeys
    cdef Py_ssize_t* sp
    cdef uint64_t* kp
    for i in range(n):
        src[i] = b.by_wait[i].idx
        key = _rating_key(ratings[src[i]])
        ksrc[i] = key
        same_and &= key
        same_or |= key
    for shift in range(0, 64, 8):
        if ((same_and >> shift) & 0xFF) == ((same_or >> shift) & 0xFF):
            continue  # every key has the same digit here: the pass would not move anything
        memset(counts, 0, sizeof(counts))
        for i in range(n):
            counts[(ksrc[i] >> shift) & 0xFF] += 1
        total = 0
        for d in range(256):
            c = counts[d]
            counts[d] = total
            total += c
        for i in range(n):
            d = (ksrc[i] >> shift) & 0xFF
            dst[counts[d]] = src[i]
            kdst[counts[d]] = ksrc[i]
            counts[d] += 1
        sp = src; src = dst; dst = sp
        kp = ksrc; ksrc = kdst; kdst = kp
    if src != b.order:
        memcpy(b.order, src, n * sizeof(Py_ssize_t))


def pair(const double[:] ratings, const long long[:] queued, long long now_ms, int team_size,
         int teams, double window_base, double window_growth_per_s, double window_max,
         long long max_wait_ms):
    cdef Py_ssize_t n = ratings.shape[0]
    cdef Py_ssize_t k = team_size * teams
    cdef array out = array("q")
    if k < 1 or n < k:
        return out
    if queued.shape[0] != n:
        raise ValueError("ratings and queued differ in length")
    cdef Py_ssize_t i
    for i in range(n):
        if not isfinite(ratings[i]):
            raise ValueError("ratings must be finite")
    cdef _Buffers b = _Buffers(n, k)
    out = clone(_INT64, n, False)
    cdef long long* dst = out.data.as_longlongs
    cdef Py_ssize_t written = 0
    cdef Py_ssize_t p, q, a, nl, nr, m, start, lo, hi, best, s, j
    cdef long long waited
    cdef double spread, best_spread, w, gap_l, gap_r
    cdef bint ok, expired
    for i in range(n):
        waited = now_ms - queued[i]
        if waited >= max_wait_ms:
            b.win[i] = INFINITY
        else:
            w = window_base + window_growth_per_s * (<double>(waited if waited > 0 else 0) / 1000.0)
            b.win[i] = w if w < window_max else window_max
        b.used[i] = 0
    _wait_order(b, queued, n)
    _rating_order(b, ratings, n)
    for p in range(n):
        b.pos[b.order[p]] = p
        b.prev[p] = p - 1
        b.nxt[p] = p + 1
    for j in range(n):
        a = b.by_wait[j].idx
        if b.used[a]:
            continue
        p = b.pos[a]
        if k > 1 and b.win[a] != INFINITY:
            # Every run of k >= 2 holding the anchor holds its nearest unused neighbour on one
            # side, so its spread is at least the smaller of the two gaps (float subtraction is
            # monotonic): past the anchor's own window no run is valid. Same result as the scan
            # below, without it -- in a sparse pool, that is most anchors.
            gap_l = ratings[a] - ratings[b.order[b.prev[p]]] if b.prev[p] >= 0 else INFINITY
            gap_r = ratings[b.order[b.nxt[p]]] - ratings[a] if b.nxt[p] < n else INFINITY
            if gap_l > b.win[a] and gap_r > b.win[a]:
                continue
        # The unused neighbours in rating order: up to k-1 on each side of the anchor.
        nl = 0
        q = b.prev[p]
        while q >= 0 and nl < k - 1:
            nl += 1
            q = b.prev[q]
        q = b.prev[p]
        s = nl - 1
        while s >= 0:
            b.seq[s] = b.order[q]
            q = b.prev[q]
            s -= 1
        b.seq[nl] = a
        nr = 0
        q = b.nxt[p]
        while q < n and nr < k - 1:
            nr += 1
            b.seq[nl + nr] = b.order[q]
            q = b.nxt[q]
        expired = b.win[a] == INFINITY
        lo = nl - k + 1
        if lo < 0:
            lo = 0
        hi = nl if nl < nl + nr + 1 - k else nl + nr + 1 - k
        best = -1
        best_spread = INFINITY
        for start in range(lo, hi + 1):
            spread = ratings[b.seq[start + k - 1]] - ratings[b.seq[start]]
            if spread < best_spread:
                ok = True
                if not expired:
                    for m in range(k):
                        if not (spread <= b.win[b.seq[start + m]]):
                            ok = False
                            break
                if ok:
                    best = start
                    best_spread = spread
        if best < 0:
            continue
        for m in range(k):
            i = b.seq[best + m]
            b.members[m] = i
            b.used[i] = 1
            p = b.pos[i]
            if b.prev[p] >= 0:
                b.nxt[b.prev[p]] = b.nxt[p]
            if b.nxt[p] < n:
                b.prev[b.nxt[p]] = b.prev[p]
        _split(b.members, k, ratings, team_size, teams, dst + written)
        written += k
    del out[written:]
    return out


cdef void _split(Py_ssize_t* members, Py_ssize_t k, const double[:] ratings, int team_size,
                 int teams, long long* dst) except *:
    cdef Py_ssize_t m
    if teams == 1 or team_size == 1:
        for m in range(k):
            dst[m] = members[m]
    elif teams == 2 and k <= EXACT_SPLIT_MAX:
        _split_exact(members, k, ratings, team_size, dst)
    else:
        _split_greedy(members, k, ratings, team_size, teams, dst)


cdef void _split_exact(Py_ssize_t* members, Py_ssize_t k, const double[:] ratings,
                       int team_size, long long* dst) noexcept nogil:
    # Combinations of team_size-1 positions from 1..k-1 in lexicographic order, with 0 fixed.
    cdef Py_ssize_t c[EXACT_SPLIT_MAX]
    cdef Py_ssize_t best_c[EXACT_SPLIT_MAX]
    cdef char in_a[EXACT_SPLIT_MAX]
    cdef double r[EXACT_SPLIT_MAX]
    cdef Py_ssize_t t = team_size - 1, i, j, w = 0
    cdef double total = 0.0, sum_a, gap, best_gap = INFINITY
    for j in range(k):
        r[j] = ratings[members[j]]
        total += r[j]
    for i in range(t):
        c[i] = i + 1
    while True:
        sum_a = r[0]
        for i in range(t):
            sum_a += r[c[i]]
        gap = fabs(total - 2.0 * sum_a)
        if gap < best_gap:
            best_gap = gap
            memcpy(best_c, c, t * sizeof(Py_ssize_t))
        # Next combination: the rightmost index that can still move right.
        i = t - 1
        while i >= 0 and c[i] == k - t + i:
            i -= 1
        if i < 0:
            break
        c[i] += 1
        for j in range(i + 1, t):
            c[j] = c[j - 1] + 1
    memset(in_a, 0, k)
    in_a[0] = 1
    for i in range(t):
        in_a[best_c[i]] = 1
    for j in range(k):
        if in_a[j]:
            dst[w] = members[j]
            w += 1
    for j in range(k):
        if not in_a[j]:
            dst[w] = members[j]
            w += 1


cdef void _split_greedy(Py_ssize_t* members, Py_ssize_t k, const double[:] ratings,
                        int team_size, int teams, long long* dst) except *:
    # Rare shapes (3+ teams of 2+, or 2 teams over 16 players): clarity over speed.
    cdef list order = sorted(range(k), key=lambda j: (-ratings[members[j]], j))
    cdef list sums = [0.0] * teams
    cdef list rosters = [[] for _ in range(teams)]
    cdef Py_ssize_t j, t, pick, w = 0
    for j in order:
        pick = -1
        for t in range(teams):
            if len(rosters[t]) < team_size and (pick < 0 or sums[t] < sums[pick]):
                pick = t
        rosters[pick].append(members[j])
        sums[pick] += ratings[members[j]]
    for t in range(teams):
        for j in rosters[t]:
            dst[w] = j
            w += 1
