"""Small types shared by the translators: refusals, dropped-field lists, stop-reason tables."""

from __future__ import annotations

from typing import Mapping


class TranslateError(Exception):
    """A request that must be refused (usually 400): dropping the field would change the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# Names of request fields a translator could not carry over; joined into `x-meterline-dropped`.
Dropped = list[str]


def dropped_header(dropped: Dropped) -> str:
    """The `x-meterline-dropped` header value: field names in order, once each."""
    return ",".join(dict.fromkeys(dropped))


def map_stop(table: Mapping[str, str], reason: str | None, unknown: str = "error") -> str | None:
    """Look a stop reason up in an explicit table. An unknown reason never becomes a clean
    `stop` (envoyproxy/ai-gateway#2118): it maps to `unknown` so the client sees something is off.
    None (no reason yet) stays None."""
    if reason is None:
        return None
    return table.get(reason, unknown)


class SseData:
    """Incremental SSE reader for stream translators: bytes in, split anywhere (LF or CRLF line
    ends), the `data:` payload of each complete event out. Keeps only the unfinished line and
    the data lines of the event being read between feeds."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                self._data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif not line and self._data:
                out.append(b"\n".join(self._data))
                self._data = []
        self._buf = buf[start:]
        return out

    @property
    def pending(self) -> bool:
        """An event begun and not yet ended by its blank line (or a line not yet whole)."""
        return bool(self._buf or self._data)
