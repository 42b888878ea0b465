"""The whole Redis key layout in one place (DESIGN "Data model").

Mode keys share the hash tag ``{mm:<mode>}``; each player's record has its own tag ``{<player>}``.
Scripts receive every key they touch in KEYS. Scripts that span a player and a mode therefore need
one Redis node (standalone, Sentinel), or one hash slot: on a Redis Cluster every key starts
with ``CLUSTER_TAG`` (:func:`configure`), whose slot wins over the tags after it, so the whole
state lives in one slot of one shard (README "Deployment: Redis Cluster").
"""

from typing import Final

from server.store import cluster

DELIVERY_PREFIX: Final = "fm:deliver:"  # + worker id; scripts publish notifications here
CLUSTER_TAG: Final = "{fm}"
_prefix = ""  # "" on one node; CLUSTER_TAG on a cluster


def configure(url: str) -> None:
    """Use the layout of the Redis ``url`` names (a process talks to one deployment; every
    entry point calls this with its URL before it touches a key)."""
    global _prefix  # noqa: PLW0603 (one deployment per process, chosen at its entry point)
    _prefix = CLUSTER_TAG if url.startswith(cluster.SCHEME) else ""


def pattern() -> str:
    """A SCAN/KEYS pattern for every key of this layout: all of them on one node, the ``{fm}``
    slot's on a cluster (other data may share it)."""
    return f"{_prefix}*"  # braces are plain characters to Redis' glob


def probe() -> str:
    """Never written: the breaker's probe asks Redis to overwrite it only if it exists (a write
    refused exactly when fastmatch's writes are; server/store/client.py)."""
    return f"{_prefix}fm:probe"


def workers() -> str:
    """ZSET worker id -> heartbeat deadline (ms, Redis clock)."""
    return f"{_prefix}fm:workers"


def player(player_id: str) -> str:
    """HASH: state, mode, queued_at, worker, conn (exists while connected or in a queue)."""
    return f"{_prefix}fm:player:{{{player_id}}}"


def penalty(player_id: str) -> str:
    """ZSET match id -> time (ms) of each dodged ready check; expires after the window."""
    return f"{_prefix}fm:penalty:{{{player_id}}}"


def battle_replies(worker_id: str) -> str:
    """Pub/sub channel on which game servers answer this worker's battle requests."""
    return f"fm:battle:{worker_id}"


def worker_players(worker_id: str) -> str:
    """SET of players whose connection this worker holds (used to reap a dead worker)."""
    return f"{_prefix}fm:worker:{{{worker_id}}}:players"


def players_worker(key: str) -> str | None:
    """The worker whose ``worker_players`` set ``key`` is; None for any other key."""
    head, tail = f"{_prefix}fm:worker:{{", "}:players"
    return key[len(head):-len(tail)] if key.startswith(head) and key.endswith(tail) else None


def worker_channel(worker_id: str) -> str:
    """Pub/sub channel the worker subscribes to for delivery to its connections."""
    return f"{DELIVERY_PREFIX}{worker_id}"


def queue(mode: str) -> str:
    """ZSET player -> queued_at_ms; the order of waiting, kept across requeue."""
    return f"{_prefix}{{mm:{mode}}}:queue"


def tickets(mode: str) -> str:
    """HASH player -> ticket ``<rating>|<queued_at_ms>|<attrs json>`` (decoded by _fastmatch)."""
    return f"{_prefix}{{mm:{mode}}}:tickets"


def grace(mode: str) -> str:
    """ZSET player -> resume deadline (ms): disconnected, not matchable, removed after it."""
    return f"{_prefix}{{mm:{mode}}}:grace"


def leader(mode: str) -> str:
    """STRING ``<holder>|<epoch>`` with a PX ttl: the mode's matchmaking lease."""
    return f"{_prefix}{{mm:{mode}}}:leader"


def epoch(mode: str) -> str:
    """Fencing counter, incremented on every lease acquisition; never expires (a counter)."""
    return f"{_prefix}{{mm:{mode}}}:epoch"


def match(mode: str, match_id: str) -> str:
    """HASH: status, deadline, teams, per-player tickets (``t:<player>``) and ready flags."""
    return f"{_prefix}{{mm:{mode}}}:match:{match_id}"


def loading(mode: str) -> str:
    """ZSET match id -> ready-check deadline (ms): what the sweeper walks."""
    return f"{_prefix}{{mm:{mode}}}:loading"


def left(mode: str) -> str:
    """ZSET ``<match id>|<player>|<cancel or abort>`` -> when the mode's leader settles it:
    a player left a ready check and the match must be cancelled. The detaching worker cancels
    at once; this record makes the leader's sweeper finish the job if that worker could not
    (Redis refused, or it died between the two steps)."""
    return f"{_prefix}{{mm:{mode}}}:left"


def hold(mode: str) -> str:
    """STRING with a PX ttl: why the mode's leader forms no matches now ("game_server": none
    listens; "allocation_failed": the back-off after failed handoffs). Read by status."""
    return f"{_prefix}{{mm:{mode}}}:hold"


def hold_failures(mode: str) -> str:
    """Handoffs failed in a row (the back-off doubles with it); cleared by an assignment."""
    return f"{_prefix}{{mm:{mode}}}:hold_failures"


def changes(mode: str) -> str:
    """STREAM of every change of the mode's queue (issue 10), appended by the scripts that make
    them, trimmed to about CHANGES_KEPT entries: what the mode's leader applies to the pool it
    keeps in memory instead of re-reading the queue every tick. Fields: ``o`` the change
    (``a`` added, with ``t`` its ticket; ``r`` removed; ``g`` resume grace began; ``u`` it
    ended, the player is matchable again; ``m`` matched, ``p`` holding every player one
    ``commit_matches`` call committed, comma-separated), ``p`` the player."""
    return f"{_prefix}{{mm:{mode}}}:changes"


CHANGES_KEPT: Final = 100_000


def mode_keys(mode: str) -> list[str]:
    """What every script touching a mode's queue declares, in this order: queue, tickets,
    grace, changes."""
    return [queue(mode), tickets(mode), grace(mode), changes(mode)]


_LASTING: Final = (":leader", ":epoch", ":players", ":hold", ":hold_failures", ":changes")


def outlives_players(key: str) -> bool:
    """May this key remain once every player has left (DESIGN invariant 6)? The worker registry
    and per-worker sets while workers run, a live lease, the epoch counter, a mode's hold and its
    failure count (both expire by themselves), its changes stream (a log of what happened,
    trimmed to CHANGES_KEPT entries, not a record of anyone), and penalties, which expire with
    their window.
    Anything else left behind is a leak."""
    return key == workers() or key.endswith(_LASTING) or key.startswith(f"{_prefix}fm:penalty:")
