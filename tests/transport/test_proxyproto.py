"""The PROXY protocol parser and policy, synchronously (server/transport/proxyproto.py)."""

from __future__ import annotations

import ipaddress
import logging
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from server import metrics
from server.transport.proxyproto import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyPolicy,
    parse,
)


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"",
       version: int = 2) -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | command, family, len(body)) + body


def inet(src: str, dst: str, sport: int = 51000, dport: int = 8080) -> bytes:
    return (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + struct.pack("!HH", sport, dport))


TLV_UNIQUE_ID = b"\x05\x00\x04abcd"  # PP2_TYPE_UNIQUE_ID, as HAProxy may add

VALID = {
    "v1-tcp4": (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8080\r\n", "203.0.113.7", 1),
    "v1-tcp6": (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 8080\r\n", "2001:db8::7", 1),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", None, 1),
    "v1-unknown-with-addresses": (b"PROXY UNKNOWN ffff:: 1.2.3.4 1 2\r\n", None, 1),
    "v1-longest": (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                   b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
                   "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1),
    "v2-tcp4": (v2(addresses=inet("203.0.113.7", "10.0.0.1")), "203.0.113.7", 2),
    "v2-tcp4-tlvs": (v2(addresses=inet("203.0.113.7", "10.0.0.1"), tlvs=TLV_UNIQUE_ID),
                     "203.0.113.7", 2),
    "v2-tcp6": (v2(family=0x21, addresses=inet("2001:db8::7", "2001:db8::1")), "2001:db8::7", 2),
    "v2-tcp6-mapped-v4": (v2(family=0x21, addresses=inet("::ffff:198.51.100.9", "::1")),
                          "198.51.100.9", 2),
    "v2-local": (v2(command=0, family=0x00), None, 2),
    "v2-local-with-addresses": (v2(command=0, addresses=inet("127.0.0.1", "127.0.0.1")), None, 2),
    "v2-unspec": (v2(family=0x00), None, 2),
    "v2-unix": (v2(family=0x31, addresses=b"\x00" * 216), None, 2),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_headers_name_the_client_and_leave_what_follows(name: str) -> None:
    header, client, version = VALID[name]
    assert len(header) <= (V1_MAX if version == 1 else V2_MAX)
    data = header + b"\x16\x03\x01 the client's own bytes"
    assert parse(data) == ProxyHeader(len(header), client, version)


@pytest.mark.parametrize("name", list(VALID))
def test_every_prefix_of_a_header_asks_for_more(name: str) -> None:
    """Split across TCP segments anywhere: nothing is decided before the header is whole."""
    header = VALID[name][0]
    for end in range(1, len(header)):
        assert parse(header[:end]) is None, end
    assert parse(bytearray(header)) is not None


MALFORMED = {
    "v1-family": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-fields": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1-extra-field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1-double-space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-address": b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
    "v1-leading-zero-address": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "v1-v6-as-tcp4": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1-v4-as-tcp6": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-port-range": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1-port-leading-zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
    "v1-port-sign": b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n",
    "v1-port-unicode-digit": "PROXY TCP4 1.2.3.4 5.6.7.8 ٨ 2\r\n".encode(),
    "v1-empty": b"PROXY \r\n",
    "v1-too-long": b"PROXY UNKNOWN " + b"x" * V1_MAX + b"\r\n",
    "v1-no-crlf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + b"GET / HTTP/1.1\r\n" * 8,
    "v2-version": v2(version=1, addresses=inet("1.2.3.4", "5.6.7.8")),
    "v2-command": v2(command=2, addresses=inet("1.2.3.4", "5.6.7.8")),
    "v2-datagram": v2(family=0x12, addresses=inet("1.2.3.4", "5.6.7.8")),
    "v2-unknown-family": v2(family=0x41, addresses=inet("1.2.3.4", "5.6.7.8")),
    "v2-unknown-transport": v2(family=0x13, addresses=inet("1.2.3.4", "5.6.7.8")),
    "v2-short-inet": v2(addresses=b"\x01\x02\x03\x04"),
    "v2-short-inet6": v2(family=0x21, addresses=inet("1.2.3.4", "5.6.7.8")),
    "v2-too-long": V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_headers_are_refused(name: str) -> None:
    with pytest.raises(ProxyHeaderError) as caught:
        parse(MALFORMED[name])
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize("data", [
    b"GET /ws HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"PROXX", b"proxy TCP4", b"\r\n\r\n\x00\r\nQUIX",
    b"\r\n\r\n\x00\r\nQUIT\r",
], ids=["http", "tls", "PROXX", "lowercase", "v2-signature", "v2-signature-end"])
def test_anything_else_first_is_a_missing_header(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError) as caught:
        parse(data)
    assert caught.value.reason == "missing"


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_wait_or_raise_the_documented_error(data: bytes) -> None:
    for candidate in (data, b"PROXY " + data, V2_SIGNATURE + data):
        try:
            header = parse(candidate)
        except ProxyHeaderError as exc:
            assert exc.reason in ("missing", "malformed")
        else:
            assert header is None or 0 < header.size <= len(candidate)


# -- policy: who may send one, and what a refusal costs -------------------------------------------

def test_trusted_peers_by_cidr_including_ipv4_seen_through_ipv6() -> None:
    policy = ProxyPolicy(["10.0.0.0/24", "2001:db8::/64", "127.0.0.1"], timeout_s=1.0)
    assert policy.trusts("10.0.0.9") and policy.trusts("::ffff:10.0.0.9")
    assert policy.trusts("2001:db8::5") and policy.trusts("127.0.0.1")
    assert not policy.trusts("10.0.1.9") and not policy.trusts("127.0.0.2")
    assert not policy.trusts("?") and not policy.trusts("")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rejected_total(reason: str) -> float:
    metrics.flush()  # counted in memory until the next flush
    return REGISTRY.get_sample_value("fastmatch_proxy_rejected_total", {"reason": reason}) or 0.0


def test_refusals_are_all_counted_and_logged_once_per_address_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    policy = ProxyPolicy(["10.0.0.0/8"], 1.0, log_interval_s=60.0, clock=clock)
    before = rejected_total("malformed")
    with caplog.at_level(logging.WARNING, logger="server.transport.proxyproto"):
        for _ in range(5):
            policy.rejected("192.0.2.1", "malformed", "bad")
            policy.rejected("192.0.2.2", "malformed", "bad")
        clock.now += 61
        policy.rejected("192.0.2.1", "malformed", "bad again")
    assert rejected_total("malformed") - before == 11
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "192.0.2.1" in lines[0] and "192.0.2.2" in lines[1] and "bad again" in lines[2]


def test_many_addresses_fold_into_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    """An attacker with many addresses (IPv6) cannot flood the log either."""
    clock = Clock()
    policy = ProxyPolicy(["10.0.0.0/8"], 1.0, log_interval_s=60.0, max_logged_addresses=3,
                         clock=clock)
    with caplog.at_level(logging.WARNING, logger="server.transport.proxyproto"):
        for i in range(50):
            policy.rejected(f"2001:db8::{i:x}", "untrusted", "not trusted")
    assert len(caplog.records) == 3 + 1  # three addresses, then one line of the summary kind
    assert "connections closed" in caplog.records[-1].getMessage()
