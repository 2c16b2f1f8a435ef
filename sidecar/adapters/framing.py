"""Incremental framing of response bodies: whole JSON bodies, SSE events and streamed JSON arrays.

Observers are fed bytes as they pass; these splitters turn them into the units a provider's
observer reads (one JSON document, one SSE event, one array element) without holding a whole
stream in memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# A non-streamed body larger than this is forwarded but not parsed (counted as an anomaly).
MAX_JSON_BODY = 64 * 1024 * 1024
# One SSE event or one streamed array element longer than this stops the metering of its call (the
# bytes still pass): real events are a few KB, and an event that never ends must not fill memory.
MAX_EVENT = 4 * 1024 * 1024


class JsonBody:
    """Collects a non-streamed body so it can be parsed once it ends."""

    __slots__ = ("parts", "size", "overflow")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.overflow = False

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > MAX_JSON_BODY:
            self.overflow = True
            self.parts.clear()
        elif not self.overflow:
            self.parts.append(chunk)

    def body(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


@dataclass(slots=True)
class SseEvent:
    event: str | None  # the `event:` field, None when absent
    data: bytes  # the `data:` lines joined by newlines
    raw: bytes  # the event's bytes as received, blank-line terminator included


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SseSplitter:
    """Splits an SSE byte stream into events; keeps only the incomplete tail between feeds.

    Linear in the bytes fed: the tail grows in place and is searched only where it was not yet
    (less the 3 bytes an end split across feeds can start in). An event longer than MAX_EVENT
    stops the splitter (`overflow`): it drops what it held and yields nothing more.
    """

    __slots__ = ("tail", "scan", "overflow")

    def __init__(self) -> None:
        self.tail = bytearray()
        self.scan = 0  # how far `tail` has been searched for an event's end
        self.overflow = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if self.overflow:
            return []
        tail = self.tail
        if tail:
            tail += chunk
            buf: bytes | bytearray = tail
            pos = self.scan - 3 if self.scan > 3 else 0
        else:
            buf, pos = chunk, 0  # the usual case: whole events in one chunk, nothing copied
        events: list[SseEvent] = []
        start = 0
        for m in _EVENT_END.finditer(buf, pos):
            end = m.end()
            events.append(parse_event(bytes(buf[start:end]) if buf is tail else buf[start:end]))
            start = end
        if buf is tail:
            del tail[:start]  # cheap from the front of a bytearray
        elif start < len(chunk):
            tail += memoryview(chunk)[start:]
        self.scan = len(tail)
        if len(tail) > MAX_EVENT:
            self.overflow = True
            self.tail = bytearray()
            self.scan = 0
        return events

    def held(self) -> bytes:
        """The bytes of the incomplete event held so far."""
        return bytes(self.tail)

    def flush(self) -> SseEvent | None:
        """The last event when the stream ended without a blank line, if any."""
        if self.overflow or not self.tail.strip():
            return None
        raw, self.tail, self.scan = bytes(self.tail), bytearray(), 0
        return parse_event(raw)


def parse_event(raw: bytes) -> SseEvent:
    event: str | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
    return SseEvent(event, b"\n".join(data), raw)


_ARRAY_TOKEN = re.compile(rb'[{}"\\]')


class JsonArraySplitter:
    """Yields each top-level object of a JSON array streamed element by element (`[{..},\\r\\n{..}]`).

    Only the open element is kept between feeds, in a buffer that grows in place and is scanned
    once; an element longer than MAX_EVENT stops the splitter (`overflow`).
    """

    __slots__ = ("buf", "pos", "depth", "in_string", "escape_at", "obj_start", "overflow")

    def __init__(self) -> None:
        self.buf = bytearray()  # the open element's bytes (empty between elements)
        self.pos = 0  # how far `buf` has been scanned
        self.depth = 0
        self.in_string = False
        self.escape_at = -1  # offset in `buf` of a byte escaped by a backslash
        self.obj_start = -1
        self.overflow = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.overflow:
            return []
        held = self.buf
        if self.obj_start < 0:
            # between elements nothing needs keeping
            buf: bytes | bytearray = chunk
            pos = 0
            self.escape_at = -1
        else:
            held += chunk
            buf, pos = held, self.pos
        out: list[bytes] = []
        for m in _ARRAY_TOKEN.finditer(buf, pos):
            i = m.start()
            c = buf[i]
            if self.in_string:
                if i == self.escape_at:
                    continue
                if c == 0x5C:  # backslash: the next byte is escaped
                    self.escape_at = i + 1
                elif c == 0x22:
                    self.in_string = False
                continue
            if c == 0x22:
                self.in_string = True
            elif c == 0x7B:
                if self.depth == 0:
                    self.obj_start = i
                self.depth += 1
            elif c == 0x7D:
                self.depth -= 1
                if self.depth == 0 and self.obj_start >= 0:
                    out.append(bytes(buf[self.obj_start : i + 1]))
                    self.obj_start = -1
        if self.obj_start >= 0:
            # keep only the open element
            if buf is held:
                del held[: self.obj_start]
            else:
                held[:] = memoryview(chunk)[self.obj_start :]
            self.escape_at -= self.obj_start
            self.obj_start = 0
            self.pos = len(held)
            if len(held) > MAX_EVENT:
                self.overflow = True
                self.buf = bytearray()
        else:
            del held[:]
            self.pos = 0
        return out
