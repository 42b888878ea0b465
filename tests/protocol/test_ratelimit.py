"""What the per-address connection limit counts by (server/protocol/ratelimit.py)."""

from __future__ import annotations

import pytest

from server.protocol.ratelimit import address_key


@pytest.mark.parametrize(("peer", "prefix", "key"), [
    ("203.0.113.7", 64, "203.0.113.7"),
    ("::ffff:203.0.113.7", 64, "203.0.113.7"),  # a dual-stack socket's IPv4 client: itself
    ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::2", 64, "2001:db8:1:2::/64"),  # the same host's /64: the same key
    ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
    ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
    ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1"),
    ("fe80::1%eth0", 64, "fe80::/64"),
    ("?", 64, "?"),  # no address known
])
def test_an_address_is_counted_by_its_host(peer: str, prefix: int, key: str) -> None:
    assert address_key(peer, prefix) == key
