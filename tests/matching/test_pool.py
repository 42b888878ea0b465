"""The leader's pool (issue 10) equals a full re-read of the queue, step by step.

A plain model of one mode's Redis state (the queue ZSET, the tickets, the grace set) is changed
the way the scripts change it, and every change is also given to the pool, in batches (ticks).
At every tick the pool's candidates and ``plan_matches`` of them must equal those of a full
re-read of the model (``snapshot.lua``: queue order, grace left out, then ``Candidates.decode``),
and the compiled pool must equal the twin.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import ModeConfig
from server.matching import kernel, tickets
from server.matching.changes import Added, Change, GraceOff, GraceOn, Removed
from server.matching.plan import Candidates, MatchPlan, plan_matches
from server.matching.pool import Pool, PoolCheck
from server.matching.tickets import Ticket

CORES = kernel.pool_cores()
cores = pytest.mark.parametrize("impl", list(CORES), ids=list(CORES))
NOW = 1_800_000_000_000
# Names whose code-point order is not their length order, and beyond ASCII: Redis orders
# members by their UTF-8 bytes, which is the code-point order Python compares by.
NAMES = ["a", "B", "b", "aa", "p1", "p10", "p2", "z", "é", "ß", "\U0001d538", "",
         *(f"n{i}" for i in range(30))]
BAD_TICKETS = [b"garbage", b"", b"1500|x|{}", b"nan|1|{}"]


def ticket(rating: float, queued_at: int) -> bytes:
    return tickets.encode(Ticket(rating, queued_at, {"region": "eu"}))


@dataclass
class Queue:
    """One mode's queue as Redis holds it: ZSET player -> queued_at, tickets, grace set."""

    queued: dict[str, int] = field(default_factory=dict)
    tickets: dict[str, bytes] = field(default_factory=dict)
    grace: set[str] = field(default_factory=set)

    def order(self) -> list[str]:
        return sorted(self.queued, key=lambda p: (self.queued[p], p))

    def reread(self) -> Candidates:
        """What a tick decodes today: snapshot.lua (queue order, grace left out)."""
        players = [p for p in self.order() if p not in self.grace]
        return Candidates.decode(players, [self.tickets[p] for p in players])

    def snapshot(self) -> tuple[list[str], list[bytes | None], list[str]]:
        """A full snapshot for ``Pool.load``: every queued player, grace included."""
        players = self.order()
        return players, [self.tickets[p] for p in players], sorted(self.grace)

    def is_poison(self, player: str) -> bool:
        return player in self.queued and bool(Candidates.decode([player], [self.tickets[player]]).bad)

    def check(self) -> PoolCheck:
        return PoolCheck(len(self.queued), len(self.grace), sum(self.queued.values()))

    def add(self, player: str, queued_at: int, raw: bytes) -> None:
        self.queued[player] = queued_at
        self.tickets[player] = raw
        self.grace.discard(player)

    def remove(self, player: str) -> None:
        del self.queued[player]
        del self.tickets[player]
        self.grace.discard(player)


# -- steps: what the scripts do to the queue ----------------------------------------------------
# ("enqueue", name, rating, clock step, bad ticket?)  ("dequeue" | "detach", which queued player)
# ("attach" | "expire", which player in grace)  ("commit", how many planned matches commit)
# ("requeue", which loading player, disconnected?)  ("tick", ms from the clock to pairing time)

RATINGS = st.sampled_from([1000.0, 1200.0, 1210.5, 1500.0, 1501.0, 1530.0, -3.0]) | st.floats(-1e4, 1e4)
enqueue = st.tuples(st.just("enqueue"), st.sampled_from(NAMES), RATINGS,
                    st.sampled_from([0, 0, 1, 700, 30_000]), st.sampled_from([False] * 15 + [True]))
which = st.integers(0, 50)
STEPS = {
    "enqueue": enqueue,
    "dequeue": st.tuples(st.just("dequeue"), which),
    "detach": st.tuples(st.just("detach"), which),
    "attach": st.tuples(st.just("attach"), which),
    "expire": st.tuples(st.just("expire"), which),
    "commit": st.tuples(st.just("commit"), st.integers(0, 3)),
    "requeue": st.tuples(st.just("requeue"), which, st.booleans()),
    "tick": st.tuples(st.just("tick"), st.sampled_from([0, 5_000, 90_000])),
}
# Mostly joins, so queues grow past a handful of players; a tick every 20 steps or so.
WEIGHTS = {"enqueue": 10, "dequeue": 2, "detach": 2, "attach": 1, "expire": 1, "commit": 1, "requeue": 2,
           "tick": 1}
step = st.sampled_from([kind for kind, w in WEIGHTS.items() for _ in range(w)]).flatmap(STEPS.__getitem__)
steps = st.lists(step, min_size=30, max_size=150)


