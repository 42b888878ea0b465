"""The ticket format lives in server/matching/tickets.py; everything else agrees with it."""

from __future__ import annotations

from types import ModuleType

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from server.matching import kernel, tickets
from server.matching.tickets import Ticket
from server.store import keys
from server.store.client import RedisClient
from server.store.players import PlayerStore

IMPLS = list(kernel.implementations().items())
ratings = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False) | st.integers(0, 5000).map(float)
attrs = st.dictionaries(st.text(min_size=1, max_size=8),
                        st.text(max_size=8) | st.integers(-1000, 1000), max_size=4)


@given(rating=ratings, queued=st.integers(0, 10**15 - 1), extra=attrs)
def test_encode_decode_round_trip(rating: float, queued: int, extra: dict[str, str | int]) -> None:
    ticket = Ticket(rating, queued, dict(extra))
    assert tickets.decode(tickets.encode(ticket)) == ticket


@pytest.mark.parametrize(("name", "impl"), IMPLS, ids=[n for n, _ in IMPLS])
@given(batch=st.lists(st.tuples(ratings, st.integers(0, 10**15 - 1)), max_size=30))
def test_the_kernels_read_what_the_module_writes(
    name: str, impl: ModuleType, batch: list[tuple[float, int]]
) -> None:
    raw = [tickets.encode(Ticket(r, q, {"region": "eu"})) for r, q in batch]
    index, got_ratings, got_queued, bad = impl.decode_tickets(raw)
    assert bad == [] and list(index) == list(range(len(batch)))
    for (rating, queued), got_r, got_q in zip(batch, got_ratings, got_queued, strict=True):
        assert (got_r, got_q) == (tickets.decode(tickets.encode(Ticket(rating, queued))).rating, queued)


async def test_enqueue_lua_writes_the_module_s_format(redis_url: str, admin: aioredis.Redis) -> None:
    client = RedisClient(redis_url)
    store = PlayerStore(client, "w1", 10_000)
    await store.attach("p", "c")
    result = await store.enqueue("p", "c", "1v1", 1512.25, {"region": "eu", "level": 7})
    raw = (await admin.hget(keys.tickets("1v1"), "p")).encode()
    assert tickets.decode(raw) == Ticket(1512.25, result.queued_at_ms, {"level": 7, "region": "eu"})
    await client.close()
