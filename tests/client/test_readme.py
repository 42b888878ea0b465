"""The README's "Clients" snippets, run as a newcomer would against a real `fastmatch serve`
(with the reference game server), so they cannot rot. Only the port and, for Node, the
client's path (absolute, as the snippet's file lives elsewhere) are substituted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.app.served import FASTMATCH, Served, wait_workers
from tests.helpers import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
TS_INDEX = ROOT / "clients" / "typescript" / "dist" / "src" / "index.js"


def snippets(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Clients\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture
async def served(redis_url: str, admin: aioredis.Redis) -> Iterator[Served]:  # type: ignore[misc]
    server = Served(redis_url, workers=1, FASTMATCH_GAMESERVER__EMBEDDED="true").start()
    try:
        await wait_workers(admin, 1)
        yield server
    finally:
        server.stop()


def adapt(code: str, port: int) -> str:
    assert "127.0.0.1:8080" in code and ".venv/bin/fastmatch" in code
    return code.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(".venv/bin/fastmatch", FASTMATCH)


def test_the_readme_has_one_snippet_per_language() -> None:
    assert len(snippets("python")) == 1 and len(snippets("js")) == 1


async def test_python_snippet_plays_a_match(served: Served) -> None:
    [code] = snippets("python")
    run = subprocess.run([sys.executable, "-c", adapt(code, served.port)], cwd=ROOT, capture_output=True,
                         text=True, timeout=TIMEOUT * 12, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("MatchFound(") == 2 and "fastmatch.invalid:7777" in run.stdout


@pytest.mark.skipif(not shutil.which("node") or not TS_INDEX.exists(),
                    reason="Node or the built TypeScript client is missing (make ts)")
async def test_typescript_snippet_plays_a_match(served: Served, tmp_path: Path) -> None:
    [code] = snippets("js")
    code = adapt(code, served.port).replace("./clients/typescript/dist/src/index.js", TS_INDEX.as_uri())
    script = tmp_path / "match.mjs"
    script.write_text(code)
    run = subprocess.run(["node", "--experimental-websocket", str(script)], cwd=ROOT, capture_output=True,
                         text=True, timeout=TIMEOUT * 12, check=False, env=os.environ.copy())
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("match_found") == 2 and "fastmatch.invalid:7777" in run.stdout