@st.composite
def modes(draw: st.DrawFn) -> ModeConfig:
    team_size, teams = draw(st.sampled_from([(1, 2), (2, 2), (3, 2), (1, 4), (2, 3), (3, 1)]))
    return ModeConfig(
        team_size=team_size, teams=teams,
        window_base=draw(st.sampled_from([0.0, 50.0, 100.0])),
        window_growth_per_s=draw(st.sampled_from([0.0, 10.0, 25.0])),
        window_max=draw(st.sampled_from([100.0, 400.0, 1e9])),
        max_wait_s=draw(st.sampled_from([60.0, 120.0, 1e6])),
    )


def same_candidates(a: Candidates, b: Candidates) -> None:
    assert [a.players[i] for i in a.index] == [b.players[i] for i in b.index]
    assert a.ratings.tobytes() == b.ratings.tobytes()  # bit for bit, -0.0 included
    assert list(a.queued) == list(b.queued)


def view(pool: Pool) -> tuple[object, ...]:
    """Everything the pool holds: every entry in queue order, the candidates, the check."""
    c = pool.candidates()
    return (pool.queue(), [c.players[i] for i in c.index], c.ratings.tobytes(), list(c.queued),
            pool.check(), pool.matchable)


@dataclass
class Driver:
    """Runs steps against the model, feeds the same changes to every pool, checks each tick."""

    mode: ModeConfig
    pools: list[Pool]
    queue: Queue = field(default_factory=Queue)
    clock: int = NOW - 200_000
    batch: list[Change] = field(default_factory=list)
    log: list[Change] = field(default_factory=list)  # every change, in order
    loading: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # matched, not yet over
    ticks: int = 0

    def change(self, change: Change) -> None:
        self.batch.append(change)
        self.log.append(change)

    def run(self, program: list[tuple]) -> None:  # type: ignore[type-arg]
        for s in program:
            getattr(self, f"do_{s[0]}")(*s[1:])
        self.do_tick(0)

    def do_enqueue(self, player: str, rating: float, step_ms: int, bad: bool) -> None:
        if player in self.queue.queued or player in self.loading:
            return  # enqueue.lua: "already"
        self.clock += step_ms
        raw = BAD_TICKETS[len(player) % len(BAD_TICKETS)] if bad else ticket(rating, self.clock)
        self.queue.add(player, self.clock, raw)
        self.change(Added(player, raw))

    def pick(self, players: set[str] | dict[str, int], which: int) -> str | None:
        return sorted(players)[which % len(players)] if players else None

    def do_dequeue(self, which: int) -> None:
        player = self.pick(self.queue.queued, which)
        if player is not None:
            self.queue.remove(player)
            self.change(Removed(player))

    def do_detach(self, which: int) -> None:
        player = self.pick(self.queue.queued, which)
        if player is not None and player not in self.queue.grace:
            self.queue.grace.add(player)
            self.change(GraceOn(player))

    def do_attach(self, which: int) -> None:
        player = self.pick(self.queue.grace, which)
        if player is not None:
            self.queue.grace.discard(player)
            self.change(GraceOff(player))

    def do_expire(self, which: int) -> None:
        player = self.pick(self.queue.grace, which)
        if player is not None:
            self.queue.remove(player)
            self.change(Removed(player))

    def do_commit(self, how_many: int) -> None:
        """commit_matches.lua: some planned matches commit (the rest fail their re-check)."""
        for plan in self.plans(self.clock)[:how_many]:
            for p in plan.players:
                self.loading[p] = (self.queue.queued[p], self.queue.tickets[p])
                self.queue.remove(p)
                self.change(Removed(p))

    def do_requeue(self, which: int, disconnected: bool) -> None:
        """finish_match.lua: back with the original ticket and queued_at (its old place)."""
        if not self.loading:
            return
        player = sorted(self.loading)[which % len(self.loading)]  # a player in loading
        queued_at, raw = self.loading.pop(player)
        self.queue.add(player, queued_at, raw)
        self.change(Added(player, raw))
        if disconnected:
            self.queue.grace.add(player)
            self.change(GraceOn(player))

    def plans(self, now_ms: int) -> list[MatchPlan]:
        return plan_matches(self.queue.reread(), self.mode, now_ms, "t")

    def do_tick(self, ahead_ms: int) -> None:
        self.ticks += 1
        reread = self.queue.reread()
        reported = [pool.apply(self.batch) for pool in self.pools]
        self.batch = []
        poison = {p for p in self.queue.queued if self.queue.is_poison(p)}
        for got in reported:
            assert got == reported[0]  # same players, same order, in every implementation
            assert set(got) == poison and len(got) == len(poison)
        assert set(reread.poison) <= poison
        now = self.clock + ahead_ms
        expected = plan_matches(reread, self.mode, now, "t")
        for p in sorted(poison):  # the leader removes them (remove_ticket.lua)
            self.queue.remove(p)
            self.change(Removed(p))
        for pool in self.pools:
            cands = pool.candidates()
            same_candidates(cands, reread)
            assert plan_matches(cands, self.mode, now, "t") == expected
            assert pool.check() == self.queue.check()
            assert len(pool) == len(self.queue.queued)
            assert pool.matchable == len(self.queue.queued) - len(self.queue.grace)
            assert view(pool) == view(self.pools[0])


