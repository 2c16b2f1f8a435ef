"""The hot path's client for upstreams: HTTP/1.1 keep-alive connections pooled per origin on raw
asyncio protocols, responses parsed by llhttp (httptools), body bytes passed on as the upstream sent them.

aiohttp's client costs about 0.15 ms of Python per request on the benchmark machine (request and
response objects, tracing hooks, cookie and redirect handling, timers per read); a forwarder needs
none of it. Webhooks and the demo still use aiohttp: only forwarded calls come through here.
"""
from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

# Past this much unread body the socket stops being read until the app catches up.
_HIGH_WATER = 512 * 1024
_LOW_WATER = 64 * 1024
# A response head past either cap fails the call (a 502) and drops the connection: an upstream
# cannot make the sidecar hold, or the app receive, an unbounded head (1xx heads count too).
MAX_HEAD = 256 * 1024
MAX_HEADERS = 1000
# aiohttp retries the same way: only requests that are safe to send twice, only on a kept-alive
# connection the upstream closed before answering.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange. `kind` names it in the ledger's error_type."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(slots=True, frozen=True)
class Origin:
    """Where an upstream's requests go: one pool of connections per origin."""

    scheme: str
    host: str
    port: int
    base_path: str  # prefix of every request target, "" or "/v1" (no trailing slash)
    host_header: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def origin_of(base_url: str) -> Origin:
    """The origin of an upstream's base_url (checked by the config loader)."""
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    return Origin(scheme, host, port, parts.path.rstrip("/"), shown if port == default else f"{shown}:{port}")


class Response:
    """An upstream's response: status and headers at once, the body as it arrives."""

    __slots__ = ("status", "reason", "headers", "_conn")

    def __init__(self, conn: _Connection) -> None:
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self._conn = conn

    def header(self, name: str) -> str:
        """The first value of a header (name in lower case), or ''."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return ""

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the socket delivers it; raises UpstreamError or TimeoutError if it breaks off."""
        conn = self._conn
        while True:
            chunk = conn.next_chunk()
            if chunk is None:
                return
            if chunk:
                yield chunk
            else:
                await conn.wait()

    def close(self) -> None:
        """Back to the pool if the body was read to its end, otherwise the connection is dropped."""
        if self._conn is not None:
            self._conn.finish()
            self._conn = None


class Pool:
    """Keep-alive connections per origin, reused most recent first, closed after keepalive_s idle."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float = 60.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        # per origin, (connection, idle since), most recent last
        self._idle: dict[Origin, list[tuple[_Connection, float]]] = collections.defaultdict(list)
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def request(self, origin: Origin, method: str, target: str, headers: dict[str, str],
                      body: bytes) -> Response:
        """Sends one request (target is the path and query after the origin's base path) and waits
        for the response's headers. Raises UpstreamError, or TimeoutError for a connect or read timeout."""
        head = [f"{method} {origin.base_path}{target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        for key, value in headers.items():
            head.append(f"{key}: {value}\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}\r\n")
        head.append("\r\n")
        message = "".join(head).encode("utf-8", "surrogateescape")
        retry = method in _IDEMPOTENT
        while True:
            conn = self._reuse(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin)
            conn.send(message, body, head_only=method == "HEAD")
            try:
                await conn.wait_headers()
            except UpstreamError as e:
                if reused and retry and e.kind in ("ServerDisconnectedError", "ClientOSError") \
                        and not conn.got_bytes:
                    retry = False
                    continue
                raise
            return Response(conn)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn, _ in idle:
                conn.close()
        self._idle.clear()

    def _reuse(self, origin: Origin) -> _Connection | None:
        conns = self._idle[origin]
        now = time.monotonic()
        while conns:
            conn, since = conns.pop()
            if conn.usable and now - since < self.keepalive_s:
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        if self._closed or not conn.usable:
            conn.close()
            return
        conns = self._idle[conn.origin]
        now = time.monotonic()
        # the oldest idle connection goes first when expired: an amortised sweep, no timer of its own
        while conns and (not conns[0][0].usable or now - conns[0][1] >= self.keepalive_s):
            conns.pop(0)[0].close()
        conns.append((conn, now))

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, origin, loop), origin.host, origin.port,
                                       ssl=context, server_hostname=origin.host if context else None),
                self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"connecting to {origin.host}:{origin.port}") from None
        except OSError as e:
            raise UpstreamError("ClientConnectorError", f"{origin.host}:{origin.port}: {e}") from e
        return conn


