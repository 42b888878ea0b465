# cython: language_level=3
"""The leader's in-memory pool of one mode, compiled (twin: server/matching/pool_py.py, which
states the semantics; typed front: server/matching/pool.py).

Layout: parallel arrays in queue order ``(queued_at, player)`` -- slot, queued_at, rating,
grace flag -- where a slot is a player's index in ``names``, plus ``player -> queued_at`` to
find a player's position by bisection. ``names`` only grows between compactions (a departed
player's slot keeps its name until then), so a tick copies plain numbers and never touches
the 100k player objects: building a fresh list of them cost more than the rest of a batch.

A batch of changes is resolved against the current arrays first (removals and grace flips by
position, additions collected per player, the last change wins), then merged in one pass: the
additions, sorted by queue order (k log k), are placed by bisection and the arrays are copied
once, in runs, into new ones (n + k). New arrays rather than edits in place, and slots that
are not reused before a compaction (which builds a new ``names``), so a view handed out
earlier stays valid while the caller pairs it.

Why queue order and not rating order: queue order is what defines a candidate's position, and
with it every tie-break of the pairing; kept in it, the matchable entries *are* the arrays a
full re-read decodes to, and the pairing kernel (its wait-order check finds them already in
order, its radix sort makes the rating order) runs unchanged. Keeping a rating order as well
would save that sort (about 1 ms of a 100k tick) but needs a second merge per batch and a
second pairing entry point for both implementations.
"""

from cpython.array cimport array, clone
from cpython.unicode cimport PyUnicode_Compare
from libc.string cimport memcpy

from _fastmatch.kernel import decode_tickets

cdef array _DOUBLES = array("d")
cdef array _INT64 = array("q")
cdef array _FLAGS = array("b")

# server/matching/changes.py
cdef enum:
    ADD = 0
    REMOVE = 1
    GRACE_ON = 2
    GRACE_OFF = 3

# Compact ``names`` once it holds more than twice the live entries and this many more: at
# least n additions apart, so O(1) per addition; small, so small pools (tests) compact often.
cdef Py_ssize_t _SLACK = 8


cdef struct Columns:
    long long* slot
    long long* queued
    double* rating
    signed char* grace


cdef inline Columns _columns(array slots, array queued, array ratings, array grace) noexcept:
    cdef Columns c
    c.slot = slots.data.as_longlongs
    c.queued = queued.data.as_longlongs
    c.rating = ratings.data.as_doubles
    c.grace = grace.data.as_schars
    return c


cdef inline void _copy(Columns dst, Py_ssize_t w, Columns src, Py_ssize_t r,
                       Py_ssize_t count) noexcept:
    memcpy(dst.slot + w, src.slot + r, count * sizeof(long long))
    memcpy(dst.queued + w, src.queued + r, count * sizeof(long long))
    memcpy(dst.rating + w, src.rating + r, count * sizeof(double))
    memcpy(dst.grace + w, src.grace + r, count)


