"""Records of the requests a fake provider handled (``FakeProvider.exchanges``), JSON round-trippable."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Optional
from urllib.parse import parse_qs


@dataclass
class Exchange:
    """One HTTP request handled by the fake and what it answered.

    ``response_body`` holds the exact bytes sent as the HTTP body (for streams: every chunk
    written, concatenated; for ``gzip``: the compressed bytes); ``response_body_decoded`` holds
    them before any Content-Encoding. ``usage`` is the usage the response carried on the wire,
    in the provider's own convention (the final/cumulative view for streams; ``None`` when the
    response carried none), while ``computed_usage`` is what the fake would report for the
    request whether or not it was sent.
    """

    seq: int
    method: str
    path: str
    query_string: str
    request_headers: dict[str, str]
    request_body: bytes
    request_json: Any = None
    provider: Optional[str] = None  # "openai" | "anthropic" | "gemini"
    endpoint: Optional[str] = None  # e.g. "chat.completions", "messages", "streamGenerateContent"
    scenario: tuple[str, ...] = ()
    api_key: Optional[str] = None
    model: Optional[str] = None  # as requested
    response_model: Optional[str] = None  # as reported (dated snapshot)
    response_id: Optional[str] = None
    stream: bool = False
    status: Optional[int] = None  # None when the connection was closed without a response
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""
    response_body_decoded: bytes = b""
    usage: Optional[dict[str, Any]] = None
    computed_usage: Optional[dict[str, Any]] = None
    complete: bool = False  # the whole response was handed to the transport
    aborted: bool = False  # the fake reset the connection on purpose
    error: Optional[str] = None  # e.g. the client went away mid-stream
    started_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.query_string, keep_blank_values=True).items()}

    def response_json(self) -> Any:
        """The decoded response body parsed as JSON (raises for streams and malformed bodies)."""
        return json.loads(self.response_body_decoded)

    def sse_events(self) -> list[tuple[Optional[str], str]]:
        """The (event name, data) pairs of an SSE response body, in order."""
        text = self.response_body_decoded.decode("utf-8").replace("\r\n", "\n")
        events: list[tuple[Optional[str], str]] = []
        for block in text.split("\n\n"):
            name: Optional[str] = None
            data: list[str] = []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    name = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    data.append(line[len("data:") :].lstrip(" "))
            if name is not None or data:
                events.append((name, "\n".join(data)))
        return events

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (bytes as base64), used by the ``/_fake/exchanges`` endpoint."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode("ascii")
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Exchange":
        kwargs = dict(data)
        for name in ("request_body", "response_body", "response_body_decoded"):
            kwargs[name] = base64.b64decode(kwargs.get(name) or "")
        kwargs["scenario"] = tuple(kwargs.get("scenario") or ())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in known})


class ExchangeLog:
    """Thread-safe, append-only list of exchanges (the server may run in another thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Exchange] = []
        self._next_seq = 1

    def begin(self, **kwargs: Any) -> Exchange:
        with self._lock:
            exchange = Exchange(seq=self._next_seq, **kwargs)
            self._next_seq += 1
            self._items.append(exchange)
            return exchange

    def snapshot(self) -> list[Exchange]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def pending(self) -> int:
        with self._lock:
            return sum(1 for e in self._items if not e.done)


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip (mtime 0) so recorded and sent bytes are reproducible."""
    return gzip.compress(data, mtime=0)
