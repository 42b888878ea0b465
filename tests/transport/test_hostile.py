"""Hostile clients against a real worker (issue 18): inputs that once cost a traceback, and the
log and file-descriptor bounds that hold under abuse."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from server import metrics
from server.app.worker import Worker
from tests.conftest import WorkerFactory, make_config
from tests.helpers import closed_code, connect_player, recv, request
from tests.transport.rawws import RawClient


def counted(name: str, **labels: str) -> float:
    """A counter of this process's registry, with what workers tallied in memory added."""
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


def complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records no client may cause: warnings and worse, and any traceback."""
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING or r.exc_info]


# -- deep nesting (the report) --------------------------------------------------------------

def _nested_enqueue(depth: int) -> str:
    return '{"type":"enqueue","game_mode":"1v1","x":' + "[" * depth + "]" * depth + "}"


async def test_deep_nesting_in_an_ignored_field_is_invalid_message(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """1,900 levels in a field that would be ignored: `invalid_message` counted against the
    budget (PROTOCOL 5), not 1011 and a traceback; the worker keeps serving."""
    caplog.set_level(logging.INFO)
    budget = 3
    w = await start_worker(cfg=make_config(**{"server.max_message_bytes": 16_384,
                                             "server.bad_message_budget": budget}))
    port = w.front.port
    frame = _nested_enqueue(1_900)
    assert len(frame) < 4096  # under even the default size limit
    invalid_before = counted("fastmatch_messages_received_total", type="invalid")
    ws, _ = await connect_player(port, "nester")
    for _ in range(budget):
        await ws.send(frame)
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "invalid_message"
    # The connection is still open and the player untouched by the bad input.
    assert (await request(ws, {"type": "status"}))["state"] == "idle"
    await ws.send(_nested_enqueue(8_000))  # one past the budget
    assert (await recv(ws))["code"] == "invalid_message"
    assert await closed_code(ws) == 1008
    assert counted("fastmatch_messages_received_total", type="invalid") - invalid_before == budget + 1
    again, welcome = await connect_player(port, "nester")
    assert welcome["type"] == "welcome"
    assert (await request(again, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    await again.close()
    assert complaints(caplog) == []


# -- the HTTP request (PROTOCOL 1) --------------------------------------------------------------------

@pytest.mark.parametrize("target", ["//[x/ws", "//[::1/ws?token=x", "http://[/ws"])
async def test_unparsable_request_target_gets_400_not_a_traceback(
    worker: Worker, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    """urlsplit raises ValueError on an authority like "[x": that is the client's error."""
    caplog.set_level(logging.INFO)
    client = await RawClient.connect(worker.front.port, "target", path=target)
    response = await client.handshake()
    client.close()
    assert response is not None and response.status_code == 400
    ws, welcome = await connect_player(worker.front.port, "after-target")
    assert welcome["type"] == "welcome"
    await ws.close()
    assert complaints(caplog) == []

