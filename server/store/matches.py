"""Typed access to leases, candidate snapshots and the fenced match commit."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

import msgspec

from server.matching.changes import Added, Change, GraceOff, GraceOn, Removed
from server.matching.plan import MatchPlan
from server.protocol.results import MatchView, ReadyResult
from server.store import keys
from server.store.client import RedisClient, as_list, as_str, to_int
from server.store.errors import ProtocolViolation, StoreError
from server.store.players import due


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    held: bool
    epoch: int


@dataclass(slots=True)
class PoolSnapshot:
    """A full read of a mode's queue in queue order (grace included, with its tickets; b""
    for a queued player without one: poison), and the changes stream's position before it:
    every change after ``position``, applied on top, brings the pool up to date."""

    now_ms: int = 0
    position: str = ""
    players: list[str] = field(default_factory=list)
    tickets: list[bytes | None] = field(default_factory=list)
    grace: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Changes of a mode's queue after a position, in order. ``position`` is the last one's
    id (the one asked from when none). When ``complete`` (the stream had no more), the queue
    held ``queue_size`` players, ``graced`` of them in resume grace, right after the last."""

    now_ms: int
    position: str
    changes: list[Change]
    queue_size: int
    graced: int
    complete: bool


@dataclass(frozen=True, slots=True)
class CommitResult:
    fenced: bool
    committed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    poisoned: list[str] = field(default_factory=list)
    deadline_ms: int = 0
    # The script failed midway (a Redis error): what it committed before is finished and
    # reported above; the caller records it, then treats the call as failed.
    failure: str = ""


def lease_token(holder: str, epoch: int) -> str:
    return f"{holder}|{epoch}"