class _Connection(asyncio.Protocol):
    """One upstream socket: parses one response at a time and queues its body for the reader."""

    def __init__(self, pool: Pool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.got_bytes = False
        self._head_size = 0  # bytes read before the head's end (interim heads included)
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        self._framed = False  # Content-Length or chunked: the body does not end at EOF
        self._head_only = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._closed = False

    @property
    def usable(self) -> bool:
        return not self._closed and self._error is None and self.transport is not None \
            and not self.transport.is_closing()

    # --- the reader's side --------------------------------------------------------------------

    def send(self, message: bytes, body: bytes, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.reason, self.headers = 0, "", []
        self.got_bytes = self._headers_done = self._complete = self._keep_alive = self._framed = False
        self._head_size = 0
        self._body.clear()
        self._buffered = 0
        self._head_only = head_only
        assert self.transport is not None
        if body and len(body) < 64 * 1024:
            self.transport.write(message + body)  # one segment for the usual small JSON request
        else:
            self.transport.write(message)
            if body:
                self.transport.write(body)

    async def wait_headers(self) -> None:
        while not self._headers_done:
            await self.wait()

    def next_chunk(self) -> bytes | None:
        """The next body bytes; b'' when none are ready yet, None at the end of the body."""
        if self._body:
            chunk = self._body.popleft()
            self._buffered -= len(chunk)
            if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            return chunk
        if self._complete:
            return None
        if self._error is not None:
            raise self._error
        return b""

    async def wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(self.pool.read_timeout_s, self._read_timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def finish(self) -> None:
        if self._complete and self._keep_alive and not self._body and self._error is None:
            self.pool._release(self)
        else:
            self.close()

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    # --- the socket's side --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if not self._headers_done:
            # counted here, not in on_header: httptools gathers a header's value until it ends,
            # so a value without end would grow unseen; what came before this read is all head
            if self._head_size > MAX_HEAD:
                self._fail(UpstreamError("ClientResponseError", f"response head over {MAX_HEAD} bytes"))
                return
            self._head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("ClientResponseError", "upstream switched protocols"))
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, UpstreamError):  # raised by a callback of ours
                self._fail(e.__context__)
            else:
                self._fail(UpstreamError("ClientResponseError", f"malformed response: {e}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the end means

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.parser = None  # type: ignore[assignment]  # it holds this protocol: no cycle for the GC to find
        if self._headers_done and not self._complete and not self._framed and exc is None:
            self._complete = True  # a body delimited by the end of the connection
            self._wake()
        elif not self._complete:
            kind = "ClientOSError" if exc is not None else "ServerDisconnectedError"
            self._fail(UpstreamError(kind, str(exc) if exc else "upstream closed the connection"))

    def pause_writing(self) -> None:  # requests are small; nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # --- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # more than was asked for: the socket is out of step with its requests, so it is dropped
            raise UpstreamError("ClientResponseError", "data after the end of the response")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # chunked trailers: the app's headers are already on their way
        if len(self.headers) >= MAX_HEADERS:
            raise UpstreamError("ClientResponseError", f"response head over {MAX_HEADERS} headers")
        key = name.decode("utf-8", "surrogateescape")
        text = value.decode("utf-8", "surrogateescape")
        lower = key.lower()
        if lower == "content-length" or (lower == "transfer-encoding" and "chunked" in text.lower()):
            self._framed = True
        self.headers.append((key, text))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # an interim response (we send no Expect, but an upstream may still say 103): wait for the real one
            self.headers = []
            self.reason = ""
            return
        self.status = status
        self._headers_done = True
        if self._head_only:
            self._complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            return
        self._body.append(body)
        self._buffered += len(body)
        if not self._paused and self._buffered > _HIGH_WATER and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status:
            self._complete = True
            # asked now: llhttp forgets the message's keep-alive once the callback returns
            self._keep_alive = self.parser.should_keep_alive()
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()

    def _read_timeout(self) -> None:
        self._fail(TimeoutError(f"no data from {self.origin.host} for {self.pool.read_timeout_s:g} s"))
