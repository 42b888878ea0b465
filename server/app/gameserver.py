"""``fastmatch gameserver``: a reference game server for development, tests and load runs.

It listens on the battle request channel (PROTOCOL 7) and answers each request on its
``reply_to`` with ``battle_assigned`` (a made-up address) - or, when told to, late, with
``battle_rejected`` for a share of requests, or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from dataclasses import dataclass

import msgspec

from server.logthrottle import Throttled
from server.protocol import gameserver as gs
from server.store.client import RedisClient
from server.store.errors import StoreUnavailable
from server.transport.subscriber import Subscriber

log = logging.getLogger(__name__)
_unanswered = Throttled(log, "battle requests not answered, storage unavailable")


@dataclass(frozen=True, slots=True)
class Behaviour:
    delay_ms: int = 0  # answer this late
    reject_rate: float = 0.0  # share of requests answered with battle_rejected
    silent: bool = False  # never answer (the allocation times out)


class ReferenceGameServer:
    def __init__(self, redis_url: str, channel: str = "battle:request",
                 behaviour: Behaviour | None = None, seed: int | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.received = 0  # battle requests heard (a count: a long run must not grow memory)
        self.last_request: gs.BattleRequest | None = None
        self._redis = RedisClient(redis_url)
        self._rng = random.Random(seed)
        self._subscriber = Subscriber(redis_url, {channel: self._on_request}, self._nothing)
        self._tasks: set[asyncio.Task[None]] = set()
        self._served = 0

    async def start(self) -> None:
        self._subscriber.start()
        await self._subscriber.wait_subscribed()

    async def close(self) -> None:
        await self._subscriber.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.close()

    @staticmethod
    async def _nothing() -> None:
        return None

    def _on_request(self, data: bytes) -> None:
        try:
            request = gs.decode_request(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring malformed battle request: %s", exc)
            return
        self.received += 1
        self.last_request = request
        if self.behaviour.silent:
            return
        task = asyncio.create_task(self._answer(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: gs.BattleRequest) -> None:
        if self.behaviour.delay_ms:
            await asyncio.sleep(self.behaviour.delay_ms / 1000)
        reply: gs.BattleReply
        if self._rng.random() < self.behaviour.reject_rate:
            reply = gs.BattleRejected(match_id=request.match_id, reason="no capacity (simulated)")
        else:
            self._served += 1
            reply = gs.BattleAssigned(
                match_id=request.match_id,
                server_address=f"gs-{self._served % 16}.fastmatch.invalid:7777",
                server_session_id=f"{request.game_mode}-{request.match_id}",
            )
        try:
            await self._redis.command("PUBLISH", request.reply_to, gs.encode(reply))
        except StoreUnavailable as exc:  # an outage: the match's allocation deadline ends it
            _unanswered("%s: %s", request.match_id, exc)
        except Exception:  # task boundary: one failed answer must not stop the server
            log.warning("could not answer battle request %s", request.match_id, exc_info=True)


async def serve_forever(redis_url: str, channel: str, behaviour: Behaviour) -> None:
    server = ReferenceGameServer(redis_url, channel, behaviour)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("reference game server on %s (%s)", channel, behaviour)
    await stop.wait()
    await server.close()


def run_gameserver(redis_url: str, channel: str, behaviour: Behaviour,
                   tied_to_parent: bool = False) -> None:
    """Process entry point (``fastmatch gameserver``, or spawned by ``serve`` in dev, where it
    must not outlive the supervisor)."""
    from server.app.logs import setup_logging
    from server.osutil import die_with_parent

    if tied_to_parent:
        die_with_parent()
        # Out of the terminal's process group: a Ctrl-C or SIGHUP meant for the supervisor
        # must not end it mid-drain (the supervisor stops it after the workers).
        with contextlib.suppress(OSError):
            os.setsid()
    setup_logging("gameserver")
    import uvloop

    uvloop.run(serve_forever(redis_url, channel, behaviour))
