"""The one configuration object: a TOML file plus ``FASTMATCH_*`` environment overrides.

This module is a leaf (it imports nothing else from fastmatch) so every layer may read its types.
Nothing else in the project reads ``os.environ``: callers pass ``environ`` in.

Environment overrides use ``__`` between levels: ``FASTMATCH_SERVER__PORT=9000``,
``FASTMATCH_REDIS__URL=redis://...``, ``FASTMATCH_MODES__1V1__WINDOW_BASE=80``. Values are parsed
as TOML values when they parse (numbers, booleans, arrays) and kept as strings otherwise.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import msgspec

from server.errors import ConfigError

ENV_PREFIX: Final = "FASTMATCH_"
DEV_SECRET: Final = "fastmatch-dev-secret-do-not-use-in-production"
# Ratings beyond this are refused (a token's claim, a mode's default): team sums of ratings near
# a float's range overflow to inf (then NaN), and no pairing can be made of them.
MAX_RATING: Final = 1e9
MODE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
SERVICE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Base, frozen=True):
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 0  # 0: one per CPU
    max_message_bytes: int = 4096
    bad_message_budget: int = 10  # PROTOCOL 5: past it the connection is closed with 1008
    message_rate: float = 20.0  # client messages per second per connection ...
    message_burst: float = 40.0  # ... with this burst
    connect_rate_per_ip: float = 20.0  # new connections per second per client IP (per worker)
    connect_burst_per_ip: float = 50.0
    # An IPv6 client is counted by its network of this many bits: one host commonly holds a
    # whole /64 and may use a new address of it for every connection.
    connect_ipv6_prefix: int = 64
    rate_limit_strikes: int = 3  # refused messages tolerated before close 4008
    # SIGTERM: /ready turns 503 and players are still served for drain_delay_s (balancers'
    # health checks take the host out), then clients are closed with 1001; drain_timeout_s
    # bounds the whole of it, delay included (then the supervisor kills the worker).
    drain_delay_s: float = 5.0
    drain_timeout_s: float = 15.0
    # A worker whose event loop has not run for this long is killed (and restarted like a
    # crashed one): a wedged loop still holds its listening socket, so new players would hang
    # on it. 0 disables. Far above any legitimate stall (a big pool load takes ~0.5 s).
    worker_stall_kill_s: float = 60.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    resume_grace_ms: int = 10_000
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    housekeeping_interval_s: float = 0.5
    audit_interval_s: float = 30.0  # a worker checks Redis' records of it against its connections
    # Overload (README "Overload"): past these, new handshakes get HTTP 503 + Retry-After at once.
    max_loop_lag_ms: float = 250.0  # the event loop runs this late (0 disables)
    max_handshake_queue_ms: float = 500.0  # a request waited this long to be read (0 disables)
    max_pending_handshakes: int = 256  # upgrades waiting for their welcome, per worker
    max_connections: int = 50_000  # open client connections per worker
    overload_retry_after_s: int = 1  # the Retry-After header of those 503s ...
    overload_retry_after_max_s: int = 10  # ... growing to this as a worker refuses more of them
    backlog: int = 4096  # listen() queue; the kernel caps it at net.core.somaxconn
    # TLS (wss://): PEM files read at each worker's start (SIGHUP picks up a renewed one).
    tls_cert_file: str = ""  # the certificate, then its intermediates; empty: plain ws://
    tls_key_file: str = ""  # its private key, unencrypted; empty: the key is in tls_cert_file
    # PROXY protocol v1/v2 (README "Behind a load balancer"): every connection must start with
    # a header, from a peer in proxy_trusted, within proxy_header_timeout_s.
    proxy_protocol: bool = False
    proxy_trusted: tuple[str, ...] = ()  # the balancers' addresses, as CIDRs
    proxy_header_timeout_s: float = 5.0


class AuthConfig(_Base, frozen=True):
    secret: str = DEV_SECRET
    algorithm: str = "HS256"  # HS256 with `secret`; RS256/ES256 with `public_key_file`
    public_key_file: str = ""
    leeway_s: float = 5.0


class RedisConfig(_Base, frozen=True):
    url: str = ""  # empty: start an embedded redis-server (unless sentinels are set)
    # Sentinel (README "Deployment: Sentinel"): "host:port,host:port" and the monitored
    # service's name; the primary is asked of them at every (re)connect. `url` then only
    # carries the primary's credentials and db (its host is not used).
    sentinels: str = ""
    sentinel_service: str = ""
    # Redis Cluster (README "Deployment: Redis Cluster"): `url` names any node; the primaries
    # are learnt from it (CLUSTER SLOTS) and each call goes to its slot's primary.
    cluster: bool = False
    operation_timeout_s: float = 2.0
    # Calls awaiting replies per worker (all on one pipelined connection); past it, calls fail
    # at once with `unavailable` without counting against Redis in the breaker.
    max_inflight: int = 10_000
    # Calls issued within this window leave Redis-bound in one write (0: per loop iteration).
    pipeline_window_ms: float = 2.0
    breaker_threshold: int = 5  # consecutive failures that open the circuit
    breaker_cooldown_s: float = 60.0  # the longest wait between recovery probes while open
    breaker_probe_s: float = 0.25  # the first recovery probe this long after opening, then x2
    reconnect_base_s: float = 0.1
    reconnect_max_s: float = 5.0


class MetricsConfig(_Base, frozen=True):
    port: int = 9100
    host: str = ""  # "" = server.host; 127.0.0.1 keeps /metrics and /console on the host itself
    token: str = ""
    flush_interval_s: float = 1.0  # workers add their in-memory counts to /metrics this often


class MatchingConfig(_Base, frozen=True):
    enabled: bool = True  # false: this process serves clients but never runs for a lease
    tick_ms: int = 100  # TryMatch period per mode
    lease_ttl_ms: int = 3000  # leader lease; renewed every third of it
    tick_budget_ms: int = 800  # a tick stops committing this long after it began (< the lease)
    snapshot_chunk: int = 1000  # queue entries per Redis read of a full load (bounds each call)
    changes_chunk: int = 500  # changes-stream entries per read (big ones count more; < 5 ms)
    commit_batch_players: int = 100  # players per fenced commit script (~1-3 ms of Redis each)
    # Commit scripts sent before the first reply is awaited. More drain a big backlog faster
    # (100k matchable 1v1 players: 4 gave ~33k players/s, 6 ~50k/s, 8 ~54k/s), but another
    # client's command can wait behind all of them (its p99 wait grew from ~7 to ~8.5 ms).
    commits_in_flight: int = 6
    ready_timeout_ms: int = 15_000  # ready-check deadline after start_loading
    finished_match_ttl_ms: int = 30_000  # an ended match's record stays this long, then expires


class GameServerConfig(_Base, frozen=True):
    request_channel: str = "battle:request"  # PROTOCOL 7
    allocation_timeout_ms: int = 5000  # no battle_assigned by then: requeue (allocation_failed)
    embedded: bool = False  # `serve` also runs the reference game server (never in production)
    misses_before_critical: int = 10  # DESIGN P1 health monitor
    critical_interval_s: float = 300.0
    # Issue 16: no new ready check for a failure that would repeat. After a failed handoff
    # (rejected, no answer) a mode forms no matches for hold_initial_ms, doubling per failure
    # in a row up to hold_max_ms; while no game server listens it forms none at all.
    hold_initial_ms: int = 1000
    hold_max_ms: int = 30_000


class PenaltyConfig(_Base, frozen=True):
    """Dodging a ready check (leaving or timing out) counts; too many block `enqueue`."""

    threshold: int = 3
    window_s: float = 3600.0
    block_s: float = 600.0


class ModeConfig(_Base, frozen=True):
    team_size: int
    teams: int = 2
    default_rating: float = 1500.0
    window_base: float = 100.0
    window_growth_per_s: float = 20.0
    window_max: float = 500.0
    max_wait_s: float = 120.0

    @property
    def match_size(self) -> int:
        return self.team_size * self.teams

    def window(self, waited_ms: int) -> float:
        """The rating spread this player accepts after ``waited_ms`` (DESIGN "Matching")."""
        # Past max_wait_s the pairing accepts any group; the window shown stays at its cap.
        # The same arithmetic as the pairing kernel, so what clients see is what matching uses.
        grown = self.window_base + self.window_growth_per_s * (max(waited_ms, 0) / 1000.0)
        return min(grown, self.window_max)

    @property
    def max_wait_ms(self) -> int:
        return int(self.max_wait_s * 1000)


class Config(_Base, frozen=True):
    production: bool = False
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    matching: MatchingConfig = msgspec.field(default_factory=MatchingConfig)
    gameserver: GameServerConfig = msgspec.field(default_factory=GameServerConfig)
    penalty: PenaltyConfig = msgspec.field(default_factory=PenaltyConfig)
    modes: dict[str, ModeConfig] = msgspec.field(default_factory=dict)


def default_config_path() -> Path:
    return Path(str(resources.files("server.app").joinpath("default.toml")))


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate; raise :class:`ConfigError` naming the bad key."""
    file = Path(path) if path is not None else default_config_path()
    try:
        raw: dict[str, Any] = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
    for key, value in (environ or {}).items():
        if key.startswith(ENV_PREFIX):
            _set_path(raw, key[len(ENV_PREFIX):].lower().split("__"), _parse_env_value(value))
    for dotted, value in (overrides or {}).items():
        _set_path(raw, dotted.split("."), value)
    return validate(raw)


