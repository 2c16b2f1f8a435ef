"""Hostile or broken upstream bodies, chosen with ``x-fake-hostile``: gzip bombs, an SSE event that
never ends, a body that is not the gzip it claims to be.

Kinds (the value of the header):

- ``gzip-bomb-stream``: an OpenAI chat SSE stream, ``Content-Encoding: gzip``, about 512 KB on the
  wire that inflates to about 512 MB: one chunk event, then one event of 512 MB.
- ``gzip-bomb-events``: the same, about 2 MB on the wire, inflating to 512 MB of well-formed chunk
  events (2.5 million of them).
- ``gzip-bomb-json``: a non-streamed chat completion, ``Content-Encoding: gzip``, about 2 MB on the
  wire that inflates to about 2 GB (one huge ``content`` string).
- ``endless-event``: an OpenAI chat SSE stream whose second event is ``x-fake-hostile-mb`` MB long
  (default 48), sent in 64 KB writes; the stream pauses ``x-fake-hostile-pause-ms`` (default 500)
  before the event finally ends and ``[DONE]`` follows.
- ``bad-gzip``: a non-streamed chat completion that says gzip but is not.

``x-fake-hostile-pace-ms`` pauses between the 64 KB writes of a bomb (default 0), so that the
bomb lasts long enough for a test to make calls meanwhile.

The bombs are built once per process (by repeating one fully flushed deflate block) and are
deterministic, so a test can call :func:`body` (or :func:`endless_event_bytes`) to learn what the
fake sends. The exchange records the bomb bytes as sent (``response_body``), never the inflated body;
for the endless event it records nothing.
"""
from __future__ import annotations

import asyncio
import functools
import struct
import time
import zlib

from aiohttp import web

from .records import Exchange

HEADER = "x-fake-hostile"
SIZE_HEADER = "x-fake-hostile-mb"
PAUSE_HEADER = "x-fake-hostile-pause-ms"
PACE_HEADER = "x-fake-hostile-pace-ms"  # a pause between the 64 KB writes of a streamed bomb
KINDS = ("gzip-bomb-stream", "gzip-bomb-events", "gzip-bomb-json", "endless-event", "bad-gzip")

_CHUNK = (b'data: {"id":"chatcmpl-bomb","object":"chat.completion.chunk","created":1700000000,'
          b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":"boom"},'
          b'"logprobs":null,"finish_reason":null}]}\n\n')
_MB = 1 << 20


