"""One call as the forwarding handler sees it, whichever server carried it: the app's request
(`Incoming`) and the way back to the app (`Reply`), for aiohttp (`AioReply`) and for the fast
front in sidecar/server.py (`FastReply` there)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy


@dataclass(slots=True)
class Incoming:
    method: str
    upstream: str  # the first path segment: which upstream the app asked for
    path: str  # the rest of the path, percent-decoded, from "/"
    query: str  # as sent, without "?"
    target: str  # the rest of the path and the query exactly as sent, for the upstream request line
    headers: CIMultiDict[str] | CIMultiDictProxy[str]
    body: bytes
    # One API (sidecar/oneapi): (client format, upstream format) of a call made on a root path
    formats: tuple[str, str] | None = None
    # ...and the app's own API key as it sent it (the headers sent upstream may carry the upstream's
    # configured key instead): the row's key_fingerprint is the app's, never the config's
    app_key: str | None = None


class Reply(Protocol):
    """The app's side of the exchange. `write` raises ConnectionError once the app has gone."""

    def simple(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """A whole JSON answer of the sidecar's own (an error or a refusal)."""

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], whole: bool) -> None:
        """The upstream's status and headers. `whole`: hold them until the first body bytes, to
        leave in one write (non-streamed bodies); otherwise send them at once (streams)."""

    async def write(self, data: bytes) -> None: ...

    async def finish(self, last: bytes | None) -> None:
        """The body's last bytes (if any) and its end. With `defers_final`, they leave only after
        the journal's pending lines are written, so the final record may be journaled lazily."""

    defers_final: bool

    def unsent(self) -> bool:
        """Whether nothing of the response has reached the app yet: `simple` may still replace it
        (a non-streamed response whose body broke off before its held head left)."""

    def abort(self) -> None:
        """Break the connection: the upstream broke off mid-body, so the app must not see an end."""


class AioReply:
    """A Reply over aiohttp's request and response objects; `response` is what the route returns."""

    __slots__ = ("request", "response")
    defers_final = False

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    def simple(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.response = web.Response(status=status, body=body, content_type="application/json", headers=headers)

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], whole: bool) -> None:
        resp = (_WholeResponse if whole else web.StreamResponse)(status=status, reason=reason or None)
        for key, value in headers:
            resp.headers.add(key, value)
        self.response = resp
        if not whole:
            await resp.prepare(self.request)  # a whole one is prepared with its first body bytes

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(data)

    def unsent(self) -> bool:
        return self.response is None or not self.response.prepared

    async def finish(self, last: bytes | None) -> None:
        assert self.response is not None
        if not self.response.prepared:
            await self.response.prepare(self.request)
        if last:
            await self.response.write(last)
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()


class _WholeResponse(web.StreamResponse):
    """A non-streamed response: its headers leave with the first body bytes, in one write."""

    _send_headers_immediately = False


def incoming_of(request: web.Request, body: bytes) -> Incoming:
    """The call as aiohttp parsed it (routed as /{upstream}/{tail})."""
    name = request.match_info["upstream"]
    query = request.query_string
    prefix = f"/{name}/"
    raw_path = request.raw_path
    if raw_path.startswith(prefix):
        target = raw_path[len(prefix) - 1:]
    else:  # the upstream's name was itself percent-escaped
        target = quote("/" + request.match_info["tail"], safe="/:@!$&'()*+,;=-._~%") + ("?" + query if query else "")
    return Incoming(request.method, name, "/" + request.match_info["tail"], query, target, request.headers, body)


async def read_body(request: web.Request, idle_s: float, limit: int) -> bytes:
    """A proxied call's body on a connection aiohttp serves, as it arrives. Raises TimeoutError once
    it is silent for `idle_s` (the front's body timeout: one timer, moved on at each chunk), and
    HTTPRequestEntityTooLarge past `limit`."""
    if not request.body_exists:
        return b""
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    size = 0
    async with asyncio.timeout(idle_s) as timer:
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            parts.append(chunk)
            timer.reschedule(loop.time() + idle_s)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def closing(request: web.Request, status: int, message: str, kind: str) -> web.Response:
    """A JSON error sent at once, then the connection closed: the request's body was not read to
    its end, so the connection cannot carry another request (and aiohttp would otherwise read on,
    discarding, for its lingering time)."""
    resp = web.json_response({"error": {"message": f"meterline: {message}", "type": kind}}, status=status)
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    if request.transport is not None:
        request.transport.close()  # after what is written has left
    return resp


async def timed_out(request: web.Request, idle_s: float) -> web.Response:
    """The 408 that ends a connection whose request body went silent."""
    return await closing(request, 408, f"request body silent for {idle_s:g} s", "meterline_timeout")
