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
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict

from .hostcheck import host_ok
from .reply import Incoming
from .runtime import Runtime

log = logging.getLogger("meterline")

MAX_BODY = 512 * 1024 * 1024  # as aiohttp's client_max_size for the app
MAX_ADMIN_BODY = 1024 * 1024  # /_meterline/ requests (SQL text, budget JSON): refused past this from their headers
MAX_HEAD = 64 * 1024  # request line and headers together
IDLE_S = 75.0  # a kept-alive connection with no request for this long is closed (as aiohttp does)
_ADMIN_PREFIX = b"/_meterline/"
_WATCHED = frozenset({4, 6, 14})  # the lengths of Host, Expect, Content-Length: the headers the front reads
_HANDOFF_HIGH = 256 * 1024  # body bytes gathered for aiohttp while a call is in flight, before reading pauses
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Parsed:
    """One request as llhttp delivered it."""

    __slots__ = ("url", "headers", "body", "size", "expect", "length", "misdirected")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0  # request line and headers, then body
        self.expect = False
        self.length: bytes | None = None  # Content-Length as sent
        self.misdirected = False  # a Host the sidecar does not serve (DNS rebinding)


class Front(asyncio.Protocol):
    """One app connection. Requests are served one at a time, in order."""

    def __init__(self, rt: Runtime, forward: Callable[..., Any], aiohttp_protocol: Callable[[], asyncio.Protocol],
                 upstreams: frozenset[bytes], hosts: _Hosts | None = None) -> None:
        self.rt = rt
        self.hosts = hosts or _Hosts(rt.config.allowed_hosts)
        self.hosts_seen = self.hosts.seen  # looked up first, without a call
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
        self.handoff_cap = MAX_BODY  # body bytes the front gathers for the message being handed over
        self.handoff_size = 0
        self.in_message = False  # between a request's first byte and its end: no hand-over there
        self.in_head = False  # between a request's first byte and the end of its headers
        self.handoff_streaming = False  # the handed-over message's body may go to aiohttp as it comes
        self.upgraded = False  # past an Upgrade request: llhttp parses no more of this connection
        self.began = 0.0  # when the request being read began (for the head timeout)
        self.head_bytes = 0  # bytes read while its head was still incomplete
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
        if self.in_head:
            # counted here too: httptools gathers a header's value until it ends, so one without
            # end would grow unseen by on_header; what came before this read is all head
            if self.head_bytes > MAX_HEAD:
                self._fail(431, "request head too large", "meterline_too_large")
                return
            self.head_bytes += len(data)
        if self.upgraded:
            assert self.handoff is not None
            self.handoff += data  # bytes after an Upgrade request: aiohttp parses them (see below)
        else:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                # An Upgrade request (re-serialised for aiohttp at its headers, its Upgrade header
                # left out). llhttp stops at its head, so its body, if any, and the requests after
                # it are passed to aiohttp unparsed. No route switches protocols (RFC 9110 lets a
                # server ignore Upgrade): aiohttp answers it as a plain request, then the next ones.
                assert self.handoff is not None
                self.handoff += data[e.args[0]:] if e.args and isinstance(e.args[0], int) else b""
                self.in_message = False
                self.upgraded = True
            except httptools.HttpParserError as e:
                refused = e.__context__
                if isinstance(refused, _Refused):
                    self._fail(refused.status, refused.message, refused.kind)
                else:
                    self._fail(400, "malformed HTTP request", "meterline_bad_request")
                return
        if self.handoff is not None and self.task is None and not self.queue \
                and (not self.in_message or self.handoff_streaming):
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
        self.in_message = self.in_head = True
        self.head_bytes = 0
        self.began = self.last_active  # read in data_received just before: no clock read per request

    def on_url(self, url: bytes) -> None:
        req = self.current
        assert req is not None
        req.url += url
        req.size += len(url)
        if req.size > MAX_HEAD:
            raise _Refused(431, "request head too large", "meterline_too_large")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        req.headers.append((name, value))
        req.size += len(name) + len(value)
        if req.size > MAX_HEAD:
            raise _Refused(431, "request head too large", "meterline_too_large")
        if len(name) in _WATCHED:
            lower = name.lower()
            if lower == b"host":
                ok = self.hosts_seen.get(value)
                if not (self.hosts.ok(value) if ok is None else ok):
                    req.misdirected = True
            elif lower == b"content-length":
                req.length = value
            elif lower == b"expect":
                req.expect = True

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        self.in_head = False
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # HTTP/0.9 has no headers to answer in; HTTP/2 does not start with a request line
            if version == "0.9":
                raise _Refused(400, "HTTP/0.9 requests are not served", "meterline_bad_request")
            raise _Refused(505, f"HTTP/{version} is not supported (HTTP/1.1 and 1.0 are)",
                           "meterline_http_version")
        # llhttp has checked the value (digits, one value); under 7 digits it is under every cap
        length = None
        if req.length is not None and len(req.length) >= 7 and req.length.strip().isdigit():
            length = int(req.length)
        if self.handoff is None and not self._takes(req, version):
            self.handoff = bytearray()
        if self.handoff is not None:
            # the cap is the route's, refused from the headers when the length says it is past it
            self.handoff_cap = MAX_ADMIN_BODY if req.url.startswith(_ADMIN_PREFIX) else MAX_BODY
            self.handoff_size = 0
            if length is not None and length > self.handoff_cap:
                raise _Refused(413, "request body too large", "meterline_too_large")
            # re-serialised for aiohttp; the body follows as it is parsed (see on_body)
            self.handoff_chunked = any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower()
                                       for n, v in req.headers)
            method = self.parser.get_method()
            upgrade = self.parser.should_upgrade()
            if upgrade:
                if method == b"CONNECT":
                    raise _Refused(405, "CONNECT is not served: this is not a forward proxy", "meterline_bad_request")
                self.handoff_chunked = False  # its body reaches aiohttp raw, in its own framing
            self.handoff += method + b" " + req.url + b" HTTP/" + version.encode() + b"\r\n"
            expects = False
            for name, value in req.headers:
                lower = name.lower()
                if lower == b"expect":
                    expects = value.lower() == b"100-continue"
                    continue  # answered here: the body has to reach the front before aiohttp gets it
                if upgrade and (lower == b"upgrade" or lower == b"connection"):
                    # ignored (see data_received): aiohttp must not take what follows for another protocol
                    if lower == b"upgrade":
                        continue
                    value = b",".join(t for t in value.split(b",") if t.strip().lower() != b"upgrade")
                    if not value.strip():
                        continue
                self.handoff += name + b": " + value + b"\r\n"
            self.handoff += b"\r\n"
            self.current = None
            # a body framed by Content-Length can go on to aiohttp as it arrives, raw, once
            # nothing is in flight: the front need not gather it (a chunked one is re-framed here)
            self.handoff_streaming = not self.handoff_chunked
            if expects:
                if self.task is None and not self.queue and self.transport is not None:
                    self.transport.write(_CONTINUE)
                else:
                    self.continue_owed = True  # sent once the calls before it are answered
        else:
            if req.misdirected:
                raise _Refused(421, "this Host is not served (add it to allowed_hosts if it is yours)",
                               "meterline_misdirected")
            if length is not None and length > MAX_BODY:
                raise _Refused(413, "request body too large", "meterline_too_large")
            req.size = 0  # from here on, the body's

    def on_body(self, body: bytes) -> None:
        if self.handoff is not None:
            self.handoff_size += len(body)
            if self.handoff_size > self.handoff_cap:
                raise _Refused(413, "request body too large", "meterline_too_large")
            if self.handoff_chunked:
                self.handoff += _chunk(body)
            else:
                self.handoff += body
                if self.task is not None and len(self.handoff) > _HANDOFF_HIGH and self.transport is not None:
                    self.transport.pause_reading()  # the rest goes straight to aiohttp once the call ends
            return
        req = self.current
        assert req is not None
        req.size += len(body)
        if req.size > MAX_BODY:
            raise _Refused(413, "request body too large", "meterline_too_large")
        req.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.handoff is not None:
            self.handoff_streaming = False  # the next message's head is gathered whole first
            if self.handoff_chunked:
                self.handoff += b"0\r\n\r\n"
            if (self.task is not None or self.queue) and self.transport is not None:
                self.transport.pause_reading()  # gathered for aiohttp: no more until the calls before it end
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

    def _takes(self, req: _Parsed, version: str) -> bool:
        url = req.url
        end = url.find(b"/", 1)
        return (end > 0 and url[:end + 1] in self.upstreams and not req.expect
                and version == "1.1" and not self.parser.should_upgrade())

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
        elif self.handoff is not None and (not self.in_message or self.handoff_streaming):
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
        if self.continue_owed:  # its request's body comes once it has this; aiohttp never saw the Expect
            self.continue_owed = False
            self.transport.write(_CONTINUE)
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


