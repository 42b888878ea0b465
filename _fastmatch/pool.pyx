# cython: language_level=3
"""The leader's in-memory pool of one mode, compiled (twin: server/matching/pool_py.py, which
states the semantics; typed front: server/matching/pool.py).

Layout: parallel arrays in queue order ``(queued_at, player)`` -- players (a list), ratings,
queued_at and a grace flag -- plus ``player -> queued_at`` to find a player's position by
bisection. A batch of changes is resolved against the current arrays first (removals and
grace flips by position, additions collected per player, last one wins), then merged in one
pass: the additions, sorted by queue order (k log k), are placed by bisection and everything
is copied once into new arrays (n + k). New arrays, not edits in place, so a view handed out
earlier (``view``) stays valid while the caller pairs it.

Why queue order and not rating order: queue order is what defines a candidate's position, and
with it every tie-break of the pairing; kept in it, the matchable entries *are* the arrays a
full re-read decodes to, and the pairing kernel (its wait-order check finds them already in
order, its radix sort makes the rating order) runs unchanged. Keeping a rating order as well
would save that sort (about 2 ms of a 100k tick) but needs a second merge per batch and a
second pairing entry point for both implementations.
"""

from cpython.array cimport array, clone
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_Compare

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


cdef class PoolCore:
    cdef list _players      # queue order, grace included
    cdef array _ratings     # d, parallel to _players
    cdef array _queued      # q, parallel to _players
    cdef array _grace       # b, 1 = in resume grace (not matchable)
    cdef dict _at           # player -> queued_at (int), to find its position
    cdef Py_ssize_t _graced
    cdef object _sum        # exact sum of queued_at (a Python int: no overflow)
    cdef tuple _view

    def __cinit__(self):
        self._reset()

    cdef int _reset(self) except -1:
        self._players = []
        self._ratings = clone(_DOUBLES, 0, False)
        self._queued = clone(_INT64, 0, False)
        self._grace = clone(_FLAGS, 0, False)
        self._at = {}
        self._graced = 0
        self._sum = 0
        self._view = None
        return 0

    cdef Py_ssize_t _locate(self, object player, long long q) except -1:
        """The position of a resident player; checked, so a broken invariant raises instead of
        corrupting memory."""
        cdef Py_ssize_t pos = self._find(player, q)
        if pos >= len(self._players) or self._players[pos] != player:
            raise RuntimeError(f"pool index lost {player!r}")
        return pos

    cdef Py_ssize_t _find(self, object player, long long q) except -1:
        """bisect_left of (q, player) in queue order."""
        cdef Py_ssize_t lo = 0, hi = len(self._players), mid
        cdef const long long* queued = self._queued.data.as_longlongs
        while lo < hi:
            mid = (lo + hi) >> 1
            if queued[mid] < q or (queued[mid] == q
                                   and PyUnicode_Compare(self._players[mid], player) < 0):
                lo = mid + 1
            else:
                hi = mid
        return lo

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
        cdef dict last = {}
        for i in range(m):
            last[names[i]] = i
        cdef list poison = [names[i] for i in bad if last[names[i]] == i]
        # The decoded entries to keep: all of them, unless a player is repeated (last wins).
        cdef list keep
        if len(last) == m:
            keep = list(range(len(idx)))
        else:
            keep = [c for c in range(len(idx)) if last[names[idx.data.as_longlongs[c]]]
                    == idx.data.as_longlongs[c]]
        n = len(keep)
        cdef const long long* ix = idx.data.as_longlongs
        cdef const long long* qs = que.data.as_longlongs
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
        self._reset()
        cdef list out = PyList_New(n)
        cdef array new_r = clone(_DOUBLES, n, False)
        cdef array new_q = clone(_INT64, n, False)
        cdef array new_g = clone(_FLAGS, n, True)
        cdef dict at = {}
        for w in range(n):
            c = keep[w]
            p = names[ix[c]]
            Py_INCREF(p)
            PyList_SET_ITEM(out, w, p)
            new_r.data.as_doubles[w] = rat.data.as_doubles[c]
            new_q.data.as_longlongs[w] = qs[c]
            at[p] = qs[c]
        self._players = out
        self._ratings = new_r
        self._queued = new_q
        self._grace = new_g
        self._at = at
        self._sum = sum(new_q)
        for p in grace:
            self._set_grace(p, 1)
        return poison

    cdef int _set_grace(self, object player, char flag) except -1:
        cdef object q = self._at.get(player)
        cdef Py_ssize_t pos
        if q is None:
            return 0
        pos = self._locate(player, q)
        if self._grace.data.as_schars[pos] != flag:
            self._grace.data.as_schars[pos] = flag
            self._graced += 1 if flag else -1
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
        self._view = None
        return list(poison)

    cdef int _merge(self, list drops, dict pending) except -1:
        cdef list adds = sorted([(e[0], p, e[1], e[2]) for p, e in pending.items()])
        drops.sort()
        cdef Py_ssize_t n = len(self._players), nd = len(drops), na = len(adds)
        cdef Py_ssize_t size = n - nd + na, i, a = 0, d = 0, w = 0
        cdef array at = clone(_INT64, na, False)
        cdef tuple add
        for i in range(na):
            add = adds[i]
            at.data.as_longlongs[i] = self._find(add[1], add[0])
        cdef array dropped = array("q", drops)
        cdef list old = self._players
        cdef list out = PyList_New(size)
        cdef array new_r = clone(_DOUBLES, size, False)
        cdef array new_q = clone(_INT64, size, False)
        cdef array new_g = clone(_FLAGS, size, False)
        cdef const double* r = self._ratings.data.as_doubles
        cdef const long long* q = self._queued.data.as_longlongs
        cdef const signed char* g = self._grace.data.as_schars
        cdef object p
        for i in range(n + 1):
            while a < na and at.data.as_longlongs[a] == i:
                add = adds[a]
                p = add[1]
                Py_INCREF(p)
                PyList_SET_ITEM(out, w, p)
                new_q.data.as_longlongs[w] = add[0]
                new_r.data.as_doubles[w] = add[2]
                new_g.data.as_schars[w] = add[3]
                self._at[p] = add[0]
                self._sum += add[0]
                self._graced += add[3]
                a += 1
                w += 1
            if i == n:
                break
            if d < nd and dropped.data.as_longlongs[d] == i:
                d += 1
                continue
            p = old[i]
            Py_INCREF(p)
            PyList_SET_ITEM(out, w, p)
            new_r.data.as_doubles[w] = r[i]
            new_q.data.as_longlongs[w] = q[i]
            new_g.data.as_schars[w] = g[i]
            w += 1
        if w != size or a != na or d != nd:
            raise RuntimeError("pool merge lost its place")
        self._players = out
        self._ratings = new_r
        self._queued = new_q
        self._grace = new_g
        return 0

    def view(self):
        """(players, index, ratings, queued): every entry in queue order, the positions of the
        matchable ones and their ratings and queued_at. Shared with the pool until its next
        change (never edited in place afterwards): read only."""
        cdef Py_ssize_t n = len(self._players), m = n - self._graced, i, w = 0
        cdef array index, ratings, queued
        cdef const signed char* g
        if self._view is None:
            index = clone(_INT64, m, False)
            if self._graced == 0:
                for i in range(n):
                    index.data.as_longlongs[i] = i
                ratings = self._ratings
                queued = self._queued
            else:
                ratings = clone(_DOUBLES, m, False)
                queued = clone(_INT64, m, False)
                g = self._grace.data.as_schars
                for i in range(n):
                    if not g[i]:
                        if w == m:
                            raise RuntimeError("pool grace count is off")
                        index.data.as_longlongs[w] = i
                        ratings.data.as_doubles[w] = self._ratings.data.as_doubles[i]
                        queued.data.as_longlongs[w] = self._queued.data.as_longlongs[i]
                        w += 1
            self._view = (self._players, index, ratings, queued)
        return self._view

    def __len__(self):
        return len(self._players)

    @property
    def graced(self):
        return self._graced

    @property
    def queued_sum(self):
        return self._sum
