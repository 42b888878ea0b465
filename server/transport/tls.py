"""TLS for the public port (``wss://``): the context, read from the configured files, and the
per-connection TLS layer.

The layer runs inside each connection's protocol, over memory buffers (``ssl.SSLObject``, the
same object asyncio's and uvloop's SSL transports drive), rather than as ``create_server(ssl=)``:
behind a balancer that speaks the PROXY protocol, the PROXY header arrives in clear *before* the
TLS handshake, often in the same TCP segment as the ClientHello, and an SSL transport would take
it for TLS. Inside the protocol the order is explicit: PROXY header, then TLS, then WebSocket.

The files are read when a worker starts, so the supervisor's rolling restart (SIGHUP) serves a
renewed certificate without downtime; the supervisor reads them first to refuse a bad file.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final, NoReturn

from server.errors import ConfigError

CERT_KEY: Final = "server.tls_cert_file"
KEY_KEY: Final = "server.tls_key_file"
_READ_SIZE: Final = 64 * 1024


def load_context(cert_file: str, key_file: str = "") -> ssl.SSLContext:
    """A server context for the certificate (then its chain) in ``cert_file`` and the private
    key in ``key_file`` (empty: the key is in ``cert_file`` too). Raises ``ConfigError`` naming
    the key of the file at fault."""
    for key, path in ((CERT_KEY, cert_file), (KEY_KEY, key_file)):
        if path:
            try:
                Path(path).read_bytes()
            except OSError as exc:
                _fail(key, f"cannot be read: {exc}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # WebSocket upgrades are HTTP/1.1 (RFC 6455)
    try:
        context.load_cert_chain(cert_file, key_file or None, password=_encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            _fail(KEY_KEY, f"does not hold the private key of the certificate in {CERT_KEY}")
        if not _holds_certificate(cert_file):
            _fail(CERT_KEY, f"holds no PEM certificate ({exc.reason or exc})")
        where = key_file or f"{cert_file} (empty {KEY_KEY}: the key is read from {CERT_KEY})"
        _fail(KEY_KEY, f"holds no usable PEM private key: {where} ({exc.reason or exc})")
    return context


def _encrypted() -> NoReturn:
    # Asked only for an encrypted key; a worker cannot prompt for a passphrase.
    _fail(KEY_KEY, "is encrypted; give fastmatch an unencrypted key (readable by it alone)")


def _holds_certificate(path: str) -> bool:
    try:
        # PEM is ASCII; anything else in the file (comments) is not part of a certificate.
        text = Path(path).read_bytes().decode("ascii", errors="ignore")
        ssl.create_default_context().load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError, OSError):
        return False
    return True


def _fail(key: str, why: str) -> NoReturn:
    raise ConfigError(f"invalid configuration: `{key}` {why}")


class TlsStream:
    """Server-side TLS over memory buffers: ciphertext in, plaintext out, and back.
    No I/O of its own: the connection feeds ``receive`` and writes what ``send`` returns."""

    __slots__ = ("_incoming", "_object", "_outgoing", "established", "peer_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False  # the handshake is done: application data may flow
        # The peer sent close_notify: the end of its stream. Nothing after it is read (OpenSSL
        # would leave it in the buffer for good), so the caller ends the connection.
        self.peer_closed = False

    def receive(self, data: bytes) -> bytes:
        """Ciphertext from the peer; returns the plaintext it completes (``b""`` while the
        handshake runs: call ``send`` to get its answer; and once ``peer_closed``).
        Raises ``ssl.SSLError``."""
        if self.peer_closed:
            return b""
        self._incoming.write(data)
        tls = self._object
        if not self.established:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
        chunks = []
        while True:
            try:
                chunk = tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the peer's TCP close should follow
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True  # read returns b"" only at the end of the stream
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, writes: list[bytes]) -> list[bytes]:
        """Encrypt websockets' ``data_to_send()``; returns the same shape (one ciphertext write,
        then ``b""`` if it ended with the end-of-stream marker), with any handshake records."""
        tls = self._object
        eof = bool(writes) and not writes[-1]
        # Before the handshake nothing of the application's may leave: only the end of the
        # stream is honoured (a connection closed while it was still negotiating).
        if self.established:
            try:
                for data in writes:
                    view = memoryview(data)
                    while view:
                        view = view[tls.write(view):]
                if eof:
                    tls.unwrap()  # queues close_notify; not waiting for the peer's
            except ssl.SSLWantReadError:
                pass  # unwrap's: the peer's close_notify is not awaited
            except ssl.SSLError:
                eof = True  # the session is broken: end the stream
        out = self._outgoing.read()
        if eof:
            return [out, b""] if out else [b""]
        return [out] if out else []
