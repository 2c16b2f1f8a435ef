"""The listening socket's HTTP/1.1 front: proxied calls are parsed by llhttp and answered by the
forwarding handler straight onto the socket; anything else hands its connection to aiohttp.

aiohttp's server costs about 0.15 ms of Python per request on the benchmark machine (request and
response objects, routing, its writer); the front does what a forwarded call needs and no more.
"Anything else" is the dashboard and the admin API, and requests the front does not take on:
HTTP/1.0, `Expect`, `Upgrade`, unknown upstream names. A connection is handed over between two
requests (the bytes of the request that caused it are re-serialised from what was parsed), and
stays with aiohttp from then on; aiohttp's route for proxied calls serves it with the same handler.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict

from .reply import Incoming
from .runtime import Runtime

log = logging.getLogger("meterline")

MAX_BODY = 512 * 1024 * 1024  # as aiohttp's client_max_size for the app
MAX_HEAD = 64 * 1024  # request line and headers together
IDLE_S = 75.0  # a kept-alive connection with no request for this long is closed (as aiohttp does)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Parsed:
    """One request as llhttp delivered it."""

    __slots__ = ("url", "headers", "body", "size", "expect")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0  # request line and headers, then body
        self.expect = False


class Front(asyncio.Protocol):
    """One app connection. Requests are served one at a time, in order."""

    def __init__(self, rt: Runtime, forward: Callable[..., Any], aiohttp_protocol: Callable[[], asyncio.Protocol],
                 upstreams: frozenset[bytes]) -> None:
        self.rt = rt
        self.forward = forward
        self.aiohttp_protocol = aiohttp_protocol
        self.upstreams = upstreams  # b"/name/" prefixes the front serves itself
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Parsed | None = None
        self.queue: collections.deque[tuple[float, _Parsed, str, bool]] = collections.deque()
        self.task: asyncio.Task | None = None
        self.handoff: bytearray | None = None  # bytes for aiohttp, once the connection is going to it
        self.handoff_chunked = False
        self.in_message = False  # between a request's first byte and its end: no hand-over there
        self.continue_owed = False  # an Expect: 100-continue came in while a call was being answered
        self.error: bytes | None = None  # a response to send, then close, once the calls before it are answered
        self.closed = False
        self.write_paused = False
        self.drain: asyncio.Future | None = None
        self.last_active = self.loop.time()

    # --- the socket ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _LIVE.add(self)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return  # the connection ends after what is being answered
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # an Upgrade request (re-serialised for aiohttp at its headers): what follows is its
            # new protocol's, unparsed
            assert self.handoff is not None
            self.handoff += data[e.args[0]:] if e.args and isinstance(e.args[0], int) else b""
            self.in_message = False
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, _TooLarge):
                status = e.__context__.status
                self._fail(status, "request body too large" if status == 413 else "request head too large",
                           "meterline_too_large")
            else:
                self._fail(400, "malformed HTTP request", "meterline_bad_request")
            return
        if self.handoff is not None and self.task is None and not self.in_message:
            self._hand_over()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        _LIVE.discard(self)
        self.parser = None  # type: ignore[assignment]  # it holds this protocol: no cycle for the GC to find
        if self.task is not None:
            self.task.cancel()  # the app went away: so does its call (recorded as cancelled)
        if self.drain is not None and not self.drain.done():
            self.drain.set_exception(ConnectionResetError("the app closed the connection"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    # --- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Parsed()
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        req = self.current
        assert req is not None
        req.url += url
        req.size += len(url)
        if req.size > MAX_HEAD:
            raise _TooLarge(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        req.headers.append((name, value))
        req.size += len(name) + len(value)
        if req.size > MAX_HEAD:
            raise _TooLarge(431)
        if len(name) == 6 and name.lower() == b"expect":
            req.expect = True

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        if self.handoff is None and not self._takes(req):
            self.handoff = bytearray()
        if self.handoff is not None:
            # re-serialised for aiohttp; the body follows as it is parsed (see on_body)
            self.handoff_chunked = any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower()
                                       for n, v in req.headers)
            method = self.parser.get_method()
            version = self.parser.get_http_version().encode()
            self.handoff += method + b" " + req.url + b" HTTP/" + version + b"\r\n"
            expects = False
            for name, value in req.headers:
                if name.lower() == b"expect":
                    expects = value.lower() == b"100-continue"
                    continue  # answered here: the body has to reach the front before aiohttp gets it
                self.handoff += name + b": " + value + b"\r\n"
            self.handoff += b"\r\n"
            self.current = None
            if expects:
                if self.task is None and not self.queue and self.transport is not None:
                    self.transport.write(_CONTINUE)
                else:
                    self.continue_owed = True  # sent once the calls before it are answered
        else:
            req.size = 0  # from here on, the body's

    def on_body(self, body: bytes) -> None:
        if self.handoff is not None:
            if self.handoff_chunked:
                self.handoff += _chunk(body)
            else:
                self.handoff += body
            return
        req = self.current
        assert req is not None
        req.size += len(body)
        if req.size > MAX_BODY:
            raise _TooLarge(413)
        req.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.handoff is not None:
            if self.handoff_chunked:
                self.handoff += b"0\r\n\r\n"
            return
        req = self.current
        self.current = None
        if req is None or self.closed:
            return
        keep_alive = self.parser.should_keep_alive()
        self.queue.append((time.perf_counter(), req, self.parser.get_method().decode(), keep_alive))
        if self.task is None:
            self._next()
        elif self.transport is not None:
            self.transport.pause_reading()  # a pipelined request waits; no more are read meanwhile

    # --- serving -------------------------------------------------------------------------------

    def _takes(self, req: _Parsed) -> bool:
        url = req.url
        end = url.find(b"/", 1)
        return (end > 0 and url[:end + 1] in self.upstreams and not req.expect
                and self.parser.get_http_version() == "1.1" and not self.parser.should_upgrade())

    def _next(self) -> None:
        if not self.queue or self.closed:
            return
        t0, req, method, keep_alive = self.queue.popleft()
        self.task = self.loop.create_task(self._serve(t0, req, method, keep_alive))

    async def _serve(self, t0: float, req: _Parsed, method: str, keep_alive: bool) -> None:
        reply = FastReply(self, keep_alive)
        try:
            await self.forward(self.rt, _incoming(req, method), reply, t0)
            if reply.state == "new":
                raise RuntimeError("the handler sent no response")
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - a bug of ours answers 500 rather than hanging the app
            log.exception("forwarding failed")
            if reply.state == "new":
                reply.simple(500, b'{"error":{"message":"meterline: internal error","type":"meterline_error"}}')
            elif self.transport is not None:
                self.transport.abort()
        finally:
            self.task = None
        if reply.final is not None:
            _FINALS.add(self, reply)  # the response's last bytes leave after its journal line
        else:
            self.after(reply)

    def after(self, reply: FastReply) -> None:
        """The response is out: close, or serve what came next on the connection."""
        if not reply.keep_alive or reply.state == "aborted":
            if self.transport is not None:
                self.transport.close()
            return
        self.last_active = self.loop.time()
        if self.queue:
            self._next()
        elif self.error is not None:
            self._send_error()
        elif self.handoff is not None and not self.in_message:
            self._hand_over()
        elif self.transport is not None and not self.closed:
            if self.continue_owed:
                self.continue_owed = False
                self.transport.write(_CONTINUE)
            self.transport.resume_reading()

    def _hand_over(self) -> None:
        """From here on aiohttp owns the connection, starting with the bytes gathered for it."""
        assert self.transport is not None and self.handoff is not None
        if self.closed:
            return
        protocol = self.aiohttp_protocol()
        _LIVE.discard(self)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        data, self.handoff = bytes(self.handoff), bytearray()
        if data:
            protocol.data_received(data)
        self.transport.resume_reading()
        self.parser = None  # type: ignore[assignment]

    def _fail(self, status: int, message: str, kind: str) -> None:
        """Answers `status` and closes, after the calls already read (a call sent upstream is answered)."""
        body = b'{"error":{"message":"meterline: %s","type":"%s"}}' % (message.encode(), kind.encode())
        self.error = _json_response(status, body, None, keep_alive=False)
        self.handoff = None  # the connection ends here; aiohttp gets nothing more of it
        if self.transport is not None:
            self.transport.pause_reading()
        if self.task is None and not self.queue:
            self._send_error()

    def _send_error(self) -> None:
        if self.transport is not None and not self.closed and self.error is not None:
            self.transport.write(self.error)
            self.transport.close()


class _TooLarge(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _chunk(data: bytes) -> bytes:
    """One chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_response(status: int, body: bytes, headers: dict[str, str] | None, keep_alive: bool) -> bytes:
    """A whole JSON response of the sidecar's own: an error, a refusal."""
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"]
    for key, value in (headers or {}).items():
        head.append(f"{key}: {value}\r\n")
    if not keep_alive:
        head.append("Connection: close\r\n")
    head.append("\r\n")
    return "".join(head).encode("utf-8", "surrogateescape") + body


