"""Small types shared by the translators: refusals, dropped-field lists, stop-reason tables."""

from __future__ import annotations

from typing import Any, Mapping


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


def openai_error(status: int, kind: str | None, message: str, table: Mapping[str, tuple[int, str]],
                 own_type: str = "") -> tuple[int, dict[str, Any]]:
    """An upstream's error as (status, OpenAI error body). `kind` is the upstream's own error type,
    looked up in `table` (-> status, OpenAI type); a kind the table lacks keeps its status and gets
    `own_type`, and a 2xx/3xx carrying an error becomes 502. `kind` None: the body was not in the
    upstream's documented shape and `message` is its text, passed on rather than lost."""
    if kind is None:
        new_status, new_type = (status if status >= 400 else 502), "upstream_error"
    else:
        new_status, new_type = table.get(kind, (status, own_type))
        if kind not in table and status < 400:
            new_status = 502
    return new_status, {"error": {"message": message, "type": new_type, "param": None, "code": kind}}


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