def validate(raw: Mapping[str, Any]) -> Config:
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec names the path, e.g. "Expected `int`, got `str` - at `$.server.port`".
        raise ConfigError(f"invalid configuration: {exc}") from exc
    _check_semantics(config)
    return config


def _fail(key: str, why: str) -> NoReturn:
    raise ConfigError(f"invalid configuration: `{key}` {why}")


def _check_semantics(config: Config) -> None:
    _check_finite(config)
    _check_server(config.server)
    _check_storage(config)
    _check_matching(config)
    _check_modes(config.modes)


def _check_finite(config: Config) -> None:
    """TOML (and so an environment override) has nan and inf: every comparison is false for
    nan, so no range check below would catch it, and an inf timeout or interval never ends
    (the compiled matching kernel and its twin would also disagree on who can be matched)."""
    sections: list[tuple[str, msgspec.Struct]] = [
        (name, getattr(config, name))
        for name in ("server", "auth", "redis", "metrics", "matching", "gameserver", "penalty")]
    sections += [(f"modes.{name}", mode) for name, mode in config.modes.items()]
    for prefix, section in sections:
        for field in msgspec.structs.fields(section):
            value = getattr(section, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f"{prefix}.{field.name}", f"must be a finite number, not {value}")


def _check_server(s: ServerConfig) -> None:
    if not 0 <= s.port <= 65535:
        _fail("server.port", "must be between 0 and 65535")
    if s.workers < 0:
        _fail("server.workers", "must be >= 0 (0 means one per CPU)")
    if s.max_message_bytes < 64:
        _fail("server.max_message_bytes", "must be at least 64")
    if s.resume_grace_ms < 0:
        _fail("server.resume_grace_ms", "must be >= 0")
    if min(s.message_rate, s.message_burst, s.connect_rate_per_ip, s.connect_burst_per_ip) <= 0:
        _fail("server.message_rate", "and the other rate limits must be > 0")
    if not 32 <= s.connect_ipv6_prefix <= 128:
        _fail("server.connect_ipv6_prefix", "must be between 32 and 128 (128: each address alone)")
    if s.rate_limit_strikes < 0 or s.drain_timeout_s <= 0:
        _fail("server.rate_limit_strikes", "must be >= 0 (and server.drain_timeout_s > 0)")
    if min(s.heartbeat_interval_s, s.housekeeping_interval_s, s.ping_interval_s, s.ping_timeout_s) <= 0:
        _fail("server.heartbeat_interval_s", "and server.housekeeping_interval_s, "
              "server.ping_interval_s, server.ping_timeout_s must be > 0")
    if s.audit_interval_s < 0:
        _fail("server.audit_interval_s", "must be >= 0 (0 disables the audit)")
    if s.overload_retry_after_max_s < s.overload_retry_after_s:
        _fail("server.overload_retry_after_max_s", "must be >= server.overload_retry_after_s")
    if min(s.max_loop_lag_ms, s.max_handshake_queue_ms, s.overload_retry_after_s) < 0:
        _fail("server.max_loop_lag_ms", "and max_handshake_queue_ms and overload_retry_after_s "
              "must be >= 0")
    if min(s.max_pending_handshakes, s.max_connections, s.backlog) < 1:
        _fail("server.max_connections", "and max_pending_handshakes and backlog must be >= 1")
    _check_lifecycle(s)
    _check_edge(s)


