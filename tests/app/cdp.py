"""A headless Chromium driven over the Chrome DevTools Protocol, with the `websockets` package the
project already uses: no browser download, no driver, no new dependency. Just enough for tests:
open a page, wait for the DOM to satisfy a condition, take a screenshot."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1000",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    return shutil.which("chromium") or next(
        (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.access(p, os.X_OK)), None)


class CDPError(Exception):
    pass


class Page:
    """One tab, attached with a flat session on the browser's DevTools connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.session: str | None = None
        self.errors: list[str] = []  # uncaught exceptions and console errors on the page
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            message = json.loads(frame)
            if "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            method, params = message.get("method", ""), message.get("params", {})
            if method == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append(params["entry"].get("text", ""))
            waiter = self._events.pop(method, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(params)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.ws.send(json.dumps(message))
        reply = await future
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def expect(self, event: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``event``; take it before the call that causes the event."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events[event] = future
        return future

    async def open(self, url: str) -> None:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await self.call(f"{domain}.enable")
        loaded = self.expect("Page.loadEventFired")
        await self.call("Page.navigate", url=url)
        await loaded

    async def reload(self) -> None:
        loaded = self.expect("Page.loadEventFired")
        await self.call("Page.reload")
        await loaded

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            raise CDPError(json.dumps(result["exceptionDetails"])[:1000])
        return result["result"].get("value")

    async def wait_for(self, predicate_js: str) -> Any:
        """Resolve when ``predicate_js`` (a JS expression) is truthy, re-checked on every DOM
        change: the page's own updates are the event. Bound the wait with asyncio.timeout."""
        return await self.evaluate(f"""new Promise(resolve => {{
            const check = () => {{ const v = ({predicate_js}); if (v) {{ obs.disconnect(); resolve(v); }} }};
            const obs = new MutationObserver(check);
            obs.observe(document, {{subtree: true, childList: true, characterData: true}});
            check();
        }})""")

    async def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode((await self.call("Page.captureScreenshot", format="png",
                                                 captureBeyondViewport=True))["data"])
        await asyncio.to_thread(path.write_bytes, data)
        return data

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(binary: str, profile: Path, start_timeout: float = 30.0) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile; yields a page on its DevTools connection."""
    await asyncio.to_thread(profile.mkdir, parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        binary, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        # Chromium announces its DevTools endpoint on stderr once it listens.
        seen = []
        async with asyncio.timeout(start_timeout):
            while True:
                line = (await proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise CDPError(f"chromium exited ({await proc.wait()}): {''.join(seen)[-2000:]}")
                seen.append(line)
                if line.startswith("DevTools listening on "):
                    url = line.split(" on ", 1)[1].strip()
                    break

        async def drain_stderr() -> None:  # a full pipe would stall the browser
            assert proc.stderr is not None
            while await proc.stderr.readline():
                pass

        drain = asyncio.create_task(drain_stderr())
        async with connect(url, max_size=None, open_timeout=None) as ws:
            page = Page(ws)
            try:
                yield page
            finally:
                await page.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
