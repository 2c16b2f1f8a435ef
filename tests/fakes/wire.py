"""Response plumbing shared by the fake providers: request context, JSON sends, SSE/JSON-array streams.

All scenario effects that are not provider specific live here: ``reset`` (abort the
transport), ``slow`` (pacing), ``malformed`` (truncated JSON), ``gzip`` and ``stream-error``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Optional

from aiohttp import web

from .records import Exchange, gzip_bytes
from .scenarios import Scenario
from .tokens import Counts, counts_for


class BadRequest(Exception):
    """A request the provider would reject; turned into its error shape by the server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConnectionDropped(Exception):
    """The connection was aborted (on purpose or by the client); nothing more can be sent."""

    def __init__(self, response: Optional[web.StreamResponse] = None) -> None:
        super().__init__("connection dropped")
        self.response = response


def dumps_compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dumps_pretty(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")


def dumps_spaced(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


class Provider:
    """What the shared plumbing needs to know about one provider (subclassed per provider)."""

    name = "provider"

    def error_payload(self, status: int, message: Optional[str], scenario: Scenario) -> tuple[bytes, str, dict[str, str]]:
        """Body, content type and extra headers of an error response."""
        raise NotImplementedError

    def auth_problem(self, request: web.Request) -> Optional[tuple[int, str]]:
        """(status, message) when the request lacks the credentials the provider requires."""
        return None

    def api_key(self, request: web.Request) -> Optional[str]:
        return None

    def response_headers(self) -> dict[str, str]:
        """Headers the provider adds to every response (request ids and the like)."""
        return {}


class SseFraming:
    """Server-sent events: optional ``event:`` line, one ``data:`` line, then a blank line."""

    closing = b""

    def __init__(self, eol: bytes = b"\n\n") -> None:
        self.eol = eol
        self._line_end = eol[: len(eol) // 2]

    def frame(self, data: bytes, event: Optional[str], first: bool) -> bytes:
        head = b"event: " + event.encode("ascii") + self._line_end if event else b""
        return head + b"data: " + data + self.eol


class JsonArrayFraming:
    """A JSON array streamed element by element: ``[`` elem ``,\\r\\n`` elem ... ``]``."""

    closing = b"]"

    def frame(self, data: bytes, event: Optional[str], first: bool) -> bytes:
        return (b"[" if first else b",\r\n") + data


class Ctx:
    """Everything a handler needs about the request it serves, and the ways to answer it."""

    def __init__(
        self,
        request: web.Request,
        exchange: Exchange,
        scenario: Scenario,
        provider: Provider,
        body: bytes,
    ) -> None:
        self.request = request
        self.exchange = exchange
        self.scenario = scenario
        self.provider = provider
        self.body = body
        self.counts: Counts = counts_for(body, scenario)
        self._extra_headers = provider.response_headers()

    # ----- request helpers -------------------------------------------------------------

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or a provider-shaped 400."""
        if not isinstance(self.exchange.request_json, dict):
            raise BadRequest(400, "The request body is not a valid JSON object.")
        return self.exchange.request_json

    def require_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest(400, "you must provide a model parameter")
        return model

    def describe(self, **fields: Any) -> None:
        """Set fields of the exchange record (model, response_model, response_id, stream, ...)."""
        for key, value in fields.items():
            setattr(self.exchange, key, value)

    # ----- whole responses -----------------------------------------------------------------

    async def send_json(
        self,
        obj: Any,
        *,
        status: int = 200,
        content_type: str = "application/json",
        pretty: bool = False,
        usage: Optional[dict[str, Any]] = None,
    ) -> web.StreamResponse:
        body = dumps_pretty(obj) if pretty else dumps_compact(obj)
        return await self.send_bytes(body, status=status, content_type=content_type, usage=usage)

    async def send_bytes(
        self,
        body: bytes,
        *,
        status: int = 200,
        content_type: str,
        usage: Optional[dict[str, Any]] = None,
        extra_headers: Optional[dict[str, str]] = None,
        apply_scenario: bool = True,
    ) -> web.StreamResponse:
        """Send a complete (non-streamed) body, applying reset / slow / malformed / gzip."""
        sc = self.scenario
        if apply_scenario and sc.reset:
            self.abort_transport()
            raise ConnectionDropped(None)
        if apply_scenario and sc.slow:
            await asyncio.sleep(sc.chunk_delay * sc.chunks)
        if apply_scenario and sc.malformed:
            body = body[: len(body) // 2]
            usage = None
        headers = {"Content-Type": content_type, **self._extra_headers, **(extra_headers or {})}
        decoded = body
        accepts = self.request.headers.get("Accept-Encoding", "").lower()
        if apply_scenario and sc.gzip and "gzip" in accepts:
            body = gzip_bytes(body)
            headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(body))
        response = web.Response(body=body, status=status, headers=headers)
        ex = self.exchange
        ex.status = status
        ex.response_headers = {k.lower(): v for k, v in headers.items()}
        ex.response_body = body
        ex.response_body_decoded = decoded
        ex.usage = usage
        ex.complete = True
        ex.finished_at = time.time()
        return response

    async def send_error(self, status: int, message: Optional[str] = None) -> web.StreamResponse:
        body, content_type, headers = self.provider.error_payload(status, message, self.scenario)
        return await self.send_bytes(
            body, status=status, content_type=content_type, extra_headers=headers, apply_scenario=False
        )

    def abort_transport(self) -> None:
        ex = self.exchange
        ex.aborted = True
        ex.complete = False
        ex.finished_at = time.time()
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    # ----- streams ---------------------------------------------------------------------------

    async def open_stream(
        self,
        *,
        content_type: str,
        framing: SseFraming | JsonArrayFraming,
        dumps: Callable[[Any], bytes] = dumps_compact,
        error_event: Optional[Callable[[], tuple[Any, Optional[str]]]] = None,
    ) -> "EventStream":
        headers = {"Content-Type": content_type, "Cache-Control": "no-cache", **self._extra_headers}
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(self.request)
        self.exchange.status = 200
        self.exchange.response_headers = {k.lower(): v for k, v in response.headers.items()}
        if self.scenario.has("stall"):  # the head is out; the first event never comes
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.request.transport is not None \
                    and not self.request.transport.is_closing():
                await asyncio.sleep(0.05)
            self.exchange.error = "stalled before the first event"
            raise ConnectionDropped(response)
        return EventStream(self, response, framing, dumps, error_event)


class EventStream:
    """A streamed response being written; records every byte and applies stream scenarios.

    Handlers call :meth:`send` for structural frames, :meth:`content` for each content chunk
    (where pacing and disruptions happen; ``error_event`` gives the (object, event name) sent
    by the ``stream-error`` scenario), :meth:`note_usage` whenever a frame carried usage,
    and :meth:`finish` with the terminating bytes.
    """

    def __init__(
        self,
        ctx: Ctx,
        response: web.StreamResponse,
        framing: SseFraming | JsonArrayFraming,
        dumps: Callable[[Any], bytes],
        error_event: Optional[Callable[[], tuple[Any, Optional[str]]]],
    ) -> None:
        self.ctx = ctx
        self.response = response
        self.framing = framing
        self.dumps = dumps
        self.error_event = error_event
        self.content_sent = 0
        self._frames = 0
        self._buffer = bytearray()

    async def send(self, obj: Any, event: Optional[str] = None) -> None:
        await self._write(self.framing.frame(self.dumps(obj), event, self._frames == 0))
        self._frames += 1

    async def content(self, obj: Any, event: Optional[str] = None) -> None:
        sc = self.ctx.scenario
        if self.content_sent > 0 and sc.slow:
            await asyncio.sleep(sc.chunk_delay)
        if self.content_sent == sc.disruption_index:
            if sc.reset:
                self._sync_record()
                self.ctx.abort_transport()
                raise ConnectionDropped(self.response)
            if sc.stream_error and self.error_event is not None:
                obj, event_name = self.error_event()
                await self.finish(self.framing.frame(self.dumps(obj), event_name, self._frames == 0))
                raise ConnectionDropped(self.response)
            if sc.malformed:
                data = self.dumps(obj)
                await self._write(self.framing.frame(data[: len(data) // 2], event, self._frames == 0))
                self._frames += 1
        await self.send(obj, event)
        self.content_sent += 1

    def note_usage(self, usage: Optional[dict[str, Any]]) -> None:
        """Record the usage the stream has carried so far (the latest cumulative view)."""
        self.ctx.exchange.usage = usage

    async def finish(self, tail: bytes = b"") -> web.StreamResponse:
        """Write ``tail`` plus the framing's closing bytes and end the body.

        The exchange is marked complete before the last bytes leave, so a client that has
        read the whole stream always finds a finished record.
        """
        tail = tail + self.framing.closing
        ex = self.ctx.exchange
        self._buffer += tail
        self._sync_record()
        ex.complete = True
        ex.finished_at = time.time()
        try:
            if tail:
                await self.response.write(tail)
            await self.response.write_eof()
        except (ConnectionError, RuntimeError) as exc:
            ex.complete = False
            ex.error = f"client disconnected: {exc!r}"
            raise ConnectionDropped(self.response) from None
        return self.response

    async def _write(self, data: bytes) -> None:
        try:
            await self.response.write(data)
        except (ConnectionError, RuntimeError) as exc:
            ex = self.ctx.exchange
            ex.error = f"client disconnected: {exc!r}"
            self._sync_record()
            ex.finished_at = time.time()
            raise ConnectionDropped(self.response) from None
        self._buffer += data

    def _sync_record(self) -> None:
        body = bytes(self._buffer)
        self.ctx.exchange.response_body = body
        self.ctx.exchange.response_body_decoded = body
