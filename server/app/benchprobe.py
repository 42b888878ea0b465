"""What another Redis client waits while the bench's leader works (``bench-tick --probe``).

Run as its own process (``python -m server.app.benchprobe URL``) so that the leader's event
loop and the GIL cannot delay it: it sends one small read (``HGET``) about every millisecond on
its own connection, blocking, and times each round trip. A player's script queued behind the
leader's pipelined commit scripts waits the same way. It stops when its stdin closes and prints
one JSON line of percentiles (milliseconds) on stdout.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.parse

from server.quantile import nearest_rank

_READ = b"*3\r\n$4\r\nHGET\r\n$11\r\nbench:probe\r\n$1\r\nx\r\n"
_STALL_S = 30.0  # no answer this long: Redis is stuck, and the probe fails rather than hangs


def _connect(url: str) -> socket.socket:
    """A plain connection to the bench's own embedded Redis (no password, no TLS)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_STALL_S)
        sock.connect(parsed.path)
        return sock
    if parsed.scheme != "redis" or parsed.password or not parsed.hostname:
        raise SystemExit(f"bench probe: needs unix:// or redis://host:port without a password, "
                         f"not {url!r}")
    sock = socket.create_connection((parsed.hostname, parsed.port or 6379), timeout=_STALL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _percentiles(waits: list[float]) -> dict[str, float]:
    ordered = sorted(waits)
    if not ordered:
        return {"samples": 0}

    def at(q: float) -> float:
        return round(nearest_rank(ordered, q), 2)

    return {"samples": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99),
            "p999_ms": at(0.999), "max_ms": round(ordered[-1], 2)}


def main(url: str) -> int:
    sock = _connect(url)
    stop = threading.Event()

    def wait_for_eof() -> None:  # stdin closing (the bench is done, or died) ends the probe
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    print("ready", flush=True)
    waits: list[float] = []
    while True:  # at least one sample, however short the bench
        started = time.perf_counter()
        sock.sendall(_READ)
        answer = sock.recv(64)  # "$-1\r\n" in one segment; empty: Redis went away
        if not answer.startswith(b"$-1"):
            raise SystemExit(f"bench probe: Redis answered {answer!r}")
        waits.append((time.perf_counter() - started) * 1000)
        if stop.is_set():
            break
        time.sleep(0.001)
    sock.close()
    print(json.dumps(_percentiles(waits)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