class MatchStore:
    def __init__(self, client: RedisClient) -> None:
        self.client = client

    async def acquire(self, mode: str, holder: str, ttl_ms: int) -> LeaseGrant:
        reply = await self.client.script(
            "lease_acquire", [keys.leader(mode), keys.epoch(mode)], [holder, ttl_ms]
        )
        if not isinstance(reply, list) or len(reply) != 2:
            raise ProtocolViolation(f"lease_acquire replied {reply!r}")
        return LeaseGrant(to_int(reply[0]) == 1, to_int(reply[1]))

    async def hold(self, mode: str, request_channel: str, no_server_ms: int) -> str:
        """Why the mode's leader must form no matches now ("" when it may): nobody listens on
        the request channel, or handoffs failed lately (issue 16)."""
        args: list[str | int] = [request_channel, no_server_ms]
        listeners = await self.client.listeners(request_channel)
        if listeners is not None:
            args.append(listeners)
        return as_str(await self.client.script("hold", [keys.hold(mode)], args))

    async def renew(self, mode: str, token: str, ttl_ms: int) -> bool:
        return to_int(await self.client.script("lease_renew", [keys.leader(mode)], [token, ttl_ms])) == 1

    async def release(self, mode: str, token: str) -> bool:
        return to_int(await self.client.script("lease_release", [keys.leader(mode)], [token])) == 1

    async def snapshot(self, mode: str, chunk: int) -> PoolSnapshot:
        """Read the whole queue for the leader's pool, ``chunk`` entries per call so no call
        holds Redis for long (issue 10: none over 5 ms). The chunks are not one atomic view:
        the changes after the position recorded by the first one make up the difference."""
        snap = PoolSnapshot()
        script_keys = [*keys.mode_keys(mode)]
        bound = "-inf"
        while bound:
            reply = await self.client.script("snapshot", script_keys, [bound, chunk])
            if not isinstance(reply, list) or len(reply) < 3 or len(reply) % 3:
                raise ProtocolViolation(f"snapshot replied {reply!r:.200}")
            if not snap.position:
                snap.now_ms, snap.position = to_int(reply[0]), as_str(reply[1])
            bound = as_str(reply[2])
            # Whole-list slicing: a load walks every queued player.
            names = [p.decode() if isinstance(p, bytes) else str(p) for p in reply[3::3]]
            snap.players.extend(names)
            snap.tickets.extend(reply[4::3])
            snap.grace.extend(n for n, g in zip(names, reply[5::3], strict=True) if g)
        if not snap.position:
            raise ProtocolViolation("snapshot gave no stream position")
        return snap

    async def changes(self, mode: str, position: str, limit: int) -> ChangeBatch | None:
        """The queue's changes after ``position`` (about ``limit`` stream entries, an ``m``
        entry counting one more per KiB of its player list; always at least one), or None
        when that position is gone from the stream: only a new snapshot is safe then."""
        reply = await self.client.script(
            "changes", [keys.changes(mode), keys.queue(mode), keys.grace(mode)], [position, limit])
        if isinstance(reply, list) and len(reply) == 1 and as_str(reply[0]) == "reload":
            return None
        if not (isinstance(reply, list) and len(reply) >= 4 and len(reply) % 4 == 0
                and as_str(reply[0]) in ("ok", "more")):
            raise ProtocolViolation(f"changes replied {reply!r:.200}")
        out: list[Change] = []
        for i in range(4, len(reply), 4):
            op, player = as_str(reply[i + 1]), as_str(reply[i + 2])
            if op == "a":
                ticket = reply[i + 3]
                out.append(Added(player, ticket if isinstance(ticket, bytes) else None))
            elif op == "r":
                out.append(Removed(player))
            elif op == "m":
                out.extend(Removed(p) for p in player.split(",") if p)
            elif op == "g":
                out.append(GraceOn(player))
            elif op == "u":
                out.append(GraceOff(player))
            elif op != "s":  # "s": the marker a snapshot of an empty stream leaves
                raise ProtocolViolation(f"changes: unknown change {op!r}")
        entries = (len(reply) - 4) // 4
        return ChangeBatch(
            now_ms=to_int(reply[1]),
            position=as_str(reply[-4]) if entries else position,
            changes=out, queue_size=to_int(reply[2]), graced=to_int(reply[3]),
            complete=as_str(reply[0]) == "ok",
        )

    async def commit(
        self, mode: str, token: str, ready_timeout_ms: int, matches: Sequence[MatchPlan]
    ) -> CommitResult:
        script_keys = [keys.leader(mode), *keys.mode_keys(mode), keys.loading(mode), keys.workers()]
        args: list[str | int | float] = [token, mode, ready_timeout_ms, keys.DELIVERY_PREFIX,
                                          len(matches)]
        for match in matches:
            players = match.players
            script_keys.append(keys.match(mode, match.match_id))
            script_keys.extend(keys.player(p) for p in players)
            args.extend([match.match_id, len(players), json.dumps(match.teams)])
            args.extend(players)
        reply = await self.client.script("commit_matches", script_keys, args)
        return _commit_result(reply)

    async def remove_ticket(self, mode: str, player: str) -> bool:
        """True when the ticket was there and is now gone (its owner is told)."""
        raw = await self.client.script(
            "remove_ticket", [keys.player(player), *keys.mode_keys(mode)],
            [player, mode, keys.DELIVERY_PREFIX]
        )
        return as_list(raw, "remove_ticket")[0] == "removed"


def _commit_result(reply: object) -> CommitResult:
    if isinstance(reply, list) and reply and as_str(reply[0]) == "fenced":
        return CommitResult(fenced=True)
    if not (isinstance(reply, list) and (
                (len(reply) == 5 and as_str(reply[0]) == "ok")
                or (len(reply) == 6 and as_str(reply[0]) == "failed"))
            and all(isinstance(part, list) for part in reply[1:4])):
        raise ProtocolViolation(f"commit_matches replied {reply!r:.200}")
    return CommitResult(
        fenced=False,
        committed=[as_str(x) for x in reply[1]],
        skipped=[as_str(x) for x in reply[2]],
        poisoned=[as_str(x) for x in reply[3]],
        deadline_ms=to_int(reply[4]),
        failure=as_str(reply[5]) if len(reply) == 6 else "",
    )


@dataclass(frozen=True, slots=True)
class PlayerOutcome:
    player: str
    what: Literal["requeued", "removed", "timed_out", "matched"]


@dataclass(frozen=True, slots=True)
class FinishResult:
    outcome: Literal["done", "final", "not_due", "absent"]
    status: str = ""
    reason: str = ""
    players: list[PlayerOutcome] = field(default_factory=list)


