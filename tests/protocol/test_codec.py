"""Codec properties: round trips, and the decoder raises only the documented error."""

from __future__ import annotations

import contextlib
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.protocol import codec
from server.protocol.messages import Dequeue, Enqueue, LoadingComplete, Status

short = st.text(min_size=1, max_size=64)
rid = st.none() | st.text(max_size=128)
client_messages = st.one_of(
    st.builds(Enqueue, game_mode=short, request_id=rid),
    st.builds(Dequeue, request_id=rid),
    st.builds(LoadingComplete, loading_session_id=short, request_id=rid),
    st.builds(Status, request_id=rid),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@given(client_messages)
def test_client_messages_round_trip(message: object) -> None:
    assert codec.decode(msgspec.json.encode(message).decode()) == message


# Every code point, lone surrogates included: a Python str can hold them even though a
# WebSocket text frame (valid UTF-8) cannot, and the decoder's contract is about any str.
any_text = st.text(st.characters(exclude_categories=()))
# Text made of JSON's own pieces, so the decoder gets past the first byte: brackets to any
# depth, escapes cut short, numbers past float range, NaN, duplicate keys, stray separators.
json_pieces = st.lists(st.sampled_from([
    "{", "}", "[", "]", ":", ",", '"', '"type"', '"enqueue"', '"status"', '"game_mode"', '"1v1"',
    '"request_id"', '"loading_session_id"', "null", "true", "0", "-1", "1e999", "-0.0", "NaN",
    "Infinity", "\\u", "\\ud800", "\\uDFFF", "\\", "\x00", " ", "\n", "\ufeff", "\ud800",
]), max_size=60).map("".join)


def _nested(depth: int, bracket: str, closed: bool) -> str:
    opening, closing = ("[", "]") if bracket == "[" else ('{"a":', "}")
    inner = opening * depth + "0" + (closing * depth if closed else "")
    return '{"type":"enqueue","game_mode":"1v1","x":' + inner + "}"


nested = st.builds(_nested, st.integers(0, 5000), st.sampled_from("[{"), st.booleans())


@given(any_text | json_pieces | nested | st.binary())
def test_decoder_raises_only_bad_message_on_arbitrary_frames(frame: str | bytes) -> None:
    with contextlib.suppress(codec.BadMessage):
        codec.decode(frame)


def test_lone_surrogates_are_bad_input() -> None:
    """msgspec raises UnicodeEncodeError for them: still `invalid_message`, not a crash."""
    with pytest.raises(codec.BadMessage):
        codec.decode('{"type":"status","request_id":"\ud800"}')


@pytest.mark.parametrize("depth", [1_900, 100_000])
@pytest.mark.parametrize("where", ["ignored-field", "top-level"])
def test_deep_nesting_is_bad_input(depth: int, where: str) -> None:
    """Issue 18: nesting past the recursion limit, even in a field that would be ignored."""
    inner = "[" * depth + "]" * depth
    frame = f'{{"type":"enqueue","game_mode":"1v1","x":{inner}}}' if where == "ignored-field" else inner
    with pytest.raises(codec.BadMessage):
        codec.decode(frame)


@given(st.dictionaries(st.sampled_from(["type", "game_mode", "request_id", "loading_session_id"]),
                       json_values))
def test_decoder_raises_only_bad_message_on_near_miss_objects(fields: dict[str, object]) -> None:
    with contextlib.suppress(codec.BadMessage):
        codec.decode(json.dumps(fields))


@pytest.mark.parametrize("frame", ['{"type":"enqueue","game_mode":""}',
                                   '{"type":"enqueue","game_mode":"' + "x" * 65 + '"}'])
def test_limits_are_enforced(frame: str) -> None:
    with pytest.raises(codec.BadMessage):
        codec.decode(frame)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert codec.decode('{"type":"status","future":1}') == Status()
