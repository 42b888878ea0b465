"""Token buckets for PROTOCOL 5 floods, sans I/O: the caller passes the clock."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict


def address_key(peer: str, ipv6_prefix: int) -> str:
    """What the per-address limits count by: an IPv4 address itself (also when it comes as an
    IPv4-mapped IPv6 address from a dual-stack socket), an IPv6 address by its network of
    ``ipv6_prefix`` bits (a host holds a whole /64 and may pick a new address from it for every
    connection). Anything else (no address known) as given."""
    if ":" not in peer:
        return peer  # IPv4, the common case: no parsing
    try:
        address = ipaddress.IPv6Address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if ipv6_prefix >= 128:
        return str(address)
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after_ms(self) -> int:
        return max(int((1.0 - self.tokens) / self.rate * 1000), 1) if self.rate > 0 else 1000


class KeyedBuckets:
    """One bucket per key (e.g. client IP), the least recently used forgotten past ``max_keys``."""

    def __init__(self, rate_per_s: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> TokenBucket | None:
        """None when allowed; else the bucket that refused (for its retry_after_ms)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return None if bucket.take(now) else bucket