FinishAction = Literal["cancel", "abort", "expire", "fail", "assign"]
_WHAT: Final = frozenset({"requeued", "removed", "timed_out", "matched"})
_FINISH_RETRIES: Final = 3


@dataclass(frozen=True, slots=True)
class HoldTimes:
    """How long a mode's matching holds after failed handoffs (issue 16), in ms."""

    initial_ms: int  # after the first failure in a row; doubles with each one after it
    max_ms: int
    no_server_ms: int  # while no game server listens (the leader's tick refreshes it)


class EndingObserver(Protocol):
    """Told of every ending that took effect (metrics, logs); the store knows no Prometheus."""

    def ended(self, mode: str, match_id: str, action: FinishAction, result: FinishResult) -> None:
        ...


class LoadingStore:
    """Ready checks and match endings (PROTOCOL 4 and 7). Every ending is one typed method
    over finish_match.lua, where the match's status decides which ending wins."""

    def __init__(
        self, client: RedisClient, *, resume_grace_ms: int, penalty_window_ms: int,
        finished_ttl_ms: int, hold: HoldTimes, observer: EndingObserver | None = None,
    ) -> None:
        self.client = client
        self.observer = observer
        self._finish_args = [resume_grace_ms, penalty_window_ms, finished_ttl_ms]
        self._tail_args = [hold.initial_ms, hold.max_ms, hold.no_server_ms,
                           # A PUBLISH that reached nobody means nobody heard (finish_match)
                           "1" if client.one_node else "0"]

    async def views(self, matches: Sequence[tuple[str, str]]) -> dict[str, MatchView]:
        """The records of these (mode, match id) loading sessions that Redis still has,
        pipelined, by match id."""
        if not matches:
            return {}
        replies = await self.client.pipeline("match_views", [
            ("HMGET", keys.match(mode, match_id), "status", "reason", "teams", "deadline",
             "server_address", "server_session_id") for mode, match_id in matches])
        out: dict[str, MatchView] = {}
        for (mode, match_id), reply in zip(matches, replies, strict=True):
            if not isinstance(reply, list) or len(reply) != 6:
                raise ProtocolViolation(f"match_views: HMGET replied {reply!r:.100}")
            status, reason, teams, deadline, address, session = (as_str(x) for x in reply)
            if not status:
                continue  # gone (its finished TTL passed, or Redis lost it)
            try:
                decoded = msgspec.json.decode(teams, type=list[list[str]]) if teams else []
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not one fastmatch wrote: as if gone (what it says is unknowable)
            out[match_id] = MatchView(match_id, mode, status, reason, decoded,
                                      to_int(deadline) if deadline else 0, address, session)
        return out

    async def cancel(self, mode: str, match_id: str, leaver: str, *, shutdown: bool = False) -> FinishResult:
        """``leaver``'s connection ended during the ready check: the others are requeued
        (player_left), the leaver removed with a penalty; with ``shutdown`` the server closed
        it (draining): nobody is at fault, everyone requeued (server_shutdown)."""
        return await self._finish(mode, match_id, "abort" if shutdown else "cancel", leaver)

    async def expire(self, mode: str, match_id: str) -> FinishResult:
        """The deadline passed: a ready check times out, a handoff fails (allocation_failed)."""
        return await self._finish(mode, match_id, "expire")

    async def fail(
        self, mode: str, match_id: str, reason: str, players: Sequence[str] | None = None
    ) -> FinishResult:
        """The handoff failed for ``reason``: everyone is requeued, nobody penalised."""
        return await self._finish(mode, match_id, "fail", reason, players=players)

    async def assign(
        self, mode: str, match_id: str, server_address: str, server_session_id: str,
        players: Sequence[str] | None = None,
    ) -> FinishResult:
        """A game server took the match: everyone gets match_found."""
        return await self._finish(mode, match_id, "assign", server_address, server_session_id,
                                  players)

    async def ready(
        self, mode: str, match_id: str, player: str, conn: str, allocation_timeout_ms: int,
        worker_id: str,
    ) -> ReadyResult:
        raw = await self.client.script(
            "ready", [keys.match(mode, match_id), keys.loading(mode), keys.player(player)],
            [player, match_id, conn, allocation_timeout_ms, worker_id],
        )
        if not isinstance(raw, list) or not raw:
            raise ProtocolViolation(f"ready replied {raw!r:.200}")
        head = as_str(raw[0])
        if head in ("unknown", "replaced", "gone", "wrong_session"):
            return ReadyResult(head)  # type: ignore[arg-type]
        if head == "final" and len(raw) == 2:
            return ReadyResult("final", status=as_str(raw[1]))
        if head == "ready":
            return ReadyResult("ready")
        if head == "allocating" and len(raw) >= 4 and len(raw) % 2 == 0:
            tickets = {as_str(raw[i]): bytes(raw[i + 1]) for i in range(4, len(raw), 2)}
            teams = msgspec.json.decode(as_str(raw[2]), type=list[list[str]])
            return ReadyResult("allocating", deadline_ms=to_int(raw[1]), teams=teams,
                               tickets=tickets, created_ms=to_int(raw[3]))
        raise ProtocolViolation(f"ready replied {raw!r:.200}")

    async def _finish(
        self, mode: str, match_id: str, action: FinishAction, arg: str = "", arg2: str = "",
        players: Sequence[str] | None = None,
    ) -> FinishResult:
        """End the match if ``action`` still applies; the status check inside decides.

        The script needs every player's keys: a caller that knows the players (the handoff
        does, from the ready check) saves reading them first; a wrong list is re-read."""
        match_key = keys.match(mode, match_id)
        known = list(players) if players is not None else None
        for _ in range(_FINISH_RETRIES):
            if known is None:
                known = as_str(await self.client.command("HGET", match_key, "players")).split(",")
            names, known = [p for p in known if p], None
            csv = ",".join(names)
            script_keys = [match_key, keys.loading(mode), *keys.mode_keys(mode),
                           *(keys.player(p) for p in names), *(keys.penalty(p) for p in names),
                           keys.left(mode), keys.hold(mode), keys.hold_failures(mode),
                           keys.workers()]
            raw = await self.client.script(
                "finish_match", script_keys,
                [action, match_id, csv, *self._finish_args, arg, arg2, keys.DELIVERY_PREFIX,
                 *self._tail_args]
            )
            result = _finish_result(raw)
            if result is not None:
                if self.observer is not None:
                    self.observer.ended(mode, match_id, action, result)
                return result
        raise StoreError(f"finish_match {match_id}: the player list kept changing")

    async def due(self, mode: str, limit: int = 200) -> list[str]:
        return await due(self.client, keys.loading(mode), limit)

    async def left_due(self, mode: str, limit: int = 200) -> list[tuple[str, str, FinishAction]]:
        """(match, player, "cancel" | "abort") of leavers whose cancel is overdue."""
        out: list[tuple[str, str, FinishAction]] = []
        for member in await due(self.client, keys.left(mode), limit):
            match_id, player, kind = [*member.rsplit("|", 2), "", ""][:3]
            out.append((match_id, player, "abort" if kind == "abort" else "cancel"))
        return out


def _finish_result(raw: object) -> FinishResult | None:
    if not isinstance(raw, list) or not raw:
        raise ProtocolViolation(f"finish_match replied {raw!r:.200}")
    head = as_str(raw[0])
    if head == "retry":
        return None
    if head in ("absent", "not_due"):
        return FinishResult(head)  # type: ignore[arg-type]
    if head == "final" and len(raw) == 2:
        return FinishResult("final", status=as_str(raw[1]))
    if head == "done" and len(raw) >= 3 and (len(raw) - 3) % 2 == 0:
        outcomes = []
        for i in range(3, len(raw), 2):
            player, what = as_str(raw[i]), as_str(raw[i + 1])
            if what not in _WHAT:
                raise ProtocolViolation(f"finish_match: unknown outcome {what!r}")
            outcomes.append(PlayerOutcome(player, what))  # type: ignore[arg-type]
        return FinishResult("done", status=as_str(raw[1]), reason=as_str(raw[2]), players=outcomes)
    raise ProtocolViolation(f"finish_match replied {raw!r:.200}")
