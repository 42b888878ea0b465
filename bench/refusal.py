"""What one refused handshake costs a worker (README "Performance", "Past capacity").

One worker (`fastmatch serve --workers 1` of ``--tree``, embedded reference game server, a
private Redis) with ``server.max_connections = 1`` and one player seated, so every further
upgrade request is refused with 503 (`max_connections`). ``--requests`` raw upgrade requests
go to it from ``--concurrency`` connections at a time; the worker's CPU (user + system, from
/proc, so the kernel's accept and close count) over that burst, divided by the refusals, is
the figure. Run it on two trees alternating to compare, e.g. the commit before a change:

    python -m bench.refusal --tree /path/to/base --tree . --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import subprocess
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from bench.lifecycle import ROOT, server
from server.config import DEV_SECRET
from server.osutil import machine
from server.protocol.auth import mint_token
from server.store.embedded import EmbeddedRedis

_TICK = os.sysconf("SC_CLK_TCK")


def _upgrade(token: str) -> bytes:
    return ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()


def _cpu_s(pids: list[str]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


async def _burst(port: int, requests: int, concurrency: int) -> dict[str, int]:
    """Seat one player, then send the upgrades; how each was answered (its status line)."""
    seated = await connect(f"ws://127.0.0.1:{port}/ws", additional_headers={
        "Authorization": f"Bearer {mint_token(DEV_SECRET, 'seated', None, 600)}"})
    await seated.recv()  # the welcome: the one connection slot is taken
    request = _upgrade(mint_token(DEV_SECRET, "refused", None, 600))
    answers: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status = (await reader.read()).split(b"\r\n", 1)[0].decode(errors="replace")
            answers[status] = answers.get(status, 0) + 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(requests)))
    await seated.close()
    return answers


def measure(tree: Path, requests: int, concurrency: int) -> tuple[float, dict[str, int]]:
    """Microseconds of worker CPU per refusal, and the answers."""
    os.environ["FASTMATCH_SERVER__MAX_CONNECTIONS"] = "1"
    os.environ["FASTMATCH_SERVER__MAX_LOOP_LAG_MS"] = "0"  # one reason, whatever the machine
    log = Path(tempfile.mkdtemp(prefix="fastmatch-refusal-")) / "serve.log"
    with EmbeddedRedis() as store, server(tree, 1, store.url, log) as (port, _, proc):
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
        time.sleep(1)  # the worker's start-up work is over
        before = _cpu_s(children)
        answers = asyncio.run(_burst(port, requests, concurrency))
        spent = _cpu_s(children) - before
    refused = answers.get("HTTP/1.1 503 Service Unavailable", 0)
    return (1e6 * spent / refused if refused else float("nan")), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append",
                        help="a built checkout to serve (repeat to alternate; default: this one)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"fastmatch bench refusal {date} on {machine()}: {args.requests} upgrades, "
          f"{args.concurrency} at a time, one worker at max_connections = 1", flush=True)
    for round_ in range(1, args.rounds + 1):
        for tree in trees:
            us, answers = measure(tree, args.requests, args.concurrency)
            print(f"  round {round_} {tree}: {us:.1f} us of worker CPU per refusal; answers {answers}",
                  flush=True)


if __name__ == "__main__":
    main()