def _incoming(req: _Parsed, method: str) -> Incoming:
    url = req.url.decode("utf-8", "surrogateescape")
    end = url.find("/", 1)
    name = url[1:end]
    target = url[end:]
    path, _, query = target.partition("?")
    headers: CIMultiDict[str] = CIMultiDict(
        [(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in req.headers])
    body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
    return Incoming(method, unquote(name), unquote(path), query, target, headers, body)


class FastReply:
    """A Reply written straight onto the app's socket: HTTP/1.1, keep-alive, chunked for streams."""

    __slots__ = ("front", "keep_alive", "state", "chunked", "held", "final")
    defers_final = True  # the last bytes wait for the journal line (see _Finals)

    def __init__(self, front: Front, keep_alive: bool) -> None:
        self.front = front
        self.keep_alive = keep_alive
        self.state = "new"  # new -> started -> ended | aborted
        self.chunked = False
        self.held: bytes | None = None  # the head of a non-streamed response, sent with its body
        self.final: bytes | None = None  # the response's last bytes, written by _Finals

    def simple(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.state = "ended"
        self.final = _json_response(status, body, headers, self.keep_alive)

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], whole: bool) -> None:
        head = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n"]
        framed = False
        for key, value in headers:
            head.append(f"{key}: {value}\r\n")
            if not framed and key.lower() == "content-length":
                framed = True
        if not framed and status not in (204, 304) and not 100 <= status < 200:
            self.chunked = True
            head.append("Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        data = "".join(head).encode("utf-8", "surrogateescape")
        self.state = "started"
        if whole:
            self.held = data
        else:
            await self._send(data)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            data = _chunk(data)
        if self.held is not None:
            data, self.held = self.held + data, None
        await self._send(data)

    async def finish(self, last: bytes | None) -> None:
        tail = b""
        if last:
            tail = _chunk(last) if self.chunked else last
        if self.chunked:
            tail += b"0\r\n\r\n"
        if self.held is not None:
            tail, self.held = self.held + tail, None
        self.state = "ended"
        self.final = tail

    def abort(self) -> None:
        self.state = "aborted"
        if self.front.transport is not None:
            self.front.transport.abort()

    async def _send(self, data: bytes) -> None:
        self._write(data)
        front = self.front
        if front.write_paused:
            front.drain = front.loop.create_future()
            try:
                await front.drain
            finally:
                front.drain = None

    def _write(self, data: bytes) -> None:
        transport = self.front.transport
        if self.front.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the app closed the connection")
        transport.write(data)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Request Entity Too Large", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
            504: "Gateway Timeout"}
