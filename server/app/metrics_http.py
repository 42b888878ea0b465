"""The supervisor's metrics port: ``/metrics`` (one aggregate of every worker, multiprocess mode),
the live console page ``/console`` and its data ``/console/state``.

With ``metrics.token`` set every path needs ``Authorization: Bearer <token>`` except the
console page itself: it holds no data (a browser cannot set a header when it opens or reloads a
page); it takes the token from its address (``#token=``, or ``?token=``) once, keeps it for the
tab, and sends the header on its data requests (server/app/console_page.py).

Every connection holds a supervisor thread and a descriptor, and the supervisor needs its
descriptors to restart crashed workers: connections are capped (``MAX_CONNECTIONS``; over it,
closed as soon as accepted) and each request must arrive whole within ``REQUEST_DEADLINE_S``.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from server.app.console import Console, Observed
from server.app.console_page import CSP, PAGE
from server.app.metricfiles import LockedCollector
from server.app.procstats import ProcessCollector
from server.errors import ConfigError
from server.logthrottle import Throttled

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# Prometheus and a few open consoles need a handful at once (the page opens one connection a
# second, each closed after its answer); 64 threads and descriptors leave the supervisor plenty.
MAX_CONNECTIONS: Final = 64
# From the connection's first read to its last header: a socket timeout bounds each recv alone, so a client
# sending a byte every few seconds would otherwise hold its thread for ever. Each write of the
# answer gets as long again (sendall's timeout bounds the whole call).
REQUEST_DEADLINE_S: Final = 10.0

log = logging.getLogger(__name__)
_over_cap: Final = Throttled(log, "metrics port: connections over its cap closed at once")
_TOKEN_IN_QUERY: Final = re.compile(r"(token=)[^&\s\"]*")
_PAGE_HEADERS: Final = {
    "Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class MetricsServer:
    def __init__(self, host: str, port: int, observed: Observed, token: str = "",
                 request_deadline_s: float = REQUEST_DEADLINE_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        registry = CollectorRegistry()
        registry.register(LockedCollector(MultiProcessCollector(None, path=observed.multiproc_dir),  # type: ignore[no-untyped-call]
                                          observed.files_lock))
        registry.register(ProcessCollector(observed.processes))
        self.console = Console(observed, registry)
        routes: dict[str, Callable[[], tuple[bytes, dict[str, str]]]] = {
            "/metrics": lambda: (generate_latest(registry), {"Content-Type": CONTENT_TYPE_LATEST}),
            "/console": lambda: (PAGE, _PAGE_HEADERS),
            "/console/state": lambda: (self.console.state_json(), {
                "Content-Type": "application/json", "Cache-Control": "no-store"}),
        }

        def authorised(header: str, path: str) -> bool:
            # The page is the same for everyone and holds no data: served without the token,
            # it can be reloaded (the address no longer carries the token, the tab does).
            if not token or path == "/console":
                return True
            return hmac.compare_digest(header.encode(), f"Bearer {token}".encode())

        class Handler(BaseHTTPRequestHandler):
            # Each connection holds a supervisor thread: one that is slow to send or to read is
            # let go (the supervisor's death takes every worker with it; its threads must not
            # pile up).
            timeout = request_deadline_s

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # replaced: every read of the request shares one deadline
                deadline = time.monotonic() + request_deadline_s
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

            def do_GET(self) -> None:
                # The reads left the socket with what remained of their deadline: the answer's
                # writes get their own.
                self.connection.settimeout(request_deadline_s)
                path = self.path.partition("?")[0].partition("#")[0]
                route = routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                if not authorised(self.headers.get("Authorization", ""), path):
                    self.send_error(401, explain="metrics.token is set: send Authorization: Bearer "
                                    "<token> (a browser opens /console#token=<token>)")
                    return
                try:
                    body, headers = route()
                except Exception:  # task boundary: one bad read must not take the port down
                    log.exception("metrics port: %s failed", path)
                    self.send_error(500)
                    return
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                # The request line may carry the console token: never log it.
                redacted = [_TOKEN_IN_QUERY.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                            for a in args]
                log.debug("metrics: " + format, *redacted)

        try:
            self.httpd = _BoundedServer(host, port, Handler, max_connections)
        except OSError as exc:  # e.g. node_exporter's 9100 on the same host
            where = f"[{host}]" if ":" in host else host or "*"
            raise ConfigError(f"metrics.port: cannot listen on {where}:{port} ({exc.strerror}); "
                              "set metrics.port (0 disables it) or metrics.host") from exc
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on :%d/metrics, live console on :%d/console", self.port, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.console.close()


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, all within one deadline (``REQUEST_DEADLINE_S``). Past it a read raises
    TimeoutError, which BaseHTTPRequestHandler answers by closing the connection."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive whole within its deadline")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


def _family(host: str) -> socket.AddressFamily:
    """IPv6 for an IPv6 literal ("::1", "::"); IPv4 otherwise, names included, as before."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


class _BoundedServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them; the rest are closed as
    soon as they are accepted (a scrape then fails, and Prometheus retries it next interval)."""

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler],
                 max_connections: int) -> None:
        self.address_family = _family(host)
        self._wildcard = host == "::"
        self._cap = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), handler)

    def server_bind(self) -> None:
        if self._wildcard:
            # "::" is the wildcard of both families, IPv4 clients included (Linux's default,
            # but net.ipv6.bindv6only or another system may say otherwise).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            _over_cap("%d already open; closed one from %s", self._cap, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: it will never give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
