"""A loopback HTTP server that serves fixed answers per path, for the reputation importers
(Google's OAuth token endpoint and Postmaster Tools API, Microsoft's SNDS data URL).

Standard library only (``http.server`` in a thread): the importers are synchronous clients run
in threads, so the server must not depend on the test's event loop. ``down = True`` makes every
request fail with 503; ``stop()`` closes the port (an outage that refuses connections).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

Handler = Callable[[dict, bytes, dict], tuple[int, str, bytes]]
"""(query, body, headers) -> (status, content type, body)."""


class FixtureHTTP:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.down = False
        fixture = self

        class _Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                fixture.requests.append((method, url.path, headers))
                handler = fixture.routes.get((method, url.path))
                if fixture.down:
                    status, ctype, out = 503, "application/json", b'{"error": "down"}'
                elif handler is None:
                    status, ctype, out = 404, "application/json", b'{"error": "no route"}'
                else:
                    status, ctype, out = handler(parse_qs(url.query), body, headers)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def json(self, method: str, path: str, payload: object | Handler) -> None:
        """Serve ``payload`` (or what a handler returns) as JSON at ``path``."""
        if callable(payload):
            self.routes[(method, path)] = payload
        else:
            data = json.dumps(payload).encode()
            self.routes[(method, path)] = lambda q, b, h: (200, "application/json", data)

    def text(self, path: str, text: str, ctype: str = "text/csv") -> None:
        data = text.encode()
        self.routes[("GET", path)] = lambda q, b, h: (200, ctype, data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