def _check_lifecycle(s: ServerConfig) -> None:
    if s.worker_stall_kill_s != 0 and not s.worker_stall_kill_s >= 5:
        _fail("server.worker_stall_kill_s", "must be 0 (off) or at least 5")
    if not 0 <= s.drain_delay_s < s.drain_timeout_s:
        _fail("server.drain_delay_s", "must be >= 0 and less than server.drain_timeout_s, "
              "which bounds the whole drain (the delay included)")


def _check_edge(s: ServerConfig) -> None:
    if s.tls_key_file and not s.tls_cert_file:
        _fail("server.tls_key_file", "needs server.tls_cert_file")
    for cidr in s.proxy_trusted:
        try:
            ipaddress.ip_network(cidr)
        except ValueError as exc:
            _fail("server.proxy_trusted", f"entry {cidr!r} is not an address or CIDR ({exc})")
    if s.proxy_protocol and not s.proxy_trusted:
        _fail("server.proxy_trusted", "must list the balancers' addresses when "
              "server.proxy_protocol is true")
    if s.proxy_header_timeout_s <= 0:
        _fail("server.proxy_header_timeout_s", "must be > 0")


def _check_storage(config: Config) -> None:
    r = config.redis
    if r.operation_timeout_s <= 0:
        _fail("redis.operation_timeout_s", "must be > 0")
    s = config.server
    if s.heartbeat_ttl_s <= 2 * s.heartbeat_interval_s + r.operation_timeout_s:
        # One lost heartbeat must not get a live worker reaped by the others. The heartbeat
        # loop calls, then sleeps an interval: after the last heartbeat Redis took, it sleeps,
        # the next call is lost and fails only after the operation timeout, it sleeps again,
        # and only then does a heartbeat reach Redis.
        _fail("server.heartbeat_ttl_s", "must be greater than 2 x server.heartbeat_interval_s "
              "+ redis.operation_timeout_s (a lost heartbeat fails only after the operation "
              f"timeout): {s.heartbeat_ttl_s:g} <= 2 x {s.heartbeat_interval_s:g} + "
              f"{r.operation_timeout_s:g}")
    if r.max_inflight < 1:
        _fail("redis.max_inflight", "must be >= 1")
    if not 0 < r.reconnect_base_s <= r.reconnect_max_s:
        _fail("redis.reconnect_base_s", "must be > 0 and at most redis.reconnect_max_s")
    _check_sentinels(r)
    _check_cluster(r)
    if not 0 <= r.pipeline_window_ms <= 50:
        _fail("redis.pipeline_window_ms", "must be between 0 and 50")
    _check_metrics(config)
    if r.breaker_threshold < 1 or r.breaker_cooldown_s <= 0 or r.breaker_probe_s <= 0:
        _fail("redis.breaker_threshold", "must be >= 1 (and redis.breaker_cooldown_s, "
              "redis.breaker_probe_s > 0)")
    a = config.auth
    if a.algorithm not in ("HS256", "HS384", "HS512", "RS256", "ES256"):
        _fail("auth.algorithm", "must be one of HS256, HS384, HS512, RS256, ES256")
    if a.algorithm.startswith(("RS", "ES")) and not a.public_key_file:
        _fail("auth.public_key_file", f"is required for {a.algorithm}")
    weak = a.secret == DEV_SECRET or len(a.secret) < 32
    if config.production and a.algorithm.startswith("HS") and weak:
        _fail("auth.secret", "must be a real secret of 32+ characters when production = true")
    if config.production and not (r.url or r.sentinels.strip()):
        # The embedded Redis is a development convenience: one process's memory, no replica.
        _fail("redis.url", "(or redis.sentinels) must name the Redis when production = true")


