"""A loopback TCP proxy in front of a local S3 server that counts HTTP requests and delays each one.

Used by `benchmarks.listing` (and the listing tests) to learn two things a local server hides: how many
requests a listing makes (S3 bills and throttles per request, and each is a round trip), and how the
listing behaves when every round trip costs what it costs against AWS (tens of milliseconds) instead of
the ~1 ms of loopback.

It understands just enough HTTP/1.1 to find where each request starts: the request line and headers,
then a body of `Content-Length` bytes. Requests with a chunked body are not supported (the proxy closes
the connection); send uploads straight to the server. Responses are copied through untouched. The
delay is applied to a request before it is forwarded, in the thread of its connection, so requests on
different connections are delayed in parallel, as round trips to a remote server are.

`on_request(kind, target)`, if given, is called for every request before it is forwarded, in the
thread of its connection: tests use it to change the bucket at a precise point of a listing, or to
drop a request (return False: the connection is closed without forwarding it, as a network failure
would).

Only 127.0.0.1 is ever listened on or connected to.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
BUFFER = 64 * 1024
MAX_HEAD = 64 * 1024


def request_kind(method: str, target: str) -> str:
    """LIST for a bucket listing (ListObjectsV2/V1, path-style), else the HTTP method."""
    parts = urlsplit(target)
    path_segments = [segment for segment in parts.path.split("/") if segment]
    query = parse_qs(parts.query, keep_blank_values=True)
    if method == "GET" and len(path_segments) == 1 and not ({"uploads", "location", "versioning", "acl"} & set(query)):
        return "LIST"
    return method


class CountingProxy:
    """`CountingProxy(upstream_port, delay_seconds).start()`; `.endpoint_url`; `.counts`; `.stop()`."""

    def __init__(
        self,
        upstream_port: int,
        delay_seconds: float = 0.0,
        on_request: Callable[[str, str], bool | None] | None = None,
    ):
        self.upstream_port = upstream_port
        self.delay_seconds = delay_seconds
        self.on_request = on_request
        self.counts: Counter[str] = Counter()
        self.connections = 0  # accepted so far: how many connections clients opened
        self.peak_in_flight = 0  # most requests inside their delay at once: the client's parallelism
        self._in_flight = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        assert self._listener is not None, "proxy not started"
        return self._listener.getsockname()[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> CountingProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(256)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="s3-proxy-accept", daemon=True).start()
        return self

    def reset(self) -> Counter:
        """The counts so far, and start counting from zero (requests and peak parallelism)."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
            self.peak_in_flight = self._in_flight
        return counts

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            sockets = list(self._sockets) + ([self._listener] if self._listener else [])
            self._sockets.clear()
        for sock in sockets:
            _close(sock)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            try:
                upstream = socket.create_connection((HOST, self.upstream_port))
            except OSError:
                _close(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._forward_requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._copy, args=(upstream, client), daemon=True).start()

    def _forward_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                head, buffer = _read_head(client, buffer)
                if head is None:
                    return
                method, target, body_length = _parse_head(head)
                kind = request_kind(method, target)
                with self._lock:
                    self.counts[kind] += 1
                if self.on_request is not None and self.on_request(kind, target) is False:
                    return  # dropped: the finally clause closes both sides
                if self.delay_seconds:
                    self._delay()
                upstream.sendall(head)  # before the body: a client may wait for "100 Continue"
                buffer = _relay_body(client, upstream, buffer, body_length)
        except (OSError, ValueError):
            pass
        finally:
            self._forget(client, upstream)

    def _delay(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            time.sleep(self.delay_seconds)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _copy(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER):
                target.sendall(data)
        except OSError:
            pass
        finally:
            self._forget(source, target)

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)
        for sock in sockets:
            _close(sock)


def _read_head(sock: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """(request line + headers + blank line, what follows), or (None, b"") when the peer closed."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            raise ValueError("request head too large")
        data = sock.recv(BUFFER)
        if not data:
            return None, b""
        buffer += data
    return buffer[: end + 4], buffer[end + 4 :]


def _parse_head(head: bytes) -> tuple[str, str, int]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            raise ValueError("chunked request bodies are not supported by this proxy")
    return method, target, length


def _relay_body(client: socket.socket, upstream: socket.socket, buffer: bytes, length: int) -> bytes:
    """Forward `length` body bytes (those already read first); return what was read beyond them."""
    while True:
        chunk, buffer = buffer[:length], buffer[length:]
        upstream.sendall(chunk)
        length -= len(chunk)
        if length == 0:
            return buffer
        buffer = client.recv(BUFFER)
        if not buffer:
            raise OSError("connection closed inside a request body")


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