cdef class PoolCore:
    cdef list _names        # slot -> player; only grows between compactions
    cdef array _slots       # q, queue order (grace included)
    cdef array _queued      # q, parallel to _slots
    cdef array _ratings     # d, parallel to _slots
    cdef array _grace       # b, parallel to _slots: 1 = in resume grace (not matchable)
    cdef dict _at           # player -> queued_at (int), to find its position
    cdef Py_ssize_t _graced
    cdef object _sum        # exact sum of queued_at (a Python int: no overflow)
    cdef tuple _view

    def __cinit__(self):
        self._install([], clone(_INT64, 0, False), clone(_INT64, 0, False),
                      clone(_DOUBLES, 0, False), clone(_FLAGS, 0, True))
        self._at = {}
        self._graced = 0
        self._sum = 0

    cdef int _install(self, list names, array slots, array queued, array ratings,
                      array grace) except -1:
        """Take new arrays: the previous ones stay as they were for views handed out."""
        self._names = names
        self._slots = slots
        self._queued = queued
        self._ratings = ratings
        self._grace = grace
        self._view = None
        return 0

    cdef Py_ssize_t _find(self, object player, long long q) except -1:
        """bisect_left of (q, player) in queue order."""
        cdef Py_ssize_t lo = 0, hi = len(self._slots), mid
        cdef const long long* queued = self._queued.data.as_longlongs
        cdef const long long* slots = self._slots.data.as_longlongs
        while lo < hi:
            mid = (lo + hi) >> 1
            if queued[mid] < q or (queued[mid] == q
                                   and PyUnicode_Compare(self._names[slots[mid]], player) < 0):
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef Py_ssize_t _locate(self, object player, long long q) except -1:
        """The position of a resident player; checked, so a broken invariant raises instead of
        corrupting memory."""
        cdef Py_ssize_t pos = self._find(player, q)
        if pos >= len(self._slots) or self._names[self._slots.data.as_longlongs[pos]] != player:
            raise RuntimeError(f"pool index lost {player!r}")
        return pos

    def load(self, players, tickets, grace=()):
        """Replace the pool by a snapshot; returns the poison players (see the twin)."""
        cdef list names = list(players)
        cdef Py_ssize_t m = len(names), i, c, n, w
        cdef object p
        if len(tickets) != m:
            raise ValueError("players and tickets differ in length")
        for p in names:
            if type(p) is not str:
                raise TypeError(f"player ids are str: {p!r}")
        index, ratings, queued, bad = decode_tickets(list(tickets))
        cdef array idx = index, rat = ratings, que = queued
        cdef const long long* ix = idx.data.as_longlongs
        cdef const long long* qs = que.data.as_longlongs
        cdef dict last = {}
        for i in range(m):
            last[names[i]] = i
        cdef list poison = [names[i] for i in bad if last[names[i]] == i]
        # The decoded entries to keep: all of them, unless a player is repeated (last wins).
        cdef list keep
        if len(last) == m:
            keep = list(range(len(idx)))
        else:
            keep = [c for c in range(len(idx)) if last[names[ix[c]]] == ix[c]]
        n = len(keep)
        cdef bint in_order = True
        cdef Py_ssize_t a, b
        for i in range(1, n):
            a = keep[i - 1]
            b = keep[i]
            if qs[a] > qs[b] or (qs[a] == qs[b]
                                 and PyUnicode_Compare(names[ix[a]], names[ix[b]]) > 0):
                in_order = False
                break
        if not in_order:
            keep.sort(key=lambda e: (que[e], names[idx[e]]))
        cdef list kept = [None] * n
        cdef array slots = clone(_INT64, n, False)
        cdef array new_q = clone(_INT64, n, False)
        cdef array new_r = clone(_DOUBLES, n, False)
        cdef dict at = {}
        for w in range(n):
            c = keep[w]
            p = names[ix[c]]
            kept[w] = p
            slots.data.as_longlongs[w] = w
            new_q.data.as_longlongs[w] = qs[c]
            new_r.data.as_doubles[w] = rat.data.as_doubles[c]
            at[p] = qs[c]
        self._install(kept, slots, new_q, new_r, clone(_FLAGS, n, True))
        self._at = at
        self._graced = 0
        self._sum = sum(new_q)
        for p in grace:
            self._set_grace(p, 1)
        return poison

    cdef int _set_grace(self, object player, signed char flag) except -1:
        cdef object q = self._at.get(player)
        cdef Py_ssize_t pos
        if q is None:
            return 0
        pos = self._locate(player, q)
        if self._grace.data.as_schars[pos] != flag:
            self._grace.data.as_schars[pos] = flag
            self._graced += 1 if flag else -1
            self._view = None
        return 0

    cdef int _drop(self, object player, list drops) except -1:
        """Take a resident entry out (its position goes to ``drops``); absent: nothing."""
        cdef object q = self._at.pop(player, None)
        cdef Py_ssize_t pos
        if q is None:
            return 0
        pos = self._locate(player, q)
        drops.append(pos)
        if self._grace.data.as_schars[pos]:
            self._graced -= 1
        self._sum -= q
        return 0

    def apply(self, changes):
        """Apply one batch, in order; returns the poison players (see the twin)."""
        cdef list batch = list(changes)
        cdef Py_ssize_t nb = len(batch), k, j = 0, c = 0
        cdef array ops = clone(_FLAGS, nb, False)
        cdef list tickets = []
        cdef int op
        for k in range(nb):
            change = batch[k]
            op = change.op
            if op < ADD or op > GRACE_OFF:
                raise TypeError(f"not a queue change: {change!r}")
            if type(change.player) is not str:
                raise TypeError(f"player ids are str: {change!r}")
            ops.data.as_schars[k] = op
            if op == ADD:
                tickets.append(change.ticket)
        index, ratings, queued, _ = decode_tickets(tickets)
        cdef array idx = index, rat = ratings, que = queued
        cdef Py_ssize_t ngood = len(idx)
        cdef dict pending = {}  # player -> [queued_at, rating, grace flag]: added this batch
        cdef list drops = []
        cdef dict poison = {}
        cdef list entry
        for k in range(nb):
            p = batch[k].player
            op = ops.data.as_schars[k]
            if op == ADD:
                self._drop(p, drops)
                poison.pop(p, None)
                if c < ngood and idx.data.as_longlongs[c] == j:
                    pending[p] = [que[c], rat.data.as_doubles[c], 0]
                    c += 1
                else:
                    pending.pop(p, None)
                    poison[p] = None
                j += 1
            elif op == REMOVE:
                poison.pop(p, None)
                if pending.pop(p, None) is None:
                    self._drop(p, drops)
            else:
                entry = pending.get(p)
                if entry is not None:
                    entry[2] = 1 if op == GRACE_ON else 0
                else:
                    self._set_grace(p, 1 if op == GRACE_ON else 0)
        if drops or pending:
            self._merge(drops, pending)
            if len(self._names) > 2 * len(self._slots) + _SLACK:
                self._compact()
        return list(poison)

    cdef int _merge(self, list drops, dict pending) except -1:
        cdef list adds = sorted([(e[0], p, e[1], e[2]) for p, e in pending.items()])
        drops.sort()
        cdef Py_ssize_t n = len(self._slots), nd = len(drops), na = len(adds)
        cdef Py_ssize_t size = n - nd + na, i, nxt, a = 0, d = 0, r = 0, w = 0
        cdef array at = clone(_INT64, na, False)
        cdef tuple add
        for i in range(na):
            add = adds[i]
            at.data.as_longlongs[i] = self._find(add[1], add[0])
        cdef array dropped = array("q", drops)
        cdef array slots = clone(_INT64, size, False)
        cdef array queued = clone(_INT64, size, False)
        cdef array ratings = clone(_DOUBLES, size, False)
        cdef array grace = clone(_FLAGS, size, False)
        cdef Columns src = _columns(self._slots, self._queued, self._ratings, self._grace)
        cdef Columns dst = _columns(slots, queued, ratings, grace)
        cdef list names = self._names
        cdef const long long* ins = at.data.as_longlongs
        cdef const long long* out = dropped.data.as_longlongs
        while True:
            # Copy the run up to the next insertion or removal, then do those.
            nxt = n
            if a < na and ins[a] < nxt:
                nxt = ins[a]
            if d < nd and out[d] < nxt:
                nxt = out[d]
            if nxt < r:
                raise RuntimeError("pool merge lost its place")
            _copy(dst, w, src, r, nxt - r)
            w += nxt - r
            r = nxt
            while a < na and ins[a] == r:
                add = adds[a]
                dst.slot[w] = len(names)
                dst.queued[w] = add[0]
                dst.rating[w] = add[2]
                dst.grace[w] = add[3]
                names.append(add[1])
                self._at[add[1]] = add[0]
                self._sum += add[0]
                self._graced += add[3]
                a += 1
                w += 1
            if d < nd and out[d] == r:
                d += 1
                r += 1
            elif r == n:
                break
        if w != size or a != na or d != nd:
            raise RuntimeError("pool merge lost its place")
        self._install(names, slots, queued, ratings, grace)
        return 0

    cdef int _compact(self) except -1:
        """A new ``names`` holding the live players only, in queue order (slot = position)."""
        cdef Py_ssize_t n = len(self._slots), i
        cdef const long long* old = self._slots.data.as_longlongs
        cdef list names = [None] * n
        cdef array slots = clone(_INT64, n, False)
        for i in range(n):
            names[i] = self._names[old[i]]
            slots.data.as_longlongs[i] = i
        self._install(names, slots, self._queued, self._ratings, self._grace)
        return 0

    def view(self):
        """(players, index, ratings, queued): ``players[index[c]]`` is the c-th matchable
        entry in queue order, with ``ratings[c]`` and ``queued[c]``. ``players`` holds
        departed players too (slots not yet compacted away). Shared with the pool, never
        edited in place afterwards: read only, and valid after later changes."""
        cdef Py_ssize_t n = len(self._slots), m = n - self._graced, i, w = 0
        cdef array index, ratings, queued
        cdef Columns src
        if self._view is None:
            if self._graced == 0:
                self._view = (self._names, self._slots, self._ratings, self._queued)
                return self._view
            index = clone(_INT64, m, False)
            ratings = clone(_DOUBLES, m, False)
            queued = clone(_INT64, m, False)
            src = _columns(self._slots, self._queued, self._ratings, self._grace)
            for i in range(n):
                if not src.grace[i]:
                    if w == m:
                        raise RuntimeError("pool grace count is off")
                    index.data.as_longlongs[w] = src.slot[i]
                    ratings.data.as_doubles[w] = src.rating[i]
                    queued.data.as_longlongs[w] = src.queued[i]
                    w += 1
            self._view = (self._names, index, ratings, queued)
        return self._view

    def queue(self):
        """Every player in queue order, grace included (for checks; O(n))."""
        cdef const long long* slots = self._slots.data.as_longlongs
        return [self._names[slots[i]] for i in range(len(self._slots))]

    def __len__(self):
        return len(self._slots)

    @property
    def graced(self):
        return self._graced

    @property
    def queued_sum(self):
        return self._sum
