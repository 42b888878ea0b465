"""Typed access to players, queues and workers: one method per script, dataclass results.

Callers never index raw replies; a reply of an unexpected shape raises ProtocolViolation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from server.config import PenaltyConfig
from server.matching import tickets
from server.protocol.results import DequeueResult, EnqueueResult, PlayerState, StatusResult
from server.store import keys
from server.store.client import RedisClient, as_list, as_str, to_int
from server.store.errors import ProtocolViolation, StoreError

_STATES: Final[frozenset[str]] = frozenset({"idle", "queued", "loading"})
_MODE_RETRIES: Final = 4
# A ready check's leaver is cancelled by the detaching worker at once; the mode's leader takes
# over (DESIGN: every step repairable) only if that has not happened this long after.
LEFT_SETTLE_MS: Final = 1000


@dataclass(frozen=True, slots=True)
class Attached:
    player: PlayerState
    previous_worker: str
    previous_conn: str
    # (mode, match id): a match the player was assigned to while no connection held it (its
    # drop raced the game server's answer); this connection tells it (lua/attach.lua).
    found: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class DetachResult:
    outcome: Literal["removed", "grace", "loading", "stale", "alive", "kept"]
    grace_deadline_ms: int = 0
    match_id: str = ""  # with "loading": the match the player walked out of ...
    mode: str = ""  # ... and its mode


@dataclass(frozen=True, slots=True)
class Heartbeat:
    deadline_ms: int
    lapsed: bool  # it was past its deadline, or not registered at all: others may have reaped it


class PlayerStore:
    def __init__(
        self, client: RedisClient, worker_id: str, resume_grace_ms: int,
        penalty: PenaltyConfig | None = None,
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.grace_ms = resume_grace_ms
        pen = penalty or PenaltyConfig()
        self._penalty_args = [int(pen.window_s * 1000), pen.threshold, int(pen.block_s * 1000)]

    async def attach(self, player: str, conn: str) -> Attached:
        # A new connection does not know the player's mode; most connecting players are idle.
        attached = await self._attach(player, conn, reattach=False)
        assert attached is not None  # only a re-attach can be refused
        return attached

    async def reattach(
        self, player: str, conn: str, gone_conn: str = "", mode_guess: str = ""
    ) -> Attached | None:
        """Attach ``conn`` again after Redis lost the player's record, or lost this attach
        and still names ``gone_conn`` (an ended connection of this worker); None when another
        connection wrote the record since (this one was replaced meanwhile)."""
        return await self._attach(player, conn, reattach=True, gone_conn=gone_conn,
                                  mode_guess=mode_guess)

    async def _attach(
        self, player: str, conn: str, *, reattach: bool, gone_conn: str = "", mode_guess: str = ""
    ) -> Attached | None:
        reply = await self._with_mode(
            "attach", player, [keys.player(player), keys.worker_players(self.worker_id)],
            lambda mode: [player, self.worker_id, conn, mode, int(reattach), gone_conn],
            mode_guess=mode_guess,
        )
        if reattach and reply == ["replaced"]:
            return None
        if reply[0] != "ok" or len(reply) < 7:
            raise ProtocolViolation(f"attach replied {reply!r}")
        state = _player_state(reply[1], reply[2], reply[3], reply[6])
        found = (reply[7], reply[8]) if len(reply) >= 9 and reply[8] else None
        return Attached(state, previous_worker=reply[4], previous_conn=reply[5], found=found)

    async def detach(
        self, player: str, conn: str, worker_id: str | None = None, mode_guess: str = "",
        shutdown: bool = False, reaping: bool = False,
    ) -> DetachResult:
        """Release ``conn`` (or, with ``conn == ""``, any connection of ``worker_id``). A player
        leaving a ready check is also recorded for the mode's leader, who cancels the match
        (as ``abort`` with ``shutdown``) unless the caller does it first. ``reaping``: only
        while ``worker_id`` is still past its heartbeat deadline (else outcome "alive")."""
        wid = worker_id or self.worker_id
        kind = "abort" if shutdown else "cancel"
        reply = await self._with_mode(
            "detach", player, [keys.player(player), keys.worker_players(wid), keys.workers()],
            lambda mode: [player, wid, conn, mode, self.grace_ms, kind, LEFT_SETTLE_MS,
                          "1" if reaping else ""], mode_guess,
            lambda mode: [*keys.mode_keys(mode), keys.left(mode)],
        )
        match reply[0]:
            case "grace":
                return DetachResult("grace", to_int(reply[1]) if len(reply) > 1 else 0)
            case "loading" if len(reply) == 3:
                return DetachResult("loading", match_id=reply[1], mode=reply[2])
            case "removed" | "stale" | "alive" | "kept" as outcome:
                return DetachResult(outcome)
        raise ProtocolViolation(f"detach replied {reply!r}")

    async def enqueue(
        self, player: str, conn: str, mode: str, rating: float, attrs: Mapping[str, object]
    ) -> EnqueueResult:
        raw = await self.client.script(
            "enqueue", [keys.player(player), *keys.mode_keys(mode), keys.penalty(player)],
            [player, conn, mode, tickets.rating_arg(rating), tickets.attrs_arg(attrs),
             *self._penalty_args],
        )
        reply = as_list(raw, "enqueue")
        match reply:
            case ["ok", queued_at]:
                return EnqueueResult("ok", queued_at_ms=to_int(queued_at))
            case ["replaced"] | ["gone"]:
                return EnqueueResult(reply[0])  # type: ignore[arg-type]
            case ["blocked", retry_after]:
                return EnqueueResult("blocked", retry_after_ms=to_int(retry_after))
            case ["already", state, current_mode, queued_at, match_id]:
                return EnqueueResult("already", current=_player_state(state, current_mode, queued_at,
                                                                      match_id))
        raise ProtocolViolation(f"enqueue replied {reply!r}")

    async def dequeue(self, player: str, conn: str, mode_guess: str = "") -> DequeueResult:
        reply = await self._with_mode(
            "dequeue", player, [keys.player(player)], lambda mode: [player, conn, mode], mode_guess
        )
        match reply:
            case ["ok", mode]:
                return DequeueResult("ok", mode)
            case ["replaced"] | ["gone"] | ["not_in_queue"]:
                return DequeueResult(reply[0])  # type: ignore[arg-type]
            case ["invalid_state", _]:
                return DequeueResult("invalid_state")
        raise ProtocolViolation(f"dequeue replied {reply!r}")

    async def status(self, player: str, mode_guess: str = "") -> StatusResult:
        """The player's state, its queue's size, the Redis clock and why its mode holds."""
        reply = await self._with_mode(
            "status", player, [keys.player(player)], lambda mode: [mode], mode_guess,
            lambda mode: [*keys.mode_keys(mode), keys.hold(mode)],
        )
        if reply[0] != "ok" or len(reply) < 7:
            raise ProtocolViolation(f"status replied {reply!r}")
        return StatusResult(_player_state(reply[1], reply[2], reply[3]), to_int(reply[4]),
                            to_int(reply[5]), waiting_for=reply[6])

    async def found_told(self, player: str, match_id: str) -> None:
        """``match_id``, found while the player had no connection (``Attached.found``), has
        been told (or its record is gone): no later connection hears it again."""
        await self.client.script("found_told", [keys.player(player)], [match_id])

    async def heartbeat(self, ttl_ms: int) -> Heartbeat:
        reply = as_list(await self.client.script("heartbeat", [keys.workers()], [self.worker_id, ttl_ms]),
                        "heartbeat")
        match reply:
            case [deadline, previous, now]:
                # Past its deadline, or forgotten: the others may have reaped it meanwhile.
                # At the deadline counts: due.lua (the reapers' view) takes score <= now.
                lapsed = not previous or to_int(previous) <= to_int(now)
                return Heartbeat(to_int(deadline), lapsed=lapsed)
        raise ProtocolViolation(f"heartbeat replied {reply!r}")

    async def due(self, zset_key: str, limit: int = 100) -> list[str]:
        return await due(self.client, zset_key, limit)

    async def expire_grace(self, player: str, mode: str) -> bool:
        raw = await self.client.script(
            "expire_grace", [keys.player(player), *keys.mode_keys(mode)], [player, mode]
        )
        return as_list(raw, "expire_grace")[0] == "removed"

    async def worker_members(self, worker_id: str) -> list[str]:
        members = await self.client.command("SMEMBERS", keys.worker_players(worker_id))
        return sorted(as_str(m) for m in members)

    async def forget_worker(self, worker_id: str, reaping: bool = False) -> bool:
        """Drop ``worker_id`` from the registry once it holds no player (``reaping``: and only
        while it is still past its deadline)."""
        raw = await self.client.script(
            "forget_worker", [keys.workers(), keys.worker_players(worker_id)],
            [worker_id, "1" if reaping else ""],
        )
        return to_int(raw) == 1

    async def owners(self, players: list[str], chunk: int = 500) -> list[tuple[str, str]]:
        """(worker, conn) holding each player ("" when Redis has no record), pipelined."""
        out: list[tuple[str, str]] = []
        for start in range(0, len(players), chunk):
            part = players[start:start + chunk]
            replies = await self.client.pipeline(
                "owners", [("HMGET", keys.player(p), "worker", "conn") for p in part])
            for reply in replies:
                if not isinstance(reply, list) or len(reply) != 2:
                    raise ProtocolViolation(f"owners: HMGET replied {reply!r:.100}")
                out.append((as_str(reply[0]), as_str(reply[1])))
        return out

    async def records(self, players: list[str], chunk: int = 500) -> list[tuple[str, str, PlayerState]]:
        """(worker, conn, state) of each player ("", "", idle when Redis has no record),
        pipelined: who holds it, and where it stands (a resync compares both)."""
        out: list[tuple[str, str, PlayerState]] = []
        for start in range(0, len(players), chunk):
            replies = await self.client.pipeline("records", [
                ("HMGET", keys.player(p), "worker", "conn", "state", "mode", "queued_at", "match")
                for p in players[start:start + chunk]])
            for reply in replies:
                if not isinstance(reply, list) or len(reply) != 6:
                    raise ProtocolViolation(f"records: HMGET replied {reply!r:.100}")
                worker, conn, state, mode, queued_at, match = (as_str(x) for x in reply)
                out.append((worker, conn, _player_state(state or "idle", mode, queued_at, match)))
        return out

    async def states(self, players: list[str], chunk: int = 500) -> list[PlayerState]:
        """Each player's state, mode, queued_at and match (idle when Redis has no record),
        pipelined."""
        out: list[PlayerState] = []
        for start in range(0, len(players), chunk):
            replies = await self.client.pipeline("states", [
                ("HMGET", keys.player(p), "state", "mode", "queued_at", "match")
                for p in players[start:start + chunk]])
            for reply in replies:
                if not isinstance(reply, list) or len(reply) != 4:
                    raise ProtocolViolation(f"states: HMGET replied {reply!r:.100}")
                state, mode, queued_at, match_id = (as_str(x) for x in reply)
                out.append(_player_state(state or "idle", mode, queued_at, match_id))
        return out

    async def publish(self, channel: str, data: bytes) -> int:
        return await self.client.publish(channel, data)

    async def listening(self, channel: str) -> int:
        """Subscribers of ``channel`` now (on a cluster, of every node)."""
        counted = await self.client.listeners(channel)
        if counted is not None:
            return counted
        reply = await self.client.command("PUBSUB", "NUMSUB", channel)
        return to_int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else 0

    async def _with_mode(
        self, name: str, player: str, fixed_keys: list[str],
        args: Callable[[str], list[str | int | float]], mode_guess: str,
        mode_keys: Callable[[str], list[str]] = keys.mode_keys,
    ) -> list[str]:
        """Run a script that also needs the keys of the player's current mode.

        The caller's guess (the session knows its mode) goes first; the script checks it and
        answers "retry" with the real mode when it is wrong, so every key a script touches is
        declared in KEYS and a right guess costs one round trip.
        """
        mode = mode_guess
        for _ in range(_MODE_RETRIES):
            extra = mode_keys(mode) if mode else []
            reply = as_list(await self.client.script(name, fixed_keys + extra, args(mode)), name)
            if reply[0] != "retry":
                return reply
            mode = reply[1] if len(reply) > 1 else ""
        raise StoreError(f"{name}: the player's mode kept changing")


async def due(client: RedisClient, zset_key: str, limit: int) -> list[str]:
    """Members of a deadline ZSET whose deadline passed on the Redis clock (``due.lua``)."""
    reply = await client.script("due", [zset_key], [limit])
    return [as_str(item) for item in reply] if isinstance(reply, list) else []


def _player_state(state: str, mode: str, queued_at: str, match_id: str = "") -> PlayerState:
    if state not in _STATES:
        raise ProtocolViolation(f"unknown player state {state!r}")
    queued = to_int(queued_at) if queued_at else 0
    return PlayerState(state, mode, queued, match_id if state == "loading" else "")  # type: ignore[arg-type]
