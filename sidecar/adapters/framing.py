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
    """Splits an SSE byte stream into events; keeps only the incomplete tail between feeds."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buf = self.tail + chunk if self.tail else chunk
        events: list[SseEvent] = []
        start = 0
        for m in _EVENT_END.finditer(buf):
            raw = buf[start : m.end()]
            events.append(parse_event(raw))
            start = m.end()
        self.tail = buf[start:]
        return events

    def flush(self) -> SseEvent | None:
        """The last event when the stream ended without a blank line, if any."""
        if not self.tail.strip():
            return None
        raw, self.tail = self.tail, b""
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
    """Yields each top-level object of a JSON array streamed element by element (`[{..},\\r\\n{..}]`)."""

    __slots__ = ("buf", "pos", "depth", "in_string", "escape_at", "obj_start")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0  # how far `buf` has been scanned
        self.depth = 0
        self.in_string = False
        self.escape_at = -1  # offset in `buf` of a byte escaped by a backslash
        self.obj_start = -1

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.obj_start < 0:
            # between elements nothing needs keeping
            self.buf, self.pos, self.escape_at = chunk, 0, -1
        else:
            self.buf += chunk
        out: list[bytes] = []
        buf = self.buf
        for m in _ARRAY_TOKEN.finditer(buf, self.pos):
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
                    out.append(buf[self.obj_start : i + 1])
                    self.obj_start = -1
        if self.obj_start >= 0:
            # keep only the open element
            self.buf = buf[self.obj_start :]
            self.pos = len(self.buf)
            self.escape_at -= self.obj_start
            self.obj_start = 0
        else:
            self.buf, self.pos = b"", 0
        return out
