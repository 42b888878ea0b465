"""Configuration: defaults, environment overrides, and errors that name the bad key."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from server.config import (
    DEV_SECRET,
    AuthConfig,
    GameServerConfig,
    MatchingConfig,
    MetricsConfig,
    ModeConfig,
    PenaltyConfig,
    RedisConfig,
    ServerConfig,
    load_config,
)
from server.errors import ConfigError


def test_default_config_has_1v1_and_5v5() -> None:
    config = load_config(environ={})
    assert config.modes["1v1"].match_size == 2
    assert config.modes["5v5"].match_size == 10
    assert not config.production and config.redis.url == ""


def test_environment_overrides_are_typed() -> None:
    config = load_config(environ={
        "FASTMATCH_SERVER__PORT": "9001", "FASTMATCH_REDIS__URL": "redis://h:1/0",
        "FASTMATCH_MODES__1V1__WINDOW_BASE": "80.5", "OTHER": "x",
    })
    assert config.server.port == 9001
    assert config.redis.url == "redis://h:1/0"
    assert config.modes["1v1"].window_base == 80.5


def test_environment_strings_stay_strings() -> None:
    """A secret of digits, or one spelt like a TOML value, is the string it is written as;
    arrays and quoted strings are still read as TOML."""
    config = load_config(environ={
        "FASTMATCH_AUTH__SECRET": "12345678901234567890123456789012345",
        "FASTMATCH_METRICS__TOKEN": "true", "FASTMATCH_SERVER__PROXY_TRUSTED": '["10.0.0.2/32"]',
        "FASTMATCH_REDIS__SENTINEL_SERVICE": '"quoted"', "FASTMATCH_REDIS__SENTINELS": "a:1",
        "FASTMATCH_SERVER__PROXY_PROTOCOL": "true",
    })
    assert config.auth.secret == "12345678901234567890123456789012345"
    assert config.metrics.token == "true"
    assert list(config.server.proxy_trusted) == ["10.0.0.2/32"] and config.server.proxy_protocol is True
    assert config.redis.sentinel_service == "quoted"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"FASTMATCH_SERVER__PORT": "eighty"}, "$.server.port"),
        ({"FASTMATCH_SERVER__PORT": "70000"}, "server.port"),
        ({"FASTMATCH_SERVER__NOPE": "1"}, "nope"),
        ({"FASTMATCH_MODES__1V1__TEAM_SIZE": "0"}, "modes.1v1"),
        ({"FASTMATCH_AUTH__ALGORITHM": "none"}, "auth.algorithm"),
        ({"FASTMATCH_PRODUCTION": "true"}, "auth.secret"),
        ({"FASTMATCH_MODES__BAD_NAME!__TEAM_SIZE": "1"}, "modes.bad_name!"),
        ({"FASTMATCH_MATCHING__COMMITS_IN_FLIGHT": "0"}, "matching.commits_in_flight"),
        ({"FASTMATCH_MATCHING__COMMITS_IN_FLIGHT": "33"}, "matching.commits_in_flight"),
        ({"FASTMATCH_SERVER__OVERLOAD_RETRY_AFTER_S": "5",
          "FASTMATCH_SERVER__OVERLOAD_RETRY_AFTER_MAX_S": "4"}, "server.overload_retry_after_max_s"),
        # A heartbeat period the TTL does not cover twice would get live workers reaped.
        ({"FASTMATCH_SERVER__HEARTBEAT_INTERVAL_S": "3"}, "server.heartbeat_ttl_s"),
        # Nor one lost heartbeat, which takes the operation timeout to fail: 1 + 2 + 1 >= 4.
        ({"FASTMATCH_SERVER__HEARTBEAT_TTL_S": "4"}, "server.heartbeat_ttl_s"),
        ({"FASTMATCH_SERVER__HEARTBEAT_INTERVAL_S": "1", "FASTMATCH_SERVER__HEARTBEAT_TTL_S": "2",
          "FASTMATCH_REDIS__OPERATION_TIMEOUT_S": "2"}, "server.heartbeat_ttl_s"),
        ({"FASTMATCH_REDIS__OPERATION_TIMEOUT_S": "3"}, "server.heartbeat_ttl_s"),
        ({"FASTMATCH_SERVER__HOUSEKEEPING_INTERVAL_S": "0"}, "server.heartbeat_interval_s"),
        ({"FASTMATCH_SERVER__PING_TIMEOUT_S": "0"}, "server.heartbeat_interval_s"),
        ({"FASTMATCH_REDIS__RECONNECT_BASE_S": "0"}, "redis.reconnect_base_s"),
        ({"FASTMATCH_SERVER__WORKER_STALL_KILL_S": "2"}, "server.worker_stall_kill_s"),
        # TOML has nan and inf: every comparison is false for nan, and the kernels would differ.
        ({"FASTMATCH_MODES__1V1__WINDOW_BASE": "nan"}, "modes.1v1"),
        ({"FASTMATCH_MODES__1V1__WINDOW_MAX": "inf"}, "modes.1v1"),
        ({"FASTMATCH_MODES__1V1__MAX_WAIT_S": "inf"}, "modes.1v1"),
        ({"FASTMATCH_MODES__1V1__DEFAULT_RATING": "1e300"}, "modes.1v1.default_rating"),
        ({"FASTMATCH_SERVER__AUDIT_INTERVAL_S": "-1"}, "server.audit_interval_s"),
        ({"FASTMATCH_SERVER__CONNECT_IPV6_PREFIX": "16"}, "server.connect_ipv6_prefix"),
        ({"FASTMATCH_SERVER__CONNECT_IPV6_PREFIX": "129"}, "server.connect_ipv6_prefix"),
        ({"FASTMATCH_METRICS__PORT": "70000"}, "metrics.port"),
        ({"FASTMATCH_METRICS__PORT": "-1"}, "metrics.port"),
        ({"FASTMATCH_METRICS__PORT": "99999999999999999999999"}, "metrics.port"),  # no OverflowError
        ({"FASTMATCH_METRICS__PORT": "8080"}, "metrics.port"),  # server.port's default
        ({"FASTMATCH_SERVER__PORT": "9200", "FASTMATCH_METRICS__PORT": "9200"}, "metrics.port"),
        ({"FASTMATCH_SERVER__PORT": "9200", "FASTMATCH_METRICS__PORT": "9200",
          "FASTMATCH_METRICS__HOST": "127.0.0.1"}, "metrics.port"),  # the server on every address
        ({"FASTMATCH_PRODUCTION": "true", "FASTMATCH_AUTH__SECRET": "s" * 40}, "redis.url"),
    ],
)
def test_bad_values_name_the_key(environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("$", r"\$").replace(".", r"\.")):
        load_config(environ=environ)


FLOAT_KEYS = [
    (section, field.name) for section, struct in [
        ("server", ServerConfig), ("auth", AuthConfig), ("redis", RedisConfig),
        ("metrics", MetricsConfig), ("matching", MatchingConfig), ("gameserver", GameServerConfig),
        ("penalty", PenaltyConfig), ("modes.1v1", ModeConfig)]
    for field in msgspec.structs.fields(struct) if field.type is float]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("section", "name"), FLOAT_KEYS, ids=[f"{s}.{n}" for s, n in FLOAT_KEYS])
def test_every_float_key_must_be_finite(section: str, name: str, value: str) -> None:
    """TOML has nan and inf: every comparison is false for nan, so no range check catches
    it, and an infinite interval or timeout never ends. Each key is named."""
    assert {"server", "redis", "metrics", "penalty"} < {s for s, _ in FLOAT_KEYS}  # not only modes
    env = {f"FASTMATCH_{section.replace('.', '__').upper()}__{name.upper()}": value}
    with pytest.raises(ConfigError, match=rf"`{re.escape(section)}\.{name}` must be a finite number"):
        load_config(environ=env)


def test_the_default_ports_and_heartbeat_pass() -> None:
    """The shipped defaults satisfy the rules above: a TTL above 2 x interval + timeout, and
    two ports of their own (0 turns the metrics port off)."""
    config = load_config(environ={})
    s, r = config.server, config.redis
    assert s.heartbeat_ttl_s > 2 * s.heartbeat_interval_s + r.operation_timeout_s
    assert config.metrics.port not in (0, s.port)
    assert load_config(environ={"FASTMATCH_METRICS__PORT": "0", "FASTMATCH_SERVER__PORT": "0"})
    # One port on two distinct addresses binds twice: allowed.
    assert load_config(environ={"FASTMATCH_SERVER__HOST": "10.0.0.5", "FASTMATCH_SERVER__PORT": "9300",
                                "FASTMATCH_METRICS__HOST": "127.0.0.1", "FASTMATCH_METRICS__PORT": "9300"})


def test_production_with_a_real_secret_starts(tmp_path: Path) -> None:
    file = tmp_path / "prod.toml"
    file.write_text('production = true\n[auth]\nsecret = "' + "s" * 40 + '"\n'
                    '[redis]\nurl = "redis://redis.internal:6379/0"\n'
                    '[metrics]\ntoken = "' + "t" * 32 + '"\n'
                    '[modes.duel]\nteam_size = 1\n')
    config = load_config(file, environ={})
    assert config.production and config.auth.secret != DEV_SECRET
    assert config.modes["duel"].teams == 2


def test_production_keeps_the_console_to_itself_without_a_token() -> None:
    """/console/state lists player and match ids: in production the metrics port needs a token
    unless it listens on loopback only or is closed."""
    prod = {"FASTMATCH_PRODUCTION": "true", "FASTMATCH_AUTH__SECRET": "s" * 40,
            "FASTMATCH_REDIS__URL": "redis://redis.internal:6379/0",
            "FASTMATCH_GAMESERVER__EMBEDDED": "false"}
    with pytest.raises(ConfigError, match=r"metrics\.token"):
        load_config(environ=prod)
    with pytest.raises(ConfigError, match=r"metrics\.token"):
        load_config(environ={**prod, "FASTMATCH_METRICS__HOST": "10.0.0.5"})
    assert load_config(environ={**prod, "FASTMATCH_METRICS__TOKEN": "t" * 32}).metrics.token
    assert load_config(environ={**prod, "FASTMATCH_METRICS__HOST": "127.0.0.1"}).metrics.host == "127.0.0.1"
    assert load_config(environ={**prod, "FASTMATCH_METRICS__HOST": "::1"}).production
    assert load_config(environ={**prod, "FASTMATCH_METRICS__PORT": "0"}).metrics.port == 0
    assert load_config(environ={"FASTMATCH_METRICS__HOST": "10.0.0.5"}).metrics.host == "10.0.0.5"  # dev


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})