_LIVE: weakref.WeakSet[Front] = weakref.WeakSet()  # open connections, for the idle sweep and shutdown


class _Finals:
    """Responses whose last bytes wait for their calls' journal lines. The calls that end in one
    turn of the event loop share one journal write; then each response goes out, in order."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Front, FastReply]] = []

    def add(self, front: Front, reply: FastReply) -> None:
        self.waiting.append((front, reply))
        if len(self.waiting) == 1:
            front.loop.call_soon(self.run, front.rt)

    def run(self, rt: Runtime) -> None:
        rt.writer.journal.flush()
        waiting, self.waiting = self.waiting, []
        for front, reply in waiting:
            transport = front.transport
            if reply.final and not front.closed and transport is not None and not transport.is_closing():
                transport.write(reply.final)
            front.after(reply)


_FINALS = _Finals()


async def serve(rt: Runtime, forward: Callable[..., Any], aiohttp_protocol: Callable[[], asyncio.Protocol],
                host: str, port: int) -> asyncio.AbstractServer:
    """Listens on host:port with the front; `aiohttp_protocol` makes aiohttp's protocol for hand-overs."""
    loop = asyncio.get_running_loop()
    prefixes = frozenset(f"/{name}/".encode() for name in rt.config.upstreams if name != "_meterline")
    listener = await loop.create_server(lambda: Front(rt, forward, aiohttp_protocol, prefixes), host, port,
                                        reuse_address=True, backlog=1024)
    loop.call_later(IDLE_S / 5, _sweep, loop, listener)
    return listener


def _sweep(loop: asyncio.AbstractEventLoop, listener: asyncio.AbstractServer) -> None:
    """Closes kept-alive connections idle for IDLE_S: one timer for all, not one per request."""
    if not listener.is_serving():
        return
    cutoff = loop.time() - IDLE_S
    for front in list(_LIVE):
        if front.task is None and not front.in_message and front.last_active < cutoff and front.transport is not None:
            front.transport.close()
    loop.call_later(IDLE_S / 5, _sweep, loop, listener)


def close_idle() -> None:
    """At shutdown: closes the connections with no call in flight (those with one finish first)."""
    for front in list(_LIVE):
        if front.task is None and front.transport is not None:
            front.transport.close()
