"""How long a connection's last bytes have waited since they reached this host's kernel.

A handshake that waits is invisible to the worker's own clocks while it sits in the listening
socket's accept queue, or in the socket before the event loop reads it: on a busy worker
those are most of the wait. Linux's ``TCP_INFO`` says, per socket, how long ago data last
arrived (``tcpi_last_data_recv``, in milliseconds). Read when a complete request is parsed,
for a client that then waits for its answer (every WebSocket client does), it says how long
the request has waited so far; the connection measures on from there by the event loop's
clock to the answer: the whole wait, what the client feels less the network, for one
``getsockopt`` per handshake. With TLS it is read when the ClientHello arrives instead (the
request only comes after the server's answer to it). The kernel counts in ticks (1-10 ms, by
its HZ): shorter waits are not resolved.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Final

# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked, sacked, lost, retrans, fackets, last_data_sent, last_ack_sent, last_data_recv.
_LAST_DATA_RECV_OFFSET: Final = 52
_INFO_SIZE: Final = 104  # the part every kernel since 2.6 fills; longer structs are cut
_TCP_INFO: Final[int | None] = getattr(socket, "TCP_INFO", None)
_U32: Final = struct.Struct("=I")


def since_last_data_s(transport: asyncio.BaseTransport) -> float | None:
    """Seconds since the socket last received data, or None where the kernel does not say
    (not Linux, not TCP, e.g. a Unix socket in tests, or the socket already closed)."""
    if _TCP_INFO is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_SIZE)
    except OSError:
        return None
    if len(info) < _LAST_DATA_RECV_OFFSET + 4:
        return None
    return float(_U32.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0]) / 1000.0
