"""A local S3 endpoint for tests and benchmarks: moto's server behind a small proxy on 127.0.0.1.

The proxy sees every request, so it can say from the server's side what a client did (`counts`: requests and bytes
by method), add a fixed delay per request (`delay_s`: a remote bucket's latency), refuse requests signed with
another access key (moto accepts any: `access_key`), and be down for a while (`outage()`: connections closed
without an answer, as an unreachable endpoint).

    with S3Endpoint(access_key="k", bucket="b") as s3:   # s3.url: the endpoint for AWS_ENDPOINT_URL
        ...
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CREDENTIAL = re.compile(r"Credential=([^/]+)/")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # pyarrow uploads chunked bodies
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        proxy = self.server
        body = self._body()
        if proxy.down.is_set():
            with proxy.lock:
                proxy.counts["refused"] += 1
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if proxy.delay_s:
            time.sleep(proxy.delay_s)
        m = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        if proxy.access_key and (m is None or m.group(1) != proxy.access_key):
            self._answer(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        with proxy.lock:
            proxy.counts[self.command] += 1
            proxy.counts[f"{self.command}_bytes"] += len(payload) if self.command == "GET" else len(body)
            if self.command == "GET" and self.headers.get("Range"):
                proxy.counts["range_get"] += 1
            if self.command == "PUT":
                proxy.puts.append(self.path)
        self._answer(resp.status, payload, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP])

    def _answer(self, status: int, payload: bytes, headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        head = self.command == "HEAD"  # a HEAD answer carries the object's length, and no body
        for k, v in headers:
            if k.lower() != "content-length" or head:
                self.send_header(k, v)
        if not head or not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that went away (killed, timed out)
        pass

    def __init__(self, port: int, upstream_port: int, delay_s: float, access_key: str | None):
        super().__init__(("127.0.0.1", port), _Handler)
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.access_key = access_key
        self.counts: Counter = Counter()
        self.puts: list[str] = []  # paths of PUT requests, in order
        self.lock = threading.Lock()
        self.down = threading.Event()


class S3Endpoint:
    """moto's S3 server on a free port and the proxy in front of it on `port` (both threads of this process)."""

    def __init__(self, port: int | None = None, delay_s: float = 0.0, access_key: str | None = None,
                 bucket: str | None = None):  # fmt: skip
        self.port = port or free_port()
        self.delay_s, self.access_key, self.bucket = delay_s, access_key, bucket

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> S3Endpoint:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self._moto.start()
        _, upstream = self._moto.get_host_and_port()
        self._proxy = _ProxyServer(self.port, upstream, self.delay_s, self.access_key)
        self._thread = threading.Thread(target=self._proxy.serve_forever, name="s3proxy", daemon=True)
        self._thread.start()
        if self.bucket:
            self.create_bucket(self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        self._proxy.shutdown()
        self._proxy.server_close()
        self._moto.stop()

    def create_bucket(self, name: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._moto.get_host_and_port()[1], timeout=30)
        conn.request("PUT", f"/{name}", headers={"Content-Length": "0"})
        status = conn.getresponse().status
        conn.close()
        if status not in (200, 409):
            raise RuntimeError(f"could not create bucket {name}: HTTP {status}")

    @property
    def counts(self) -> Counter:
        return self._proxy.counts

    @property
    def puts(self) -> list[str]:
        return self._proxy.puts

    def reset_counts(self) -> None:
        with self._proxy.lock:
            self._proxy.counts.clear()
            self._proxy.puts.clear()

    def set_delay(self, seconds: float) -> None:
        self._proxy.delay_s = seconds

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The endpoint is unreachable (every connection closed without an answer) while the block runs."""
        self._proxy.down.set()
        try:
            yield
        finally:
            self._proxy.down.clear()
