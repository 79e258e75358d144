"""A fault-injecting HTTP proxy for the S3 test server: every `every`-th read request (GET/HEAD: object
reads, listings, metadata) fails before reaching the server, cycling through 503 SlowDown, 500 InternalError
and a dropped connection. Writes pass through untouched. Loopback only; stops with the test."""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERRORS = {
    "slowdown": (503, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                      b"<Message>Please reduce your request rate.</Message></Error>"),
    "internal": (500, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                      b"<Message>We encountered an internal error. Please try again.</Message></Error>"),
}


class FaultyProxy:
    """Forward to `target`; fail every `every`-th request, cycling through the fault kinds."""

    def __init__(self, target: str, every: int = 4) -> None:
        parsed = urlparse(target)
        self.host, self.port = parsed.hostname, parsed.port
        self.every = every
        self.counter = itertools.count(1)
        self.injected: dict[str, int] = {"slowdown": 0, "internal": 0, "reset": 0}
        self.forwarded = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, method: str) -> str | None:
        if method not in ("GET", "HEAD"):
            return None
        with self._lock:
            n = next(self.counter)
            if n % self.every:
                self.forwarded += 1
                return None
            kind = ("slowdown", "internal", "reset")[(n // self.every) % 3]
            if kind == "reset" and method == "HEAD":  # a HEAD gets a 5xx instead of a torn connection
                kind = "internal"
            self.injected[kind] += 1
            return kind

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault(self.command)
                if fault == "reset":
                    self.close_connection = True
                    # shutdown, not just close: rfile/wfile keep the socket open until they are closed too
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault:
                    code, payload = _ERRORS[fault]
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but must keep the object's length
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
