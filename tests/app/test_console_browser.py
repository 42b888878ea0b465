"""The live console in a real headless Chromium (Debian's package, driven over DevTools): the page
shows queued players, then the match they form (issue 14). Screenshots go to the test's tmp dir."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.app.cdp import chromium, find_chromium
from tests.app.served import Served, wait_workers
from tests.app.test_matchmaking import start_loading
from tests.helpers import TIMEOUT, connect_player, request

TOKEN = "browser+s3cret/x="  # as base64 makes them: "+" must stay "+"
CHROMIUM = find_chromium()

if CHROMIUM is None and os.environ.get("CI") != "true":
    pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)",
                allow_module_level=True)


def in_mode(mode: str, selector: str) -> str:
    return f'document.querySelector(\'[data-mode="{mode}"] {selector}\')'


async def test_console_page_shows_queued_players_then_their_match(
    redis_url: str, admin: aioredis.Redis, tmp_path: Path
) -> None:
    assert CHROMIUM is not None, "CI must install chromium (.ci/run)"
    served = Served(redis_url, 2, FASTMATCH_METRICS__TOKEN=TOKEN).start()
    clients = []
    try:
        await wait_workers(admin, 2)
        for i in range(3):  # far apart in rating: they stay queued
            ws, _ = await connect_player(served.port, f"web{i}", 1000 + 1000 * i)
            assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
            clients.append(ws)

        async with chromium(CHROMIUM, tmp_path / "profile", TIMEOUT * 6) as page:
            async with asyncio.timeout(TIMEOUT * 4):
                await page.open(f"http://127.0.0.1:{served.metrics_port}/console?token={TOKEN}")
            waiting = in_mode("1v1", '[data-list="waiting"]')
            queued = in_mode("1v1", '[data-field="queued"]')
            async with asyncio.timeout(TIMEOUT * 2):
                shown = await page.wait_for(
                    f'{queued} && {queued}.innerText === "3" && {waiting}.innerText.includes("web2")'
                    f' && {waiting}.innerText')
            assert [line.split()[0] for line in shown.splitlines()] == ["web0", "web1", "web2"]
            # The token left the address bar; the page holds it for its own requests.
            assert TOKEN not in await page.evaluate("location.href")
            assert await page.evaluate('document.querySelector("#redis").innerText') == "ok"
            # What this host's metrics give (not the cluster's, as the Redis figures are) says so.
            labels = await page.evaluate(
                "[" + ", ".join(f"{sel}.previousElementSibling.innerText" for sel in (
                    in_mode("1v1", '[data-field="matches_window"]'),
                    in_mode("1v1", '[data-field="matches_total"]'),
                    in_mode("1v1", '[data-field="wait"]'),
                    'document.querySelector("#connections")')) + "]")
            assert all(label.endswith(" (this host)") for label in labels), labels
            # A reload: the address no longer has the token, the tab does.
            await page.reload()
            async with asyncio.timeout(TIMEOUT * 2):
                await page.wait_for(f'{queued} && {queued}.innerText === "3"')
            # A new tab, the token in the fragment (which no proxy or access log sees).
            async with asyncio.timeout(TIMEOUT * 4):
                await page.open(f"http://127.0.0.1:{served.metrics_port}/console#token={TOKEN}")
            async with asyncio.timeout(TIMEOUT * 2):
                await page.wait_for(f'{queued} && {queued}.innerText === "3"')
            assert TOKEN not in await page.evaluate("location.href")
            assert (await page.screenshot(tmp_path / "console-queued.png"))[:8] == b"\x89PNG\r\n\x1a\n"

            pair = [(await connect_player(served.port, f"duo{i}", 99_000))[0] for i in range(2)]
            for ws in pair:
                assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
            clients += pair
            match_id = (await start_loading(pair[0]))["loading_session_id"]
            checks = in_mode("1v1", '[data-list="ready_checks"]')
            matches = in_mode("1v1", '[data-field="matches_window"]')
            async with asyncio.timeout(TIMEOUT * 2):
                await page.wait_for(f'{checks} && {checks}.innerText.includes({json.dumps(match_id)})'
                                    f' && {matches}.innerText === "1" && {queued}.innerText === "3"')
            workers = await page.evaluate('document.querySelectorAll("#workers tbody tr").length')
            assert workers == 2
            png = await page.screenshot(tmp_path / "console-matched.png")
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
            assert page.errors == []
    finally:
        for ws in clients:
            await ws.close()
        await asyncio.to_thread(served.stop)
