"""Connection caps fitted to the file descriptor limit (server/transport/fdlimit.py)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from server.transport.fdlimit import RESERVED, Caps, fit


@pytest.mark.parametrize(("limit", "caps"), [
    (1_048_576, Caps(50_000, 50_256)),  # as configured
    (50_256 + RESERVED, Caps(50_000, 50_256)),  # exactly enough
    (20_000, Caps(20_000 - RESERVED - 256, 20_000 - RESERVED)),  # shrunk, handshakes keep room
    (1024, Caps(1024 - RESERVED - 256, 1024 - RESERVED)),
    (200, Caps((200 - RESERVED) // 2, 200 - RESERVED)),  # tiny: half for handshakes
    (10, Caps(1, 2)),  # absurd, but never zero or negative
])
def test_fit(limit: int, caps: Caps) -> None:
    assert fit(50_000, 256, limit) == caps


def _caps_in_child(soft: int, hard: int, max_connections: int) -> dict[str, object]:
    """caps_for in a process of its own, started with the given descriptor limits."""
    code = (
        "import json, logging, resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from server.transport.fdlimit import caps_for\n"
        f"caps = caps_for({max_connections}, 256)\n"
        "print(json.dumps({'caps': [caps.connections, caps.sockets],"
        " 'soft': resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    result["log"] = out.stderr
    return result


def test_soft_limit_is_raised_as_far_as_the_caps_need() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = 1_000 if hard == resource.RLIM_INFINITY else min(1_000, hard - 256 - RESERVED)
    got = _caps_in_child(soft=100, hard=hard, max_connections=wanted)
    assert got["caps"] == [wanted, wanted + 256]
    assert got["soft"] == wanted + 256 + RESERVED
    assert got["log"] == ""


def test_caps_shrink_below_a_low_hard_limit_with_a_warning() -> None:
    got = _caps_in_child(soft=200, hard=200, max_connections=50_000)
    assert got["caps"] == [(200 - RESERVED) // 2, 200 - RESERVED]
    assert "server.max_connections = 50000 does not fit the file descriptor limit (200" in str(got["log"])
