"""The compiled ticket decoder and its pure-Python twin accept and reject exactly the same input."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.matching import kernel

IMPLS = kernel.implementations()
impls = pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))

ticket_like = st.one_of(
    st.builds(
        lambda r, q, rest: b"|".join([r, q, rest]),
        st.text("0123456789.eE+-", max_size=12).map(str.encode),
        st.text("0123456789a", max_size=17).map(str.encode),
        st.binary(max_size=8),
    ),
    st.builds(lambda r, q: f"{r!r}|{q}|{{}}".encode(), st.floats(), st.integers(-5, 10**16)),
    # Numbers around the 15-digit exact fast path and its strtod fallback.
    st.builds(lambda r, q: f"{r}|{q}|{{}}".encode(),
              st.from_regex(r"[-+]?[0-9]{0,18}(\.[0-9]{0,18})?([eE][-+]?[0-9]{1,3})?", fullmatch=True),
              st.integers(0, 10**15)),
    st.binary(max_size=30),
    st.none(),
)


def test_the_extension_is_built() -> None:
    """CI builds the extension; a silently missing build would hide the hot path."""
    assert "cython" in IMPLS


@impls
def test_decodes_good_and_reports_bad(impl: ModuleType) -> None:
    values = [b"1500.0|1700000000000|{}", b"garbage", None, b"-3.5e2|12|{\"r\":\"eu\"}",
              b"nan|1|{}", b"1e999|1|{}", b"1500|1234567890123456|{}", b"1500|12"]
    index, ratings, queued, bad = impl.decode_tickets(values)
    assert list(index) == [0, 3]
    assert list(ratings) == [1500.0, -350.0]
    assert list(queued) == [1700000000000, 12]
    assert bad == [1, 2, 4, 5, 6, 7]


@pytest.mark.skipif("cython" not in IMPLS, reason="extension not built")
@settings(max_examples=500)
@given(st.lists(ticket_like, max_size=40))
def test_extension_matches_twin(values: list[bytes | None]) -> None:
    py = IMPLS["python"].decode_tickets(values)
    cy = IMPLS["cython"].decode_tickets(values)
    assert [list(x) for x in py] == [list(x) for x in cy]
    assert py[1].tobytes() == cy[1].tobytes()  # bit for bit, -0.0 included
