"""An HTTPS server on loopback for tests: serves MTA-STS policy files by Host name and records
what is POSTed to it (TLS-RPT reports). Runs in threads, like the test DNS server."""

from __future__ import annotations

import ipaddress
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Posted:
    path: str
    content_type: str
    body: bytes


@dataclass
class HTTPSServer:
    context: ssl.SSLContext
    host: str = "127.0.0.1"
    port: int = 0
    policies: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)
    """Host name -> (status, content type, body) of /.well-known/mta-sts.txt."""
    posted: list[Posted] = field(default_factory=list)
    fetches: list[str] = field(default_factory=list)

    def policy(self, domain: str, text: str, status: int = 200,
               content_type: str = "text/plain") -> None:
        self.policies[f"mta-sts.{domain}"] = (status, content_type, text.encode())

    def start(self) -> HTTPSServer:
        if not ipaddress.ip_address(self.host).is_loopback:
            raise ValueError("the test HTTPS server only binds loopback addresses")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                outer.fetches.append(host)
                status, ctype, body = outer.policies.get(host, (404, "text/plain", b"no"))
                if self.path != "/.well-known/mta-sts.txt":
                    status, body = 404, b"no"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posted.append(Posted(self.path, self.headers.get("Content-Type", ""),
                                           body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._server.socket = self.context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