@cores
@settings(max_examples=300, deadline=None)
@given(mode=modes(), program=steps)
def test_pool_equals_a_full_reread(impl: str, mode: ModeConfig, program: list[tuple]) -> None:  # type: ignore[type-arg]
    Driver(mode, [Pool(CORES[impl]())]).run(program)


@pytest.mark.skipif("cython" not in CORES, reason="extension not built")
@settings(max_examples=300, deadline=None)
@given(mode=modes(), program=steps)
def test_compiled_pool_equals_the_twin(mode: ModeConfig, program: list[tuple]) -> None:  # type: ignore[type-arg]
    Driver(mode, [Pool(CORES["cython"]()), Pool(CORES["python"]())]).run(program)


@cores
@settings(max_examples=200, deadline=None)
@given(mode=modes(), before=steps, after=steps, shuffle=st.randoms(use_true_random=False))
def test_load_then_apply_equals_load_of_the_final_state(
    impl: str, mode: ModeConfig, before: list[tuple], after: list[tuple], shuffle: random.Random,  # type: ignore[type-arg]
) -> None:
    driver = Driver(mode, [])
    driver.run(before)
    pool = Pool(CORES[impl]())
    players, raws, grace = driver.queue.snapshot()
    assert pool.load(players, raws, grace) == []
    driver.pools = [pool]
    driver.run(after)
    fresh = Pool(CORES[impl]())
    players, raws, grace = driver.queue.snapshot()
    rows = list(zip(players, raws, strict=True))
    shuffle.shuffle(rows)  # load sorts a snapshot that is not in queue order
    assert fresh.load([p for p, _ in rows], [t for _, t in rows], grace) == []
    assert view(fresh) == view(pool)


@cores
@settings(max_examples=200, deadline=None)
@given(mode=modes(), program=steps, start=st.integers(0, 10**6))
def test_replaying_changes_a_snapshot_already_holds_changes_nothing(
    impl: str, mode: ModeConfig, program: list[tuple], start: int,  # type: ignore[type-arg]
) -> None:
    """A new leader records the stream position, then snapshots: the changes between the two
    are in its snapshot already, and it applies them again."""
    driver = Driver(mode, [])
    driver.run(program)
    players, raws, grace = driver.queue.snapshot()
    expected, pool = Pool(CORES[impl]()), Pool(CORES[impl]())
    expected.load(players, raws, grace)
    pool.load(players, raws, grace)
    pool.apply(driver.log[start % (len(driver.log) + 1):])
    assert view(pool) == view(expected)


# -- examples ------------------------------------------------------------------------------------

def loaded(impl: str, *rows: tuple[str, float, int], grace: tuple[str, ...] = ()) -> Pool:
    pool = Pool(CORES[impl]())
    assert pool.load([p for p, _, _ in rows], [ticket(r, q) for _, r, q in rows], grace) == []
    return pool


def matchable(pool: Pool) -> list[str]:
    c = pool.candidates()
    return [c.players[i] for i in c.index]


@cores
def test_a_requeued_player_keeps_its_place(impl: str) -> None:
    pool = loaded(impl, ("a", 1500.0, NOW - 3), ("b", 1500.0, NOW - 2), ("c", 1500.0, NOW - 1))
    pool.apply([Removed("b"), Added("d", ticket(1400.0, NOW))])
    assert matchable(pool) == ["a", "c", "d"]
    pool.apply([Added("b", ticket(1500.0, NOW - 2))])
    assert matchable(pool) == ["a", "b", "c", "d"]
    assert pool.check() == PoolCheck(4, 0, 4 * NOW - 6)


@cores
def test_equal_queued_at_orders_by_player_as_redis_does(impl: str) -> None:
    pool = loaded(impl, ("b", 1.0, NOW), ("a", 2.0, NOW))
    pool.apply([Added("B", ticket(3.0, NOW)), Added("é", ticket(4.0, NOW)), Added("aa", ticket(5.0, NOW))])
    assert matchable(pool) == ["B", "a", "aa", "b", "é"]
    assert list(pool.candidates().ratings) == [3.0, 2.0, 5.0, 1.0, 4.0]


