"""Send server messages to players wherever their connection lives (DESIGN "Routing")."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from server.protocol.messages import ServerMessage
from server.store import keys
from server.store.errors import StoreError
from server.store.players import PlayerStore
from server.transport import envelope

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    worker: str
    player: str
    conn: str
    message: ServerMessage


class Publisher:
    """Groups messages by worker: one PUBLISH per worker and batch, whatever the player count."""

    def __init__(self, store: PlayerStore) -> None:
        self.store = store

    async def send(self, messages: Iterable[Outgoing]) -> int:
        """Publish; return how many messages reached a subscribed worker.

        A player with no connection (in resume grace) or a dead worker is skipped: the state is
        in Redis, and the client reads it from `welcome` when it reconnects.
        """
        by_worker: dict[str, list[envelope.Item]] = defaultdict(list)
        for out in messages:
            if out.worker and out.conn:
                by_worker[out.worker].append(
                    envelope.Item(player=out.player, conn=out.conn, message=out.message)
                )
        delivered = 0
        for worker, items in by_worker.items():
            data = envelope.encode(envelope.Deliver(items=items))
            try:
                if await self.store.publish(keys.worker_channel(worker), data):
                    delivered += len(items)
                else:
                    log.warning("worker %s is not listening; %d messages not delivered", worker, len(items))
            except StoreError as exc:
                log.warning("delivery to worker %s failed: %s", worker, exc)
        return delivered
