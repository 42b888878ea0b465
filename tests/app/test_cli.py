"""The operator commands refuse what would do harm or could never work: the reference game
server against a production config, and tokens the server would reject."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.app.cli import main
from server.config import DEV_SECRET, MAX_RATING, AuthConfig
from server.protocol.auth import TokenVerifier
from tests.app.served import FASTMATCH
from tests.helpers import TIMEOUT

CHANNEL = "battle:request"


def production_config(tmp_path: Path, redis_url: str) -> str:
    """The smallest config production = true accepts (a real secret, a named Redis, no metrics
    port open beyond loopback)."""
    path = tmp_path / "production.toml"
    path.write_text(f'production = true\n[auth]\nsecret = "{"s" * 40}"\n'
                    f'[redis]\nurl = "{redis_url}"\n[metrics]\nport = 0\n[modes.1v1]\nteam_size = 1\n')
    return str(path)


async def test_the_reference_game_server_refuses_a_production_config(
    redis_url: str, tmp_path: Path,
) -> None:
    """Its battle answers are made-up addresses: on production's Redis it would send real players
    nowhere. Exit code 2, with the opt-in named."""
    refused = await asyncio.to_thread(
        subprocess.run, [FASTMATCH, "--config", production_config(tmp_path, redis_url), "gameserver"],
        capture_output=True, text=True, timeout=TIMEOUT * 4)
    assert refused.returncode == 2, refused.stderr
    assert "production = true" in refused.stderr and "--not-production" in refused.stderr


async def test_the_reference_game_server_runs_on_a_production_config_when_told_it_is_not(
    redis_url: str, admin: aioredis.Redis, tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        FASTMATCH, "--config", production_config(tmp_path, redis_url), "gameserver",
        "--not-production", stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(TIMEOUT * 4):  # imports + connect, then it listens
            while dict(await admin.pubsub_numsub(CHANNEL)).get(CHANNEL, 0) < 1:
                assert proc.returncode is None, await proc.stderr.read() if proc.stderr else b""
                await asyncio.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


@pytest.mark.parametrize("argv", [
    ["--ttl=0"], ["--ttl=-60"], ["--mmr=nan"], ["--mmr=inf"], ["--mmr=-inf"], [f"--mmr={MAX_RATING * 2}"],
])
def test_token_refuses_what_the_server_would_reject(
    argv: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["token", "--player", "p", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("fastmatch: ") and ("--ttl" in err or "mmr" in err), err


def test_token_at_the_rating_bound_and_the_shortest_ttl_verifies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["token", "--player", "p", f"--mmr={-MAX_RATING}", "--ttl=1"]) == 0
    identity = TokenVerifier(AuthConfig(secret=DEV_SECRET)).verify(capsys.readouterr().out.strip())
    assert identity.player_id == "p" and identity.rating("1v1", 0) == -MAX_RATING
