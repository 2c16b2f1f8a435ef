"""sidecar/upstream.py against scripted HTTP/1.1 peers on real loopback sockets: the bytes it sends, the
responses it parses, the connections it keeps, reuses and drops, and how it fails. Every test runs on
asyncio's own event loop and on uvloop (what `meterline serve` runs on)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from sidecar.upstream import Origin, Pool, Response, UpstreamError, origin_of

pytestmark = [
    pytest.mark.timeout(10),
    # pytest-asyncio's replacement, the pytest_asyncio_loop_factories hook, has to live in a conftest
    pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture:DeprecationWarning'),
]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return asyncio.DefaultEventLoopPolicy() if request.param == "asyncio" else uvloop.EventLoopPolicy()


# --- a scripted upstream ---------------------------------------------------------------------------


class Peer:
    """The upstream's end of one accepted connection."""

    def __init__(self, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.eof = asyncio.Event()  # the client closed its end

    async def request(self) -> bytes:
        """One request as received (head, then Content-Length bytes of body), recorded; b'' once the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head, re.IGNORECASE)
            raw = head + (await self.reader.readexactly(int(length[1])) if length else b"")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return b""
        self.upstream.requests.append(raw)
        return raw

    async def send(self, *parts: bytes, gap: float = 0.0) -> None:
        """Writes the parts as separate writes, `gap` seconds apart."""
        for i, part in enumerate(parts):
            if i and gap:
                await asyncio.sleep(gap)
            self.writer.write(part)
            await self.writer.drain()

    async def until_closed(self) -> None:
        """Reads (and drops) whatever comes until the client closes."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eof.set()


Handler = Callable[[Peer], Awaitable[None]]


class Upstream:
    """A raw HTTP/1.1 server on 127.0.0.1: `handler` scripts each accepted connection, closed when it returns."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.peers: list[Peer] = []
        self.requests: list[bytes] = []  # every request, in arrival order, as its raw bytes
        self._tasks: set[asyncio.Task] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        return self

    def origin(self, path: str = "") -> Origin:
        return origin_of(self.url + path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        peer = Peer(self, reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            pass  # cancelled at the end of the test, or the client went away first
        finally:
            writer.close()

    async def stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def answering(*responses: bytes) -> Handler:
    """Answers every request with the next response (the last one repeats), on the same connection until the client
    closes it: the upstream never closes first, even after `Connection: close`, so a wrong reuse would show."""

    async def handler(peer: Peer) -> None:
        while await peer.request():
            n = len(peer.upstream.requests)
            await peer.send(responses[min(n, len(responses)) - 1])

    return handler


def echoing() -> Handler:
    """Answers every request with its own request line as the body (to tell responses apart)."""

    async def handler(peer: Peer) -> None:
        while raw := await peer.request():
            line = raw.split(b"\r\n", 1)[0]
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))

    return handler


Serve = Callable[..., Awaitable[Upstream]]
NewPool = Callable[..., Pool]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts upstreams (`await serve(handler)`); all stop at teardown."""
    started: list[Upstream] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> Upstream:
        upstream = await Upstream(handler).start(ssl_context)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


@pytest.fixture
def new_pool() -> Iterator[NewPool]:
    """Makes pools (timeouts of 1 s unless told); all closed at teardown."""
    pools: list[Pool] = []

    def make(connect_timeout_s: float = 1.0, read_timeout_s: float = 1.0, keepalive_s: float = 60.0) -> Pool:
        pools.append(Pool(connect_timeout_s, read_timeout_s, keepalive_s))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def pool(new_pool: NewPool) -> Pool:
    return new_pool()


async def read_all(resp: Response) -> bytes:
    return b"".join([chunk async for chunk in resp.chunks()])


async def fetch(pool: Pool, origin: Origin, method: str = "GET", target: str = "/",
                headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[Response, bytes]:
    """One whole exchange: request, body read to its end, response closed (its connection back to the pool)."""
    resp = await asyncio.wait_for(pool.request(origin, method, target, headers or {}, body), 2)
    data = await asyncio.wait_for(read_all(resp), 2)
    resp.close()
    return resp, data


def idle(pool: Pool, origin: Origin) -> int:
    """How many connections the pool keeps for the origin."""
    return len(pool._idle[origin])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- origins and request bytes ---------------------------------------------------------------------


def test_origin_of() -> None:
    assert origin_of("https://api.openai.com/v1") == Origin("https", "api.openai.com", 443, "/v1", "api.openai.com")
    assert origin_of("http://localhost:8080/") == Origin("http", "localhost", 8080, "", "localhost:8080")
    assert origin_of("http://example.com:80/a/b/") == Origin("http", "example.com", 80, "/a/b", "example.com")
    assert origin_of("HTTPS://Example.COM:8443") == Origin("https", "example.com", 8443, "", "example.com:8443")
    assert origin_of("http://[::1]:9000/x") == Origin("http", "::1", 9000, "/x", "[::1]:9000")
    assert origin_of("https://x.test").tls and not origin_of("http://x.test").tls


async def test_post_request_bytes(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(OK))
    body = b'{"model": "m", "stream": true}'
    await fetch(pool, up.origin("/v1/"), "POST", "/chat?x=%2F",
                {"Authorization": "Bearer sk-1", "Content-Type": "application/json", "X-Twice": "a, b"}, body)
    assert up.requests == [
        b"POST /v1/chat?x=%%2F HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer sk-1\r\n"
        b"Content-Type: application/json\r\nX-Twice: a, b\r\nContent-Length: %d\r\n\r\n%s" % (up.port, len(body), body)]


async def test_get_request_has_no_content_length(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(OK))
    await fetch(pool, up.origin("/v1"), "GET", "/models", {"Accept": "*/*"})
    assert up.requests == [b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: */*\r\n\r\n" % up.port]


async def test_post_without_body_says_content_length_0(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(OK))
    await fetch(pool, up.origin(), "POST", "/reset")
    assert up.requests == [b"POST /reset HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 0\r\n\r\n" % up.port]


async def test_large_request_body_arrives_exact(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(OK))
    body = os.urandom(300 * 1024)  # past the single-write size: head and body go out as two writes
    await fetch(pool, up.origin(), "POST", "/upload", {"Content-Type": "application/octet-stream"}, body)
    head, _, received = up.requests[0].partition(b"\r\n\r\n")
    assert head.endswith(b"\r\nContent-Length: %d" % len(body))
    assert received == body


# --- responses -------------------------------------------------------------------------------------


HEADERS_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nSet-Cookie: a=1\r\nx-request-id: r1\r\n"
                    b"Set-Cookie: b=2\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")


@pytest.mark.parametrize("delivery", ["one write", "dribbled"])
async def test_content_length_response(serve: Serve, pool: Pool, delivery: str) -> None:
    if delivery == "one write":
        up = await serve(answering(HEADERS_RESPONSE))
    else:  # 7 bytes a write: the status line, header names and values arrive cut anywhere
        async def dribble(peer: Peer) -> None:
            while await peer.request():
                await peer.send(*[HEADERS_RESPONSE[i:i + 7] for i in range(0, len(HEADERS_RESPONSE), 7)], gap=0.001)
        up = await serve(dribble)
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, resp.reason, body) == (200, "OK", b'{"ok":true}')
    assert resp.headers == [("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("x-request-id", "r1"),
                            ("Set-Cookie", "b=2"), ("Content-Length", "11")]
    assert (resp.header("set-cookie"), resp.header("x-request-id"), resp.header("x-missing")) == ("a=1", "r1", "")


async def test_custom_reason_phrase(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(b"HTTP/1.1 429 Slow Down, Please\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\nwait"))
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, resp.reason, body) == (429, "Slow Down, Please", b"wait")
    assert resp.headers == [("Retry-After", "2"), ("Content-Length", "4")]


async def test_chunked_response_is_dechunked(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5;name=value\r\nhello\r\n1\r\n,\r\n6\r\n world\r\n0\r\n\r\n"))
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, body) == (200, b"hello, world")


async def test_sse_stream_arrives_as_it_is_written(serve: Serve, pool: Pool) -> None:
    events = [b'data: {"n": %d}\n\n' % i for i in range(4)] + [b"data: [DONE]\n\n"]

    async def stream(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
                        *[b"%x\r\n%s\r\n" % (len(e), e) for e in events], b"0\r\n\r\n", gap=0.02)
        await peer.until_closed()

    up = await serve(stream)
    resp = await pool.request(up.origin(), "POST", "/chat", {}, b"{}")
    assert resp.header("content-type") == "text/event-stream"
    chunks = [chunk async for chunk in resp.chunks()]
    resp.close()
    assert b"".join(chunks) == b"".join(events)
    assert len(chunks) > 1, "the events written 20 ms apart came out as one chunk: the body was buffered"


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK"])
async def test_body_delimited_by_close(serve: Serve, pool: Pool, status_line: bytes) -> None:
    async def until_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(status_line + b"\r\nContent-Type: text/plain\r\n\r\npart one, ", b"part two", gap=0.02)

    up = await serve(until_close)
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, body) == (200, b"part one, part two")
    resp, body = await fetch(pool, up.origin())  # that connection is gone: the next one is new
    assert (resp.status, body, up.accepted) == (200, b"part one, part two", 2)


async def test_head_response_has_no_body(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n",
                               b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"))
    resp, body = await fetch(pool, up.origin(), "HEAD", "/file")
    assert (resp.status, resp.header("content-length"), body) == (200, "10", b"")
    resp, body = await fetch(pool, up.origin(), "GET", "/file")  # not taken for the HEAD's missing body
    assert (resp.status, body) == (200, b"0123456789")


@pytest.mark.parametrize("response", [b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
                                      b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"])
async def test_responses_without_body(serve: Serve, pool: Pool, response: bytes) -> None:
    up = await serve(answering(response))
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, body) == (int(response[9:12]), b"")


@pytest.mark.parametrize("delivery", ["one write", "three writes"])
async def test_interim_responses_are_skipped(serve: Serve, pool: Pool, delivery: str) -> None:
    parts = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    async def interim(peer: Peer) -> None:
        while await peer.request():
            await peer.send(*([b"".join(parts)] if delivery == "one write" else parts), gap=0.01)

    up = await serve(interim)
    resp, body = await fetch(pool, up.origin(), "POST", "/", {}, b"{}")
    assert (resp.status, resp.reason, resp.headers, body) == (200, "OK", [("Content-Length", "2")], b"ok")


async def test_bytes_past_content_length_are_not_body(serve: Serve, pool: Pool) -> None:
    # an upstream that sends more than it announced (here: a second, unrequested response): the extra bytes
    # belong to no request and must not reach the caller as this response's body, reason or headers
    up = await serve(answering(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"))
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, resp.reason, resp.headers, body) == (200, "OK", [("Content-Length", "2")], b"ok")


# --- keep-alive ------------------------------------------------------------------------------------


@pytest.mark.parametrize("response", [OK, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
                         ids=["content-length", "chunked"])
async def test_connection_is_reused(serve: Serve, pool: Pool, response: bytes) -> None:
    up = await serve(answering(response))
    for method, body in [("GET", b""), ("POST", b"{}"), ("GET", b"")]:
        resp, data = await fetch(pool, up.origin(), method, "/", {}, body)
        assert (resp.status, data) == (200, b"ok")
    assert len(up.requests) == 3
    assert up.accepted == 1, f"3 sequential requests opened {up.accepted} connections instead of reusing one"


async def test_concurrent_requests_use_their_own_connections(serve: Serve, pool: Pool) -> None:
    up = await serve(echoing())
    results = await asyncio.gather(*[fetch(pool, up.origin(), "GET", f"/{i}") for i in range(3)])
    assert [body for _, body in results] == [b"GET /%d HTTP/1.1" % i for i in range(3)]
    assert up.accepted == 3


async def test_connection_close_response_is_not_reused(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"))
    for _ in range(2):
        resp, body = await fetch(pool, up.origin())
        assert (resp.status, body) == (200, b"ok")
    assert up.accepted == 2
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)  # and the client closed the first one


@pytest.mark.parametrize("reading", ["unread", "partly read"])
async def test_unfinished_body_drops_the_connection(serve: Serve, pool: Pool, reading: str) -> None:
    async def slow_body(peer: Peer) -> None:
        while await peer.request():
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", b"56789", gap=0.05)

    up = await serve(slow_body)
    resp = await pool.request(up.origin(), "GET", "/", {}, b"")
    if reading == "partly read":
        chunks = resp.chunks()
        assert await chunks.__anext__() == b"01234"
        await chunks.aclose()
    resp.close()
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, body) == (200, b"0123456789")  # no leftover of the first body in the second
    assert up.accepted == 2
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)


def closing_after(delay: float, response: bytes = OK) -> Handler:
    """Answers one request per connection, then closes it `delay` seconds later."""

    async def handler(peer: Peer) -> None:
        if await peer.request():
            await peer.send(response)
            await asyncio.sleep(delay)

    return handler


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_request_after_upstream_closed_idle_connection(serve: Serve, pool: Pool, method: str) -> None:
    up = await serve(closing_after(0.01))
    await fetch(pool, up.origin())
    assert idle(pool, up.origin()) == 1, "the first connection was not kept for reuse"
    await asyncio.sleep(0.05)  # the upstream closes it meanwhile, and the loop sees that
    resp, body = await fetch(pool, up.origin(), method, "/", {}, b"{}" if method == "POST" else b"")
    assert (resp.status, body) == (200, b"ok")
    assert up.accepted == 2


async def test_get_retried_when_upstream_closed_just_before(serve: Serve, pool: Pool) -> None:
    # the upstream closes right after answering and the next GET goes out at once, in the same step of the
    # loop: it is written on the connection before the loop has seen the close, then sent again on a new one
    up = await serve(closing_after(0))
    resp = await pool.request(up.origin(), "GET", "/", {}, b"")
    assert await read_all(resp) == b"ok"
    resp.close()
    assert idle(pool, up.origin()) == 1, "the first connection was not kept for reuse"
    resp = await pool.request(up.origin(), "GET", "/again", {}, b"")
    assert (resp.status, await read_all(resp)) == (200, b"ok")
    assert (up.accepted, up.requests[-1].split(b"\r\n")[0]) == (2, b"GET /again HTTP/1.1")


def closing_on_second_request() -> Handler:
    """The first connection answers one request, then reads the next and closes without answering; later ones
    answer every request."""

    async def handler(peer: Peer) -> None:
        first = peer is peer.upstream.peers[0]
        while await peer.request():
            if first and len(peer.upstream.requests) == 2:
                return
            await peer.send(OK)

    return handler


async def test_get_retried_when_kept_alive_connection_closes_unanswered(serve: Serve, pool: Pool) -> None:
    up = await serve(closing_on_second_request())
    await fetch(pool, up.origin(), "GET", "/first")
    assert idle(pool, up.origin()) == 1, "the first connection was not kept for reuse"
    resp, body = await fetch(pool, up.origin(), "GET", "/second")
    assert (resp.status, body) == (200, b"ok")
    assert [r.split(b" ")[1] for r in up.requests] == [b"/first", b"/second", b"/second"]
    assert up.accepted == 2


async def test_post_not_retried_when_kept_alive_connection_closes_unanswered(serve: Serve, pool: Pool) -> None:
    up = await serve(closing_on_second_request())
    await fetch(pool, up.origin(), "GET", "/first")
    assert idle(pool, up.origin()) == 1, "the first connection was not kept for reuse"
    with pytest.raises(UpstreamError) as err:
        await pool.request(up.origin(), "POST", "/second", {}, b"{}")
    assert err.value.kind == "ServerDisconnectedError"
    assert [r.split(b" ")[1] for r in up.requests] == [b"/first", b"/second"]  # not sent twice
    assert up.accepted == 1


async def test_idle_connection_expires(serve: Serve, new_pool: NewPool) -> None:
    pool = new_pool(keepalive_s=0.05)
    up = await serve(answering(OK))
    await fetch(pool, up.origin())
    await fetch(pool, up.origin())
    assert up.accepted == 1, "a connection idle for less than keepalive_s was not reused"
    await asyncio.sleep(0.1)
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, body, up.accepted) == (200, b"ok", 2)
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)  # the expired one was closed


async def test_stray_bytes_on_idle_connection_do_not_leak_into_next_response(serve: Serve, pool: Pool) -> None:
    async def stray(peer: Peer) -> None:
        while await peer.request():
            await peer.send(OK, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale", gap=0.02)

    up = await serve(stray)
    await fetch(pool, up.origin())
    await asyncio.sleep(0.05)  # the stray response arrives while the connection is idle
    resp, body = await fetch(pool, up.origin())
    assert (resp.status, resp.reason, resp.headers, body) == (200, "OK", [("Content-Length", "2")], b"ok")


async def test_pool_close_closes_idle_connections(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(OK))
    await fetch(pool, up.origin())
    await asyncio.sleep(0.05)
    assert not up.peers[0].eof.is_set(), "the client closed a kept-alive connection before the pool was closed"
    pool.close()
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)


async def test_response_finished_after_pool_close_is_closed(serve: Serve, pool: Pool) -> None:
    up = await serve(answering(OK))
    resp = await pool.request(up.origin(), "GET", "/", {}, b"")
    pool.close()
    assert await read_all(resp) == b"ok"
    resp.close()
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)
    assert idle(pool, up.origin()) == 0


# --- errors ----------------------------------------------------------------------------------------


async def test_connect_refused(pool: Pool) -> None:
    with pytest.raises(UpstreamError) as err:
        await pool.request(origin_of(f"http://127.0.0.1:{closed_port()}"), "GET", "/", {}, b"")
    assert err.value.kind == "ClientConnectorError"


async def test_upstream_closes_without_answering(serve: Serve, pool: Pool) -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.request()

    up = await serve(hang_up)
    with pytest.raises(UpstreamError) as err:
        await pool.request(up.origin(), "POST", "/", {}, b"{}")
    assert err.value.kind == "ServerDisconnectedError"
    assert len(up.requests) == 1  # a POST is not sent twice


@pytest.mark.parametrize("response", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
                                      b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\na\r\nwor"],
                         ids=["content-length", "chunked"])
async def test_body_cut_short(serve: Serve, pool: Pool, response: bytes) -> None:
    async def cut(peer: Peer) -> None:
        await peer.request()
        await peer.send(response)

    up = await serve(cut)
    resp = await pool.request(up.origin(), "GET", "/", {}, b"")
    got = []
    with pytest.raises(UpstreamError) as err:
        async for chunk in resp.chunks():
            got.append(chunk)
    resp.close()
    assert err.value.kind == "ServerDisconnectedError"
    assert b"".join(got).startswith(b"hello")


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 abc\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
], ids=["status-code", "not-http", "content-length", "length-and-chunked", "upgrade"])
async def test_malformed_response_head(serve: Serve, pool: Pool, response: bytes) -> None:
    async def malformed(peer: Peer) -> None:
        await peer.request()
        await peer.send(response)
        await peer.until_closed()  # the upstream stays: the error comes from the parser, not a disconnect

    up = await serve(malformed)
    with pytest.raises(UpstreamError) as err:
        await pool.request(up.origin(), "GET", "/", {}, b"")
    assert err.value.kind == "ClientResponseError"
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)  # and the connection is dropped


@pytest.mark.parametrize("shape", ["many-headers", "one-huge-header", "endless-interim"])
async def test_response_head_past_its_cap_fails_and_drops_the_connection(serve: Serve, pool: Pool, shape: str) -> None:
    async def hostile(peer: Peer) -> None:
        await peer.request()
        try:
            if shape == "many-headers":  # 200,000 small headers, written until the client leaves
                await peer.send(b"HTTP/1.1 200 OK\r\n", *[b"".join(b"X-H-%d: v\r\n" % i for i in range(1000))] * 200)
            elif shape == "one-huge-header":
                await peer.send(b"HTTP/1.1 200 OK\r\nX-Big: ", *[b"a" * 65536] * 64)
            else:  # interim heads without end: each small, together past the cap
                await peer.send(*[b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" * 1000] * 20)
        except ConnectionError:
            pass
        await peer.until_closed()

    up = await serve(hostile)
    with pytest.raises(UpstreamError) as err:
        await pool.request(up.origin(), "GET", "/", {}, b"")
    assert err.value.kind == "ClientResponseError" and "head" in str(err.value)
    await asyncio.wait_for(up.peers[0].eof.wait(), 2)  # and the connection is dropped


async def test_response_head_under_the_cap_is_whole(serve: Serve, pool: Pool) -> None:
    headers = b"".join(b"X-H-%d: %s\r\n" % (i, b"v" * 100) for i in range(900))  # ~100 KB, 900 headers
    up = await serve(answering(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok"))
    resp = await pool.request(up.origin(), "GET", "/", {}, b"")
    assert resp.status == 200 and len(resp.headers) == 901 and resp.header("x-h-899") == "v" * 100
    assert await read_all(resp) == b"ok"
    resp.close()


async def test_malformed_chunk_in_body(serve: Serve, pool: Pool) -> None:
    async def malformed(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", b"zz\r\n", gap=0.02)
        await peer.until_closed()

    up = await serve(malformed)
    resp = await pool.request(up.origin(), "GET", "/", {}, b"")
    with pytest.raises(UpstreamError) as err:
        await read_all(resp)
    resp.close()
    assert err.value.kind == "ClientResponseError"


async def test_read_timeout_waiting_for_headers(serve: Serve, new_pool: NewPool) -> None:
    pool = new_pool(read_timeout_s=0.2)

    async def silent(peer: Peer) -> None:
        await peer.request()
        await peer.until_closed()

    up = await serve(silent)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await pool.request(up.origin(), "GET", "/", {}, b"")
    assert 0.15 < time.monotonic() - t0 < 1.0
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)
    assert len(up.requests) == 1  # not retried


async def test_read_timeout_while_body_stalls(serve: Serve, new_pool: NewPool) -> None:
    pool = new_pool(read_timeout_s=0.2)

    async def stall(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await peer.until_closed()

    up = await serve(stall)
    resp = await pool.request(up.origin(), "GET", "/", {}, b"")
    got = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        async for chunk in resp.chunks():
            got.append(chunk)
    assert 0.15 < time.monotonic() - t0 < 1.0
    resp.close()
    assert got == [b"abc"]
    await asyncio.wait_for(up.peers[0].eof.wait(), 1)


async def test_read_timeout_is_per_read_not_per_body(serve: Serve, new_pool: NewPool) -> None:
    pool = new_pool(read_timeout_s=0.2)

    async def trickle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", *[b"%d" % i for i in range(5)], gap=0.08)

    up = await serve(trickle)
    t0 = time.monotonic()
    resp, body = await fetch(pool, up.origin())
    assert body == b"01234" and time.monotonic() - t0 > 0.3  # longer than read_timeout_s all told


# --- backpressure ----------------------------------------------------------------------------------


async def test_slow_reader_pauses_the_socket(serve: Serve, pool: Pool) -> None:
    payload = os.urandom(4 * 1024 * 1024)

    async def fast(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        await peer.until_closed()

    up = await serve(fast)
    resp = await pool.request(up.origin(), "GET", "/big", {}, b"")
    digest, size, paused, most_buffered = hashlib.sha256(), 0, False, 0
    async for chunk in resp.chunks():
        digest.update(chunk)
        size += len(chunk)
        paused = paused or resp._conn._paused
        most_buffered = max(most_buffered, resp._conn._buffered)
        await asyncio.sleep(0.002)
    resp.close()
    assert (size, digest.hexdigest()) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert paused, "4 MiB arrived with the reader lagging and the socket was never paused"
    assert most_buffered < 2 * 1024 * 1024, f"{most_buffered} bytes buffered unread"


# --- TLS -------------------------------------------------------------------------------------------


def _cert(directory: Path, names: str) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=meterline-test",
                    "-addext", f"subjectAltName={names}"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Self-signed certificates: one for 127.0.0.1 and localhost, one for another name."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: no certificate for a local HTTPS upstream")
    return {"local": _cert(tmp_path_factory.mktemp("local"), "IP:127.0.0.1,DNS:localhost"),
            "other": _cert(tmp_path_factory.mktemp("other"), "DNS:upstream.invalid")}


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_tls_upstream_with_untrusted_certificate_is_refused(serve: Serve, pool: Pool, certs) -> None:
    up = await serve(answering(OK), server_context(*certs["local"]))
    # the upstream itself works for a client that trusts its certificate
    reader, writer = await asyncio.open_connection("127.0.0.1", up.port,
                                                   ssl=ssl.create_default_context(cafile=str(certs["local"][0])))
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(len(OK)), 1) == OK
    writer.close()
    with pytest.raises(UpstreamError) as err:
        await pool.request(up.origin(), "GET", "/", {}, b"")
    assert err.value.kind == "ClientConnectorError"
    assert "certificate verify failed" in str(err.value).lower()
    assert len(up.requests) == 1  # only the check's


@pytest.mark.parametrize("cert, trusted", [("local", True), ("other", False)], ids=["matching-name", "other-name"])
async def test_tls_upstream_with_trusted_certificate(serve: Serve, new_pool: NewPool, certs,
                                                     monkeypatch: pytest.MonkeyPatch, cert: str, trusted: bool) -> None:
    # the pool trusts the system's CAs, which OpenSSL lets SSL_CERT_FILE replace
    monkeypatch.setenv("SSL_CERT_FILE", str(certs[cert][0]))
    pool = new_pool()
    up = await serve(answering(OK), server_context(*certs[cert]))
    if not trusted:  # a trusted CA, but the certificate names another host
        with pytest.raises(UpstreamError) as err:
            await pool.request(up.origin(), "GET", "/", {}, b"")
        assert err.value.kind == "ClientConnectorError" and "certificate verify failed" in str(err.value).lower()
        return
    for _ in range(2):
        resp, body = await fetch(pool, up.origin("/v1"), "GET", "/models")
        assert (resp.status, body) == (200, b"ok")
    assert up.requests[0] == b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % up.port
    assert up.accepted == 1, "the TLS connection was not reused"
