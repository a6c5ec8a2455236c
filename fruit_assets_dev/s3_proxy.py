"""A loopback TCP proxy in front of a local S3 server: it counts HTTP requests, can delay each one,
and can inject the faults cloud S3 shows now and then (`FaultProxy`).

`CountingProxy` is used by `benchmarks.listing` (and the listing tests) to learn two things a local
server hides: how many requests a listing makes (S3 bills and throttles per request, and each is a
round trip), and how the listing behaves when every round trip costs what it costs against AWS (tens
of milliseconds) instead of the ~1 ms of loopback.

`FaultProxy` adds, each at its own rate, the faults of issue 23:
- `slowdown`: a 503 SlowDown answered by the proxy; the request never reaches the store;
- `reset`: the connection is reset before the request is forwarded; the store never sees it;
- `lost`: the request is forwarded, the store applies it and starts answering, and then the
  connection is reset: the client cannot tell whether its write happened;
- `slow`: the request is held `slow_seconds` before it is forwarded.
Which request gets which fault is decided from the seed, the request (method and target) and how many
times that same request was seen before: the same requests give the same faults, whatever the order
in which threads send them, and a retry of a request draws again. `inject` adds one-off faults for
requests that match a pattern (a test's "lose the answer to the PUT of version 3"). Every injected
fault is counted (`injected`) and logged (`injected_log`).

It understands just enough HTTP/1.1 to find where each request starts: the request line and headers,
then a body of `Content-Length` bytes or a chunked body (the AWS SDK inside pyarrow sends its uploads
chunked). Responses are copied through untouched. The
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
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
BUFFER = 64 * 1024
MAX_HEAD = 64 * 1024
FAULTS = ("slowdown", "reset", "lost", "slow")


def request_kind(method: str, target: str) -> str:
    """LIST for a bucket listing (ListObjectsV2/V1, path-style), else the HTTP method."""
    parts = urlsplit(target)
    path_segments = [segment for segment in parts.path.split("/") if segment]
    query = parse_qs(parts.query, keep_blank_values=True)
    if method == "GET" and len(path_segments) == 1 and not ({"uploads", "location", "versioning", "acl"} & set(query)):
        return "LIST"
    return method


@dataclass
class _Connection:
    """One client connection and its own connection to the store."""

    client: socket.socket
    upstream: socket.socket
    # Set while a request whose answer is to be lost is in flight: the thread copying the store's
    # answer resets both connections when the answer starts (the store has applied the request).
    lose_answer: threading.Event
    lost_request: str = ""


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

    def start(self):
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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def choose_fault(self, method: str, target: str) -> str | None:
        """The fault to inject into this request (none here: see FaultProxy)."""
        return None

    def _accept_loop(self) -> None:
        assert self._listener is not None
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
            connection = _Connection(client, upstream, threading.Event())
            threading.Thread(target=self._forward_requests, args=(connection,), daemon=True).start()
            threading.Thread(target=self._copy_answers, args=(connection,), daemon=True).start()

    def _forward_requests(self, connection: _Connection) -> None:
        client, upstream = connection.client, connection.upstream
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
                fault = self.choose_fault(method, target)
                if fault == "reset":
                    _reset(client)
                    return
                if fault == "slowdown":
                    _relay_body(client, None, buffer, body_length)  # read it all: the client then reads the 503
                    client.sendall(_slow_down(method))
                    return
                if self.delay_seconds:
                    self._delay(self.delay_seconds)
                if fault == "slow":
                    self._delay(self.slow_seconds)
                if fault == "lost":
                    connection.lost_request = f"{method} {target}"
                    connection.lose_answer.set()
                upstream.sendall(head)  # before the body: a client may wait for "100 Continue"
                buffer = _relay_body(client, upstream, buffer, body_length)
        except (OSError, ValueError):
            pass
        finally:
            self._forget(client, upstream)

    slow_seconds = 0.0

    def _delay(self, seconds: float) -> None:
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            time.sleep(seconds)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _copy_answers(self, connection: _Connection) -> None:
        source, target = connection.upstream, connection.client
        try:
            while data := source.recv(BUFFER):
                # "100 Continue" only lets the body come: the request is not applied yet.
                if connection.lose_answer.is_set() and not data.startswith(b"HTTP/1.1 100 "):
                    self._answer_lost(connection)
                    _reset(target)
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            self._forget(source, target)

    def _answer_lost(self, connection: _Connection) -> None:
        """Called when the answer to a request marked `lost` has started, and is dropped."""

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)
        for sock in sockets:
            _close(sock)


@dataclass(frozen=True)
class FaultRule:
    """A one-off fault: the next `times` requests whose method is `method` and whose target matches
    `target` (a regular expression, searched) get `fault`."""

    fault: str
    method: str
    target: str
    times: int = 1


class FaultProxy(CountingProxy):
    """A `CountingProxy` that injects faults: `FaultProxy(port, slowdown=0.02, reset=0.02, lost=0.02,
    slow=0.02, seed=1)`. Rates are fractions of all requests; `injected` counts what was injected."""

    def __init__(
        self,
        upstream_port: int,
        *,
        slowdown: float = 0.0,
        reset: float = 0.0,
        lost: float = 0.0,
        slow: float = 0.0,
        slow_seconds: float = 0.5,
        seed: int = 0,
        delay_seconds: float = 0.0,
    ):
        super().__init__(upstream_port, delay_seconds)
        self.rates = {"slowdown": slowdown, "reset": reset, "lost": lost, "slow": slow}
        if any(not 0 <= rate <= 1 for rate in self.rates.values()) or sum(self.rates.values()) > 1:
            raise ValueError(f"fault rates must be fractions adding up to at most 1: {self.rates}")
        self.slow_seconds = slow_seconds
        self.seed = seed
        self.injected: Counter[str] = Counter()  # fault -> how many were injected
        self.lost_answers = 0  # `lost` requests whose answer started and was dropped (the store applied them)
        self.injected_log: list[tuple[str, str, str]] = []  # (fault, method, target), in order
        self._seen: Counter[tuple[str, str]] = Counter()
        self._rules: list[list] = []  # [FaultRule, times left]

    def inject(self, fault: str, method: str, target: str, times: int = 1) -> FaultRule:
        """Give `fault` to the next `times` requests of `method` whose target matches `target`."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        rule = FaultRule(fault, method.upper(), target, times)
        with self._lock:
            self._rules.append([rule, times])
        return rule

    def choose_fault(self, method: str, target: str) -> str | None:
        """The fault this request gets (counted as injected), or None."""
        with self._lock:
            fault = self._ruled_fault(method, target) or self._drawn_fault(method, target)
            if fault is not None:
                self.injected[fault] += 1
                self.injected_log.append((fault, method, target))
        return fault

    def _ruled_fault(self, method: str, target: str) -> str | None:
        for entry in self._rules:
            rule, left = entry
            if left > 0 and rule.method == method and re.search(rule.target, target):
                entry[1] -= 1
                return rule.fault
        return None

    def _drawn_fault(self, method: str, target: str) -> str | None:
        # A draw of its own per request (and per repetition of it): independent of thread order.
        seen = self._seen[(method, target)]
        self._seen[(method, target)] += 1
        draw = random.Random(f"{self.seed}|{method}|{target}|{seen}").random()
        for fault in FAULTS:
            if draw < self.rates[fault]:
                return fault
            draw -= self.rates[fault]
        return None

    def _answer_lost(self, connection: _Connection) -> None:
        with self._lock:
            self.lost_answers += 1