def _check_metrics(config: Config) -> None:
    mt = config.metrics
    if mt.flush_interval_s <= 0:
        _fail("metrics.flush_interval_s", "must be > 0")
    if not 0 <= mt.port <= 65535:
        _fail("metrics.port", "must be between 1 and 65535 (or 0 to disable it)")
    metrics_host, server_host = mt.host or config.server.host, config.server.host
    wildcard = ("", "0.0.0.0", "::")
    if mt.port and mt.port == config.server.port and (
            metrics_host == server_host or metrics_host in wildcard or server_host in wildcard):
        # On two distinct addresses one port binds twice; on one (or a wildcard) it cannot.
        _fail("metrics.port", f"must differ from server.port on the same address (both are {mt.port})")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_sentinels(r: RedisConfig) -> None:
    if bool(r.sentinels.strip()) != bool(r.sentinel_service):
        _fail("redis.sentinel_service", "and redis.sentinels must be set together")
    if not r.sentinels.strip():
        return
    if not SERVICE_NAME_RE.match(r.sentinel_service):
        _fail("redis.sentinel_service", "must be 1-64 characters of [A-Za-z0-9._-]")
    for entry in r.sentinels.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail("redis.sentinels", f"entry {entry.strip()!r} is not host:port "
                  "(a comma-separated list, e.g. \"10.0.0.1:26379,10.0.0.2:26379\")")
    if r.url and not r.url.startswith("redis://"):
        _fail("redis.url", "with redis.sentinels may only be a redis:// URL carrying the "
              "primary's password and db (TLS and unix sockets are not supported with Sentinel)")