class _Refused(Exception):
    """Raised in a parser callback: the request is answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(status)
        self.status = status
        self.message = message
        self.kind = kind


class _Hosts:
    """hostcheck.host_ok for the Host values the front sees, remembered: apps send the same few."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed
        self.seen: dict[bytes, bool] = {}

    def ok(self, value: bytes) -> bool:
        known = self.seen.get(value)
        if known is None:
            if len(self.seen) >= 256:
                self.seen.clear()  # a client cycling through Host values does not grow this
            known = self.seen[value] = host_ok(value, self.allowed)
        return known


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
        self.held = None  # an upstream head never sent (see unsent) gives way to this answer
        self.chunked = False
        self.final = _json_response(status, body, headers, self.keep_alive)

    def unsent(self) -> bool:
        return self.state == "new" or self.held is not None

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


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 413: "Request Entity Too Large",
            421: "Misdirected Request", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            405: "Method Not Allowed", 500: "Internal Server Error", 502: "Bad Gateway", 504: "Gateway Timeout",
            505: "HTTP Version Not Supported"}
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
        rt.journal.flush()
        waiting, self.waiting = self.waiting, []
        for front, reply in waiting:
            transport = front.transport
            if reply.final and not front.closed and transport is not None and not transport.is_closing():
                transport.write(reply.final)
            front.after(reply)


