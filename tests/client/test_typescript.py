"""The TypeScript client's own tests (clients/typescript/test, Node's test runner) against a real
`fastmatch serve` with the reference game server, its own Redis, and short deadlines so the
error paths play out in about a second. `make` builds the client (npm ci, tsc) first."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.config import DEV_SECRET
from server.store import keys
from tests.app.served import Served, wait_workers
from tests.helpers import TIMEOUT

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "typescript"
TESTS = sorted((CLIENT / "dist" / "test").glob("*.test.js"))
NODE = shutil.which("node")

if not NODE or not TESTS:
    # CI has Node and runs `make test`, which builds the client: there a skip would hide a gap.
    why = "node is not installed" if not NODE else "the client is not built: run `make ts`"
    pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason=why)


async def test_typescript_client_suite(private_redis) -> None:  # type: ignore[no-untyped-def]
    assert NODE and TESTS, "Node and a built TypeScript client are required in CI (make ts)"
    admin = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    served = Served(private_redis.url, workers=2, **{
        "FASTMATCH_GAMESERVER__EMBEDDED": "true",
        # Room for a ready answer refused during a Redis pause to be sent again (1 s later).
        "FASTMATCH_MATCHING__READY_TIMEOUT_MS": "3000",
        "FASTMATCH_PENALTY__THRESHOLD": "1",
        "FASTMATCH_REDIS__OPERATION_TIMEOUT_S": "0.5",
        "FASTMATCH_REDIS__BREAKER_COOLDOWN_S": "0.5",
        "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "1000",
        "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "1000",
    }).start()
    try:
        await wait_workers(admin, 2)
        await admin.set(keys.player("ts-broken"), "not a hash")  # for the internal_error test
        env = {**os.environ, "FASTMATCH_URL": f"ws://127.0.0.1:{served.port}/ws",
               "FASTMATCH_SECRET": DEV_SECRET, "FASTMATCH_REDIS_PID": str(private_redis.process.pid),
               "FASTMATCH_REDIS_SOCKET": str(private_redis.socket_path),
               "FASTMATCH_TEST_TIMEOUT": str(TIMEOUT)}
        # Node 20 has a global WebSocket only behind this flag (22+ has it by default).
        run = subprocess.run(
            [NODE, "--experimental-websocket", "--test", "--test-concurrency=1", *map(str, TESTS)],
            cwd=CLIENT, env=env, capture_output=True, text=True, timeout=TIMEOUT * 24, check=False)
        print(run.stdout[-6000:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:] + served.output()[-3000:]
        assert "# fail 0" in run.stdout and "# pass 0" not in run.stdout
    finally:
        served.stop()
        await admin.aclose()
