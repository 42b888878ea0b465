"""Certificates made by the tests (``cryptography``, installed with PyJWT[crypto])."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Cert:
    cert_file: Path
    key_file: Path
    der: bytes  # what a client sees as the peer certificate

    @property
    def pem(self) -> str:
        return self.cert_file.read_text()


def make_cert(directory: Path, name: str) -> Cert:
    """A self-signed certificate for localhost and 127.0.0.1 (its own CA, so HAProxy's
    ``ca-file`` and a client's trust store can both take it as is)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fastmatch test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return Cert(cert_file, key_file, cert.public_bytes(serialization.Encoding.DER))


def client_context(*trusted: Cert) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata="".join(c.pem for c in trusted))
    return context


async def tls_handshake(tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                        send: Callable[[bytes], Awaitable[None]],
                        receive: Callable[[], Awaitable[bytes]]) -> None:
    """A client's TLS handshake over memory buffers: what it writes goes out with ``send``,
    what ``receive`` reads goes in, until the handshake is done."""
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            await send(outgoing.read())
            incoming.write(await receive())
