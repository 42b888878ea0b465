"""The PROXY protocol, versions 1 and 2, as sent by L4 balancers (HAProxy ``send-proxy-v2``).

A TCP balancer hides the client's address: every connection comes from the balancer. With the
PROXY protocol it writes the client's address as the first bytes of each connection, before
anything of the client's (before TLS, too). ``parse`` reads that header from the bytes received
so far (sans-I/O: it may be called again as more arrive); ``ProxyPolicy`` says which peers may
send one and records the connections it closes.

Spec: haproxy.org/download/2.6/doc/proxy-protocol.txt (sections cited below as PP 2.1 etc.).
Written here rather than taken from PyPI's ``proxy-protocol``: that library reads headers from
asyncio streams (``readexactly``/``readline``), has no bound on a v1 line, and lets
``ValueError``/``struct.error`` escape from some malformed input; a Protocol-based server needs
an incremental parser over its own buffer whose only error is the one it documents.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from server import metrics
from server.logthrottle import Throttled

log = logging.getLogger(__name__)

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # PP 2.1: the longest v1 line, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX: Final = 4096  # addresses plus TLVs; balancers send well under 300 bytes
_V2_FIXED: Final = struct.Struct("!BBH")  # version/command, family/transport, length
_V2_INET: Final = struct.Struct("!4s4sHH")
_V2_INET6: Final = struct.Struct("!16s16sHH")


class ProxyHeaderError(ValueError):
    """The connection does not start with a valid PROXY header. ``reason`` is ``missing`` (it
    starts with something else) or ``malformed``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    size: int  # bytes the header took; the client's own bytes start there
    client: str | None  # the client's address; None: keep the connection's own (LOCAL, UNKNOWN)
    version: int


def parse(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of ``data``, or None while it is incomplete (and within bounds).
    Raises only ``ProxyHeaderError``."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    raise ProxyHeaderError("missing", "does not start with a PROXY header")


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    if data[:6] != V1_PREFIX[: len(data)]:
        raise ProxyHeaderError("missing", "does not start with a PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("malformed", f"v1 line longer than {V1_MAX} bytes")
        return None
    try:
        fields = bytes(data[6:end]).decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("malformed", "v1 line is not ASCII") from None
    size = end + 2
    if fields[0] == "UNKNOWN":  # PP 2.1: the rest of the line is to be ignored
        return ProxyHeader(size, None, 1)
    if len(fields) != 5 or fields[0] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed", "v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
    family = ipaddress.IPv4Address if fields[0] == "TCP4" else ipaddress.IPv6Address
    try:
        source = family(fields[1])
        family(fields[2])
    except ValueError:
        raise ProxyHeaderError("malformed", f"v1 addresses are not {fields[0]}") from None
    for port in fields[3:]:
        # PP 2.1: decimal 0-65535 without leading zeroes.
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535
                and (port == "0" or port[0] != "0")):
            raise ProxyHeaderError("malformed", "v1 port is not a number 0-65535")
    return ProxyHeader(size, client_address(source), 1)


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if data[:12] != V2_SIGNATURE[: len(data)]:
        raise ProxyHeaderError("missing", "does not start with a PROXY header")
    if len(data) < 16:
        return None
    version_command, family, length = _V2_FIXED.unpack_from(data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError("malformed", f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyHeaderError("malformed", f"v2 header with command {command}")
    size = 16 + length
    if size > V2_MAX:
        raise ProxyHeaderError("malformed", f"v2 header of {size} bytes (at most {V2_MAX})")
    if len(data) < size:
        return None
    if command == 0:  # PP 2.2 LOCAL: the balancer's own connection (health checks)
        return ProxyHeader(size, None, 2)
    if family >> 4 > 3 or family & 0x0F > 2:
        # PP 2.2: other values "must be rejected as invalid by receivers".
        raise ProxyHeaderError("malformed", f"v2 header with address family byte {family:#04x}")
    if family & 0x0F == 0x02:
        raise ProxyHeaderError("malformed", "v2 header announces a datagram over a TCP connection")
    layout = {0x10: _V2_INET, 0x20: _V2_INET6}.get(family & 0xF0)
    if layout is None:  # UNSPEC or UNIX: PP 2.2 says keep the connection's own addresses
        return ProxyHeader(size, None, 2)
    if length < layout.size:
        raise ProxyHeaderError("malformed", f"v2 address block of {length} bytes")
    source = ipaddress.ip_address(layout.unpack_from(data, 16)[0])  # TLVs after it: not needed
    return ProxyHeader(size, client_address(source), 2)


def client_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as per-address limits key it."""
    return str(_unmapped(ip))


def _unmapped(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 client seen through an IPv6 socket (``::ffff:a.b.c.d``) is ``a.b.c.d``."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ProxyPolicy:
    """Who may send a PROXY header, how long it may take, and what happens to the connections
    that fail: counted exactly (``fastmatch_proxy_rejected_total{reason}``) and logged at most
    once per address per ``log_interval_s`` (a client can repeat this at will)."""

    def __init__(
        self, trusted: Iterable[str], timeout_s: float, *, log_interval_s: float = 60.0,
        max_logged_addresses: int = 1000, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trusted = tuple(ipaddress.ip_network(cidr) for cidr in trusted)
        self.timeout_s = timeout_s
        self.log_interval_s = log_interval_s
        self.max_logged_addresses = max_logged_addresses
        self.clock = clock
        self._logged: dict[str, float] = {}  # address -> when its last line was written
        # Beyond max_logged_addresses distinct addresses in an interval: one summary line.
        self._many = Throttled(log, "PROXY protocol: connections closed", interval_s=log_interval_s)

    def trusts(self, peer: str) -> bool:
        try:
            address = _unmapped(ipaddress.ip_address(peer))
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def rejected(self, peer: str, reason: str, detail: str) -> None:
        metrics.inc(metrics.PROXY_REJECTED, reason)
        now = self.clock()
        last = self._logged.get(peer)
        if last is not None and now - last < self.log_interval_s:
            return  # this address was logged within the interval; the metric has the count
        if last is None and len(self._logged) >= self.max_logged_addresses:
            horizon = now - self.log_interval_s
            self._logged = {a: t for a, t in self._logged.items() if t > horizon}
            if len(self._logged) >= self.max_logged_addresses:
                self._many("from %s (%s): %s", peer, reason, detail)
                return
        self._logged[peer] = now
        log.warning("PROXY protocol: closed a connection from %s (%s): %s", peer, reason, detail)