@cores
def test_grace_keeps_the_entry_but_not_the_candidate(impl: str) -> None:
    pool = loaded(impl, ("a", 1.0, NOW - 2), ("b", 2.0, NOW - 1), grace=("b", "nobody"))
    assert (len(pool), pool.matchable, matchable(pool)) == (2, 1, ["a"])
    pool.apply([GraceOn("a"), GraceOff("b")])
    assert (len(pool), pool.matchable, matchable(pool)) == (2, 1, ["b"])
    pool.apply([GraceOff("a"), GraceOn("ghost"), GraceOff("ghost"), Removed("ghost")])
    assert matchable(pool) == ["a", "b"]
    assert pool.check() == PoolCheck(2, 0, 2 * NOW - 3)


@cores
def test_added_replaces_and_the_last_change_of_a_batch_wins(impl: str) -> None:
    pool = loaded(impl, ("a", 1.0, NOW - 2))
    pool.apply([GraceOn("a"), Added("a", ticket(7.0, NOW - 1)), Added("b", ticket(2.0, NOW)),
                GraceOn("b"), Removed("b"), Added("b", ticket(3.0, NOW - 5))])
    assert matchable(pool) == ["b", "a"]
    assert list(pool.candidates().ratings) == [3.0, 7.0]


@cores
def test_poison_is_reported_and_not_added(impl: str) -> None:
    pool = Pool(CORES[impl]())
    raws = [b"junk", ticket(1.0, NOW), None, ticket(2.0, NOW - 1)]
    assert pool.load(["a", "b", "c", "b"], raws) == ["a", "c"]  # a repeated player: the last wins
    assert matchable(pool) == ["b"] and list(pool.candidates().ratings) == [2.0]
    # Reported when the batch leaves it queued with a bad ticket, once, in the batch's order.
    assert pool.apply([Added("x", b"bad"), Added("b", b"bad"), Added("y", b""), Removed("y"),
                       Added("z", b"1|2"), Added("z", ticket(5.0, NOW)), Added("x", b"worse")]) == ["b", "x"]
    assert matchable(pool) == ["z"] and len(pool) == 1


@cores
def test_a_view_handed_out_stays_valid(impl: str) -> None:
    pool = loaded(impl, ("a", 1.0, NOW - 2), ("b", 2.0, NOW - 1))
    before = pool.candidates()
    pool.apply([Removed("a"), Added("c", ticket(3.0, NOW)), GraceOn("b")])
    middle = pool.candidates()
    for i in range(50):  # enough to compact the compiled pool's slots
        pool.apply([Added(f"x{i}", ticket(4.0, NOW + i))])
        pool.apply([Removed(f"x{i}")])
    assert matchable(pool) == ["c"] and pool.queue() == ["b", "c"]
    assert [before.players[i] for i in before.index] == ["a", "b"]
    assert list(before.ratings) == [1.0, 2.0] and list(before.queued) == [NOW - 2, NOW - 1]
    assert [middle.players[i] for i in middle.index] == ["c"] and list(middle.ratings) == [3.0]


@cores
def test_a_bad_change_raises_before_anything_changes(impl: str) -> None:
    pool = loaded(impl, ("a", 1.0, NOW))
    before = view(pool)
    with pytest.raises(TypeError):
        pool.apply([Removed("a"), Removed(b"a")])  # type: ignore[arg-type]
    with pytest.raises((TypeError, AttributeError)):
        pool.apply([Removed("a"), ("a", b"1|2|{}")])  # type: ignore[list-item]
    assert view(pool) == before


@cores
def test_large_batches_against_a_reread(impl: str) -> None:
    """Thousands of players and big batches (bisection and merging over real sizes)."""
    rng = random.Random(11)
    mode = ModeConfig(team_size=2, teams=2, window_base=50, window_growth_per_s=25, window_max=400,
                      max_wait_s=60)
    driver = Driver(mode, [Pool(CORES[impl]())])
    program: list[tuple] = []  # type: ignore[type-arg]
    kinds = ["enqueue"] * 5 + ["dequeue", "detach", "attach", "expire", "requeue"]
    for t in range(12):
        for _ in range(600):
            kind = rng.choice(kinds)
            name = f"p{rng.randrange(3000)}"
            if kind == "enqueue":
                program.append((kind, name, float(rng.randrange(0, 100_000)),
                                rng.choice([0, 1, 40]), rng.random() < 0.01))
            elif kind == "requeue":
                program.append((kind, rng.randrange(100), rng.random() < 0.2))
            else:
                program.append((kind, rng.randrange(10_000)))
        program.append(("commit", t))
        program.append(("tick", rng.choice([0, 30_000])))
    driver.run(program)
    assert driver.ticks == 13 and len(driver.pools[0]) > 1000
