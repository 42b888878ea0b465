"""The supervisor's metrics port: ``/metrics`` (one aggregate of every worker, multiprocess mode),
the live console page ``/console`` and its data ``/console/state``.

With ``metrics.token`` set every path needs ``Authorization: Bearer <token>``, except that
``/console`` also takes ``?token=`` because a browser cannot set a header when it opens a page;
the page then sends the header itself (server/app/console_page.py).
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from server.app.console import Console, Observed
from server.app.console_page import CSP, PAGE
from server.app.procstats import ProcessCollector
from server.errors import ConfigError

log = logging.getLogger(__name__)
_TOKEN_IN_QUERY: Final = re.compile(r"(token=)[^&\s\"]*")
_PAGE_HEADERS: Final = {
    "Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class MetricsServer:
    def __init__(self, host: str, port: int, observed: Observed, token: str = "",
                 idle_timeout_s: float = 10.0) -> None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=observed.multiproc_dir)  # type: ignore[no-untyped-call]
        registry.register(ProcessCollector(observed.processes))
        self.console = Console(observed, registry)
        routes: dict[str, Callable[[], tuple[bytes, dict[str, str]]]] = {
            "/metrics": lambda: (generate_latest(registry), {"Content-Type": CONTENT_TYPE_LATEST}),
            "/console": lambda: (PAGE, _PAGE_HEADERS),
            "/console/state": lambda: (self.console.state_json(), {
                "Content-Type": "application/json", "Cache-Control": "no-store"}),
        }

        def authorised(header: str, path: str, query: str) -> bool:
            if not token:
                return True
            if hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
                return True
            given = parse_qs(query).get("token", [""])[0] if path == "/console" else ""
            return hmac.compare_digest(given.encode(), token.encode())

        class Handler(BaseHTTPRequestHandler):
            # Each connection holds a supervisor thread: one that sends nothing is let go (the
            # supervisor's death takes every worker with it; its threads must not pile up).
            timeout = idle_timeout_s

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                route = routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                if not authorised(self.headers.get("Authorization", ""), path, query):
                    self.send_error(401, explain="metrics.token is set: send Authorization: Bearer "
                                    "<token> (a browser opens /console?token=<token>)")
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
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # e.g. node_exporter's 9100 on the same host
            raise ConfigError(f"metrics.port: cannot listen on {host or '*'}:{port} ({exc.strerror}); "
                              "set metrics.port (0 disables it) or metrics.host") from exc
        self.httpd.daemon_threads = True
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