_FINALS = _Finals()


async def serve(rt: Runtime, forward: Callable[..., Any], aiohttp_protocol: Callable[[], asyncio.Protocol],
                host: str, port: int, sock: socket.socket | None = None) -> asyncio.AbstractServer:
    """Listens on host:port (or the listening `sock` given) with the front; `aiohttp_protocol` makes
    aiohttp's protocol for hand-overs."""
    loop = asyncio.get_running_loop()
    # b"/v1/": the One API root paths (sidecar/oneapi), unless an upstream is named "v1"
    prefixes = frozenset([f"/{name}/".encode() for name in rt.config.upstreams if name != "_meterline"] + [b"/v1/"])
    hosts = _Hosts(rt.config.allowed_hosts)
    make = lambda: Front(rt, forward, aiohttp_protocol, prefixes, hosts)  # noqa: E731
    if sock is not None:
        listener = await loop.create_server(make, sock=sock, backlog=1024)
    else:
        listener = await loop.create_server(make, host, port, reuse_address=True, backlog=1024)
    limits = _Limits(rt.config.head_timeout_s, rt.config.body_idle_timeout_s)
    loop.call_later(limits.every, _sweep, loop, listener, limits)
    return listener


class _Limits:
    """How long a connection may idle, take over its request head, or leave its body silent."""

    def __init__(self, head_s: float, body_idle_s: float) -> None:
        self.head_s = head_s
        self.body_idle_s = body_idle_s
        self.every = min(IDLE_S, head_s, body_idle_s) / 5  # each limit is kept to within a fifth of it


def _sweep(loop: asyncio.AbstractEventLoop, listener: asyncio.AbstractServer, limits: _Limits) -> None:
    """Closes kept-alive connections idle for IDLE_S, and ends requests whose head takes longer
    than head_s or whose body is silent for body_idle_s (slowloris): one timer for all, not one
    per request."""
    if not listener.is_serving():
        return
    now = loop.time()
    idle, head, body = now - IDLE_S, now - limits.head_s, now - limits.body_idle_s
    for front in list(_LIVE):
        if front.transport is None or front.error is not None or front.closed:
            continue
        if front.in_message:
            if front.in_head:
                if front.began < head:
                    front._fail(408, f"request head not complete within {limits.head_s:g} s", "meterline_timeout")
            elif front.last_active < body and not front.continue_owed:  # an owed 100 Continue: the app waits on us
                front._fail(408, f"request body silent for {limits.body_idle_s:g} s", "meterline_timeout")
        elif front.task is None and front.last_active < idle:
            front.transport.close()
    loop.call_later(limits.every, _sweep, loop, listener, limits)


def close_idle() -> None:
    """At shutdown: closes the connections with no call in flight (those with one finish first)."""
    for front in list(_LIVE):
        if front.task is None and front.transport is not None:
            front.transport.close()
