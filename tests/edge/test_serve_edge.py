"""`fastmatch serve` at the edge, as real processes: TLS files checked at start and re-read by the
rolling restart, and SIGTERM leaving the balancer's rotation before the drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.errors import ConfigError
from server.store import keys
from server.transport.tls import load_context
from tests.app.served import FASTMATCH, Served, http_get, wait_workers
from tests.edge.certs import Cert, client_context, make_cert
from tests.helpers import TIMEOUT, connect_player, recv, request, token

ServeFactory = Callable[..., Served]


@pytest.fixture
async def serve(redis_url: str) -> AsyncIterator[ServeFactory]:
    started: list[Served] = []

    def start(workers: int = 1, **env: str) -> Served:
        served = Served(redis_url, workers, **env).start()
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc is not None and served.proc.poll() is None:
            served.signal(signal.SIGINT)  # drain at once: no test waits for a drain delay here
        await asyncio.to_thread(served.stop)


def tls_env(cert: Cert) -> dict[str, str]:
    return {"FASTMATCH_SERVER__TLS_CERT_FILE": str(cert.cert_file),
            "FASTMATCH_SERVER__TLS_KEY_FILE": str(cert.key_file)}


async def wss(port: int, player: str, *trusted: Cert) -> ClientConnection:
    return await connect(f"wss://localhost:{port}/ws", ssl=client_context(*trusted),
                         additional_headers={"Authorization": f"Bearer {token(player)}"},
                         open_timeout=TIMEOUT)


def served_cert(ws: ClientConnection) -> bytes:
    der: bytes = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return der


# -- TLS files ------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _encrypted_key(cert: Cert, directory: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(cert.key_file.read_bytes(), None)
    path = directory / "encrypted.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return path


BAD_FILES = {
    "cert-missing": ("cert", lambda c, d: d / "nope.crt", "server.tls_cert_file", "cannot be read"),
    "cert-is-a-directory": ("cert", lambda c, d: d, "server.tls_cert_file", "cannot be read"),
    "cert-not-pem": ("cert", lambda c, d: _write(d / "x.crt", "hello"), "server.tls_cert_file",
                     "no PEM certificate"),
    "cert-is-the-key": ("cert", lambda c, d: c.key_file, "server.tls_cert_file", "no PEM certificate"),
    "key-missing": ("key", lambda c, d: d / "nope.key", "server.tls_key_file", "cannot be read"),
    "key-is-the-cert": ("key", lambda c, d: c.cert_file, "server.tls_key_file", "no usable PEM private key"),
    "key-of-another-cert": ("key", lambda c, d: make_cert(d, "other").key_file, "server.tls_key_file",
                            "does not hold the private key"),
    "key-encrypted": ("key", _encrypted_key, "server.tls_key_file", "is encrypted"),
    "key-not-in-cert-file": ("key", lambda c, d: "", "server.tls_key_file", "no usable PEM private key"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_tls_file_is_refused_naming_its_key(tmp_path: Path, case: str) -> None:
    cert = make_cert(tmp_path, "server")
    which, bad, key, why = BAD_FILES[case]
    files = {"cert": str(cert.cert_file), "key": str(cert.key_file)}
    files[which] = str(bad(cert, tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_context(files["cert"], files["key"])
    assert f"`{key}`" in str(caught.value) and why in str(caught.value), caught.value


def test_the_key_may_follow_the_certificate_in_one_file(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "server")
    both = _write(tmp_path / "both.pem", cert.pem + cert.key_file.read_text())
    assert load_context(str(both)).get_ca_certs() == []  # loaded (and no client CA set)


async def test_serve_stops_before_any_worker_on_a_bad_tls_file(
    tmp_path: Path, redis_url: str, admin: aioredis.Redis,
) -> None:
    cert = make_cert(tmp_path, "server")
    env = {**Served(redis_url).env, **tls_env(cert),
           "FASTMATCH_SERVER__TLS_KEY_FILE": str(make_cert(tmp_path, "other").key_file)}
    out = await asyncio.to_thread(subprocess.run, [FASTMATCH, "serve", "--workers", "1"], env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT * 4)
    assert out.returncode == 2, out.stderr
    assert "`server.tls_key_file` does not hold the private key" in out.stderr
    assert await admin.zcard(keys.workers()) == 0  # no worker ever registered


async def test_sighup_serves_a_renewed_certificate_and_refuses_a_broken_one(
    tmp_path: Path, serve: ServeFactory, admin: aioredis.Redis,
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    old, new = make_cert(tmp_path, "old"), make_cert(tmp_path, "new")
    installed = Cert(live / "server.crt", live / "server.key", old.der)
    for source, target in ((old.cert_file, installed.cert_file), (old.key_file, installed.key_file)):
        shutil.copy(source, target)
    # A long drain delay: the rolling restart must not wait for it (the host stays in rotation).
    served = serve(workers=1, **tls_env(installed), FASTMATCH_SERVER__DRAIN_DELAY_S="20",
                   FASTMATCH_SERVER__DRAIN_TIMEOUT_S="25")
    first = await wait_workers(admin, 1)
    before = await wss(served.port, "c1", old, new)
    assert served_cert(before) == old.der and (await recv(before))["type"] == "welcome"

    # A renewal gone wrong (the new certificate with the old key): refused, old workers kept.
    shutil.copy(new.cert_file, installed.cert_file)
    served.signal(signal.SIGHUP)
    async with asyncio.timeout(TIMEOUT):
        while "rolling restart refused" not in served.output():
            await asyncio.sleep(0.05)  # a log line, read from a file: nothing to wait on
    assert "`server.tls_key_file` does not hold the private key" in served.output()
    assert await wait_workers(admin, 1) == first

    # The renewal done right: served by the replacement, with no drain delay on the way.
    shutil.copy(new.key_file, installed.key_file)
    started = time.monotonic()
    served.signal(signal.SIGHUP)
    await wait_workers(admin, 1, exclude=set(first.values()))
    after = await wss(served.port, "c2", old, new)
    assert served_cert(after) == new.der and (await recv(after))["type"] == "welcome"
    with contextlib.suppress(ConnectionClosed):
        await recv(before)  # the old worker closed it (1001)
    assert before.close_code == 1001
    assert time.monotonic() - started < 20
    await after.close()


async def test_a_restart_that_fails_is_tried_again_and_the_service_stays_up(
    tmp_path: Path, serve: ServeFactory, admin: aioredis.Redis,
) -> None:
    """Issue 13: after a worker dies, its replacement cannot start (its certificate file was
    broken meanwhile; each worker reads it at start): the supervisor keeps serving with the
    other worker and tries again with backoff instead of stopping; once the file is good
    again, a later try succeeds."""
    cert = make_cert(tmp_path, "server")
    good = cert.cert_file.read_bytes()
    trusted = Cert(tmp_path / "trusted.crt", cert.key_file, cert.der)  # what clients trust
    trusted.cert_file.write_bytes(good)
    served = serve(workers=2, **tls_env(cert))
    pids = await wait_workers(admin, 2)
    victim = next(iter(pids.values()))
    cert.cert_file.write_text("not a certificate\n")
    tries_before = served.output().count("next try in")
    os.kill(victim, signal.SIGKILL)
    # A log line in a file: nothing else to wait on. Two worker start-ups (each imports the
    # whole server before it reads the certificate: seconds on a loaded 2-core machine) and
    # the backoff between them.
    async with asyncio.timeout(TIMEOUT * 12):
        while served.output().count("failed to start again") < 2:
            await asyncio.sleep(0.05)
    assert served.output().count("next try in") > tries_before
    assert served.proc is not None and served.proc.poll() is None  # still up ...
    during = await wss(served.port, "during", trusted)  # ... and serving, with the other worker
    assert (await recv(during))["type"] == "welcome"
    await during.close()
    cert.cert_file.write_bytes(good)
    await wait_workers(admin, 2, exclude={victim}, timeout=TIMEOUT * 8)  # a later try succeeds ...
    async with asyncio.timeout(TIMEOUT):  # ... and the supervisor saw it (its next loop turn)
        while "restarted" not in served.output():
            await asyncio.sleep(0.05)


# -- SIGTERM: out of rotation first, then the drain -----------------------------------------------

async def test_sigterm_turns_ready_503_and_keeps_serving_for_the_drain_delay(
    serve: ServeFactory, admin: aioredis.Redis,
) -> None:
    delay = 2.5
    served = serve(workers=1, FASTMATCH_SERVER__DRAIN_DELAY_S=str(delay),
                   FASTMATCH_SERVER__DRAIN_TIMEOUT_S="6")
    await wait_workers(admin, 1)
    ws, _ = await connect_player(served.port, "stay")
    assert (await request(ws, {"type": "enqueue", "game_mode": "1v1"}))["type"] == "enqueued"
    assert (await http_get(served.port, "/ready"))[0] == 200
    signalled = time.monotonic()
    served.signal(signal.SIGTERM)
    async with asyncio.timeout(TIMEOUT):
        while (await http_get(served.port, "/ready"))[0] != 503:
            await asyncio.sleep(0.02)  # the worker handles the signal on its own time
    # Out of rotation, still serving: connected players and new ones.
    assert (await request(ws, {"type": "status"}))["state"] == "queued"
    late, welcome = await connect_player(served.port, "late")
    assert welcome["type"] == "welcome"
    assert time.monotonic() - signalled < delay, "the checks above ran inside the delay"
    for client in (ws, late):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await recv(client, TIMEOUT)
        assert client.close_code == 1001
    assert time.monotonic() - signalled >= delay
    assert await asyncio.to_thread(served.wait, TIMEOUT) == 0
