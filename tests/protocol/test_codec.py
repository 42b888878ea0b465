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


@given(st.text() | st.binary())
def test_decoder_raises_only_bad_message_on_arbitrary_frames(frame: str | bytes) -> None:
    with contextlib.suppress(codec.BadMessage):
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