def _gzip_repeating(prefix: bytes, block: bytes, times: int, suffix: bytes) -> bytes:
    """gzip of prefix + block * times + suffix, without compressing the repetitions one by one:
    after a full flush a deflate stream restarts from nothing, so one compressed block can be repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    c2 = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    unit = c2.compress(block) + c2.flush(zlib.Z_FULL_FLUSH)
    c3 = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    tail = c3.compress(suffix) + c3.flush(zlib.Z_FINISH)
    crc = zlib.crc32(prefix)
    for _ in range(times):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(suffix, crc)
    size = (len(prefix) + len(block) * times + len(suffix)) & 0xFFFFFFFF
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + head + unit * times + tail
            + struct.pack("<II", crc & 0xFFFFFFFF, size))


@functools.cache
def body(kind: str) -> bytes:
    """The bytes the fake sends for a bomb kind (compressed, as on the wire)."""
    if kind == "gzip-bomb-stream":
        # one real chunk, then an event that inflates to 512 MB: deflate's best ratio, ~1000:1
        first = _CHUNK.replace(b'"boom"', b'"start"')
        return _gzip_repeating(first + b'data: {"id":"chatcmpl-bomb","choices":[{"delta":{"content":"',
                               b"a" * _MB, 512, b'"}}]}\n\ndata: [DONE]\n\n')
    if kind == "gzip-bomb-events":
        # well-formed chunk events, about 250:1
        return _gzip_repeating(b"", _CHUNK * (_MB // len(_CHUNK)), 512, b"data: [DONE]\n\n")
    if kind == "gzip-bomb-json":
        prefix = (b'{"id":"chatcmpl-bomb","object":"chat.completion","created":1700000000,'
                  b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"')
        suffix = (b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,'
                  b'"total_tokens":12}}')
        return _gzip_repeating(prefix, b"A" * _MB, 2048, suffix)
    if kind == "bad-gzip":
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + b"this is not deflate data at all" * 20
    raise ValueError(f"no fixed body for {kind!r}")


def endless_event(mb: int) -> tuple[bytes, bytes, bytes]:
    """(what comes before the long event's filler, one 64 KB filler piece, what ends the stream)."""
    first = (b'data: {"id":"chatcmpl-endless","object":"chat.completion.chunk","created":1700000000,'
             b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
             b'"finish_reason":null}],"usage":null}\n\n'
             b'data: {"id":"chatcmpl-endless","object":"chat.completion.chunk","created":1700000000,'
             b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":"')
    end = b'"},"finish_reason":"stop"}],"usage":null}\n\ndata: [DONE]\n\n'
    return first, b"a" * (64 * 1024), end


def endless_event_bytes(mb: int) -> bytes:
    """Everything the endless-event stream sends, for tests to compare with what they got."""
    first, piece, end = endless_event(mb)
    return first + piece * (mb * 16) + end


async def respond(request: web.Request, exchange: Exchange, kind: str, headers: dict[str, str]) -> web.StreamResponse:
    """Answers a request that asked for a hostile body."""
    common = {"x-request-id": f"req_hostile_{exchange.seq}"}
    if kind == "bad-gzip":
        data = body(kind)
        response = web.Response(body=data, status=200, headers={
            **common, "Content-Type": "application/json", "Content-Encoding": "gzip"})
        _record(exchange, 200, dict(response.headers), data)
        return response
    if kind not in KINDS:
        return web.Response(status=400, text=f"fake provider: unknown {HEADER} {kind!r}")
    stream_headers = {**common, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    if kind.startswith("gzip-bomb"):
        stream_headers["Content-Encoding"] = "gzip"
    if kind == "gzip-bomb-json":  # a whole body, with its length, written in paced pieces
        stream_headers.update({"Content-Type": "application/json", "Content-Length": str(len(body(kind)))})
    response = web.StreamResponse(status=200, headers=stream_headers)
    await response.prepare(request)
    exchange.status = 200
    exchange.response_headers = {k.lower(): v for k, v in response.headers.items()}
    sent = bytearray()
    try:
        if kind.startswith("gzip-bomb"):
            data = body(kind)
            pace = float(headers.get(PACE_HEADER, "0")) / 1000
            for i in range(0, len(data), 64 * 1024):
                if i and pace:
                    await asyncio.sleep(pace)
                await response.write(data[i:i + 64 * 1024])
                sent += data[i:i + 64 * 1024]
        else:
            mb = int(headers.get(SIZE_HEADER, "48"))
            pause = float(headers.get(PAUSE_HEADER, "500")) / 1000
            first, piece, end = endless_event(mb)
            # not kept (growing a 48 MB buffer would stall the test process): endless_event_bytes() says it
            await response.write(first)
            for _ in range(mb * 16):
                await response.write(piece)
            await asyncio.sleep(pause)
            await response.write(end)
        _record(exchange, 200, exchange.response_headers, bytes(sent))
        await response.write_eof()
    except (ConnectionError, RuntimeError) as exc:
        exchange.error = f"client disconnected: {exc!r}"
        exchange.response_body = bytes(sent)
        exchange.finished_at = time.time()
    return response


def _record(exchange: Exchange, status: int, headers: dict[str, str], sent: bytes) -> None:
    exchange.status = status
    exchange.response_headers = {k.lower(): v for k, v in headers.items()}
    exchange.response_body = sent
    exchange.response_body_decoded = b""  # never inflated here: that is the point
    exchange.complete = True
    exchange.finished_at = time.time()