def _check_cluster(r: RedisConfig) -> None:
    if not r.cluster:
        return
    if r.sentinels.strip():
        _fail("redis.cluster", "and redis.sentinels cannot both be set (a cluster fails over by itself)")
    if not r.url.startswith("redis://"):
        _fail("redis.url", "must name a cluster node as redis://[user:password@]host:port when "
              "redis.cluster = true (no embedded cluster; TLS and unix sockets not supported yet)")
    parts = urlsplit(r.url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path.strip("/") not in ("", "0") or parts.query:
        _fail("redis.url", "must be redis://[user:password@]host:port (database 0) when "
              "redis.cluster = true")


def _check_matching(config: Config) -> None:
    m = config.matching
    if not 1 <= m.commits_in_flight <= 32:
        # The tick budget is checked between sends: N in flight may overrun it by N-1 scripts.
        _fail("matching.commits_in_flight", "must be 1 to 32")
    if min(m.tick_ms, m.snapshot_chunk, m.changes_chunk, m.commit_batch_players) < 1:
        _fail("matching", "tick_ms, snapshot_chunk, changes_chunk and commit_batch_players must be >= 1")
    if not 0 < m.tick_budget_ms * 2 <= m.lease_ttl_ms:
        _fail("matching.tick_budget_ms", "must be > 0 and at most half of matching.lease_ttl_ms")
    if m.ready_timeout_ms < 1 or m.finished_match_ttl_ms < 1:
        _fail("matching.ready_timeout_ms", "and matching.finished_match_ttl_ms must be >= 1")
    g = config.gameserver
    if g.allocation_timeout_ms < 1 or not g.request_channel:
        _fail("gameserver", "needs allocation_timeout_ms >= 1 and a request_channel")
    if not 0 <= g.hold_initial_ms <= g.hold_max_ms:
        _fail("gameserver.hold_initial_ms", "must be >= 0 and at most gameserver.hold_max_ms")
    if config.production and g.embedded:
        _fail("gameserver.embedded", "must be false when production = true")
    mt = config.metrics
    if config.production and mt.port and not mt.token and not _loopback(mt.host or config.server.host):
        # /console/state lists player and match ids (a match id is a client's
        # loading_session_id): not for anyone who can reach the host.
        _fail("metrics.token", "must be set when production = true and the metrics port listens "
              "beyond loopback (or set metrics.host = \"127.0.0.1\", or metrics.port = 0)")
    pen = config.penalty
    if pen.threshold < 1 or pen.window_s <= 0 or pen.block_s < 0:
        _fail("penalty", "needs threshold >= 1, window_s > 0 and block_s >= 0")


def _check_modes(modes: dict[str, ModeConfig]) -> None:
    if not modes:
        _fail("modes", "must declare at least one game mode")
    for name, mode in modes.items():
        if not MODE_NAME_RE.match(name):
            _fail(f"modes.{name}", "name must be 1-32 characters of [A-Za-z0-9_-]")
        if mode.team_size < 1 or mode.teams < 1 or mode.match_size < 2:
            _fail(f"modes.{name}", "needs team_size >= 1, teams >= 1 and at least 2 players")
        # Finite numbers, every one (_check_finite).
        if mode.window_base < 0 or mode.window_max < mode.window_base:
            _fail(f"modes.{name}.window_max", "must be >= window_base >= 0")
        if mode.window_growth_per_s < 0 or not 0 < mode.max_wait_s <= 86_400:
            _fail(f"modes.{name}", "needs window_growth_per_s >= 0 and 0 < max_wait_s <= 86400")
        if abs(mode.default_rating) > MAX_RATING:
            _fail(f"modes.{name}.default_rating", f"must be within +-{MAX_RATING:.0e}")


def _parse_env_value(text: str) -> Any:
    """An environment value as written: validation converts it to the key's type ("9000" to a
    port, "true" to a bool), so a secret of digits or a password "true" stays a string. Only
    an array or inline table (``[...]``, ``{...}``) or a quoted string is read as TOML."""
    if not text.lstrip().startswith(("[", "{", '"', "'")):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"invalid override: `{'.'.join(path)}` goes through a non-table")
        node = child
    node[path[-1]] = value