def _slow_down(method: str) -> bytes:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
    )
    body = b"" if method == "HEAD" else body
    head = (
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


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


CHUNKED = -1  # a body length: chunked transfer encoding


def _parse_head(head: bytes) -> tuple[str, str, int]:
    """(method, target, body length or CHUNKED)."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "transfer-encoding" and "chunked" in value.lower():
            return method, target, CHUNKED
        if name == "content-length":
            length = int(value.strip())
    return method, target, length


def _relay_body(client: socket.socket, upstream: socket.socket | None, buffer: bytes, length: int) -> bytes:
    """Forward `length` body bytes (those already read first; upstream None: read and drop them);
    return what was read beyond them."""
    if length == CHUNKED:
        return _relay_chunked(client, upstream, buffer)
    while True:
        chunk, buffer = buffer[:length], buffer[length:]
        if upstream is not None:
            upstream.sendall(chunk)
        length -= len(chunk)
        if length == 0:
            return buffer
        buffer = client.recv(BUFFER)
        if not buffer:
            raise OSError("connection closed inside a request body")


def _relay_chunked(client: socket.socket, upstream: socket.socket | None, buffer: bytes) -> bytes:
    """Forward a chunked body, up to and including its last chunk and trailers."""
    while True:
        line, buffer = _read_line(client, buffer)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        _send(upstream, line)
        if size == 0:  # the last chunk: trailers follow, up to an empty line
            while True:
                line, buffer = _read_line(client, buffer)
                _send(upstream, line)
                if line == b"\r\n":
                    return buffer
        buffer = _relay_body(client, upstream, buffer, size + 2)  # the data and its CRLF


def _read_line(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    """(one line with its CRLF, what follows)."""
    while (end := buffer.find(b"\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            raise ValueError("chunk header too long")
        data = sock.recv(BUFFER)
        if not data:
            raise OSError("connection closed inside a chunked body")
        buffer += data
    return buffer[: end + 2], buffer[end + 2 :]


def _send(sock: socket.socket | None, data: bytes) -> None:
    if sock is not None:
        sock.sendall(data)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST), as a dropped connection looks to the client."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes the thread reading from it; sends nothing
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
