"""`fastmatch serve` and `fastmatch token` as a newcomer runs them: real processes, real sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import client as fm
from tests.helpers import TIMEOUT, next_of, recv, request

FASTMATCH = str(Path(sys.executable).with_name("fastmatch"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines()
            if "redis" in line or "valkey" in line]


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = _free_port()
    env = {**os.environ, "FASTMATCH_SERVER__PORT": str(port), "FASTMATCH_SERVER__HOST": "127.0.0.1",
           "FASTMATCH_METRICS__PORT": "0"}
    env.pop("FASTMATCH_REDIS__URL", None)
    proc = subprocess.Popen([FASTMATCH, "serve", "--workers", "1"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _wait_listening(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + TIMEOUT * 4  # spawn + imports + embedded Redis
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)  # a child process is starting; nothing to wait on but its port
    raise AssertionError("fastmatch serve did not start listening")


async def test_serve_token_client_flow_and_clean_shutdown(
    served: tuple[subprocess.Popen[str], int],
) -> None:
    from websockets.asyncio.client import connect

    proc, port = served
    _wait_listening(proc, port)
    tok = subprocess.run([FASTMATCH, "token", "--player", "newcomer", "--mmr", "1600"],
                         capture_output=True, text=True, check=True).stdout.strip()
    async with connect(f"ws://127.0.0.1:{port}/ws?token={tok}") as ws:
        welcome = await recv(ws)
        assert welcome["type"] == "welcome" and welcome["player_id"] == "newcomer"
        assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
        status = await request(ws, {"type": "status"})
        assert status["type"] == "queue_status" and status["queue_size"] == 1
        assert (await request(ws, {"type": "dequeue"}))["type"] == "dequeued"
    # The whole lifecycle against the dev config's own reference game server, with the project's
    # client as a game would use it: answer the ready check once loaded.
    opponent = subprocess.run([FASTMATCH, "token", "--player", "rival", "--mmr", "1610"],
                              capture_output=True, text=True, check=True).stdout.strip()
    url = f"ws://127.0.0.1:{port}/ws"
    async with fm.connect(url, tok, token_in_query=True) as me, fm.connect(url, opponent) as rival:
        for client in (me, rival):
            assert (await client.enqueue("1v1")).game_mode == "1v1"
        for client in (me, rival):
            loading = await next_of(client, fm.StartLoading)
            client.loading_complete(loading.loading_session_id)
        for client in (me, rival):
            found = await next_of(client, fm.MatchFound)
            assert found.server_address and found.loading_session_id == loading.loading_session_id
    redis_pids = _redis_children(proc.pid)
    assert len(redis_pids) == 1, "serve should run exactly one embedded redis-server"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT * 3) == 0
    output = proc.stdout.read() if proc.stdout else ""
    assert "PUBLIC development auth secret" in output
    with pytest.raises(ProcessLookupError):
        os.kill(redis_pids[0], 0)


def test_bad_config_stops_start_up_naming_the_key() -> None:
    env = {**os.environ, "FASTMATCH_SERVER__PORT": "not-a-port"}
    out = subprocess.run([FASTMATCH, "serve"], env=env, capture_output=True, text=True, timeout=TIMEOUT * 4)
    assert out.returncode == 2 and "server.port" in out.stderr
