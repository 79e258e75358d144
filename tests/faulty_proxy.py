"""A fault-injecting HTTP proxy for the S3 test server. Every `every`-th request of each chosen method (all by
default: listings, reads, metadata and writes alike, each counted on its own) and path (a regex; all by
default) fails, up to `limit` faults, cycling through four kinds, a quarter each:

* ``slowdown``: 503 SlowDown, as S3 answers when a prefix is written too fast;
* ``internal``: 500 InternalError;
* ``reset``: the connection is dropped before the request reaches the server;
* ``lost``: the request reaches the server, then the connection is dropped before the answer (the client
  cannot know whether it happened). POST/DELETE (not idempotent on S3) get ``reset`` instead.

Bodies are relayed as they came, chunked ones included (the AWS SDKs stream uploads with
``Transfer-Encoding: chunked`` / ``aws-chunked`` and ``Expect: 100-continue``). Loopback only; stops with
the test.
"""

from __future__ import annotations

import http.client
import itertools
import re
import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("slowdown", "internal", "reset", "lost")
ALL_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})
WRITE_METHODS = frozenset({"PUT", "POST", "DELETE"})

_ERRORS = {
    "slowdown": (503, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                      b"<Message>Please reduce your request rate.</Message></Error>"),
    "internal": (500, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                      b"<Message>We encountered an internal error. Please try again.</Message></Error>"),
}
_HOP_HEADERS = {"connection", "expect", "keep-alive", "proxy-connection"}


class FaultyProxy:
    """Forward to `target`; fail every `every`-th request whose method is in `methods`."""

    def __init__(self, target: str, every: int = 10, methods: Iterable[str] = ALL_METHODS,
                 kinds: Iterable[str] = KINDS, paths: str | None = None, limit: int | None = None) -> None:
        parsed = urlparse(target)
        self.host, self.port = parsed.hostname, parsed.port
        self.every, self.methods, self.kinds = every, frozenset(methods), tuple(kinds)
        self.paths = re.compile(paths) if paths else None
        self.limit = limit  # at most this many faults, then everything passes
        self.counters: dict[str, itertools.count] = {}
        self.injected: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.by_method: dict[str, int] = {}
        self.forwarded = 0
        self.enabled = True
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def faults(self) -> int:
        return sum(self.injected.values())

    def _fault(self, method: str, path: str) -> str | None:
        with self._lock:
            if (not self.enabled or method not in self.methods or (self.paths and not self.paths.search(path))
                    or (self.limit is not None and self.faults >= self.limit)):
                self.forwarded += 1
                return None
            n = next(self.counters.setdefault(method, itertools.count(1)))
            if n % self.every:
                self.forwarded += 1
                return None
            kind = self.kinds[(n // self.every) % len(self.kinds)]
            if kind == "lost" and method in ("POST", "DELETE"):
                kind = "reset"
            self.injected[kind] += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            return kind

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a dropped request
                    pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self._chunked_body()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _chunked_body(self) -> bytes:
                """The raw chunked body (chunks, the last 0-size chunk and any trailers), relayed as it is."""
                out = bytearray()
                while True:
                    line = self.rfile.readline()
                    out += line
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    out += self.rfile.read(size + 2)  # data and its CRLF
                while True:  # trailers, up to the empty line
                    line = self.rfile.readline()
                    out += line
                    if line in (b"\r\n", b"\n", b""):
                        return bytes(out)

            def _drop(self) -> None:
                self.close_connection = True
                # shutdown, not just close: rfile/wfile keep the socket open until they are closed too
                self.connection.shutdown(socket.SHUT_RDWR)

            def _relay(self) -> None:
                body = self._body()
                fault = proxy._fault(self.command, self.path)
                if fault == "reset":
                    return self._drop()
                if fault in _ERRORS:
                    code, payload = _ERRORS[fault]
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return None
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "lost":
                    return self._drop()
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
                return None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
