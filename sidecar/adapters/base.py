"""The adapter contract: what every wire-format module provides, and the observers they share.

An adapter module exposes four functions:

- `describe(provider, path, body, raw) -> CallInfo` reads the request (body is the parsed JSON or
  None; raw the bytes, for sizes and multipart forms);
- `prepare(info, body) -> bytes | None` may rewrite the request body (None: forward unchanged);
  a rewrite also means the response must be rewritten back (`observe(..., rewritten=True)`);
- `observe(info, status, content_type, rewritten) -> Observer` watches the response;
- `error_body(status, message, kind) -> bytes` renders an error in the provider's own shape.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import orjson

from ledger.records import CallInfo, Observation

from .framing import JsonBody, SseEvent, SseSplitter


class Observer(Protocol):
    def feed(self, chunk: bytes) -> bytes:
        """Reads response bytes as they pass; returns the bytes the app should get."""

    def finish(self) -> Observation:
        """Called once when the response ended (or broke off); says what was seen."""

    def leftover(self) -> bytes:
        """At the end of the body: bytes fed but not yet returned (a rewriting observer holds an
        incomplete event); the app gets them last."""

    # True once the body has said it is complete (SSE: `[DONE]`, `message_stop`, ...), which SDKs
    # take as the end of the call, sometimes before the HTTP body itself has ended
    done: bool


class Adapter(Protocol):
    def describe(self, provider: str, path: str, body: Any, raw: bytes = b"") -> CallInfo: ...
    def prepare(self, info: CallInfo, body: Any) -> bytes | None: ...
    def observe(self, info: CallInfo, status: int, content_type: str, rewritten: bool) -> Observer: ...
    def error_body(self, status: int, message: str, kind: str) -> bytes: ...


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def dig(doc: Any, *keys: str) -> Any:
    """doc[k1][k2]... or None where any step is missing or not a dict."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def estimate_tokens(size_bytes: int) -> int:
    """A cheap upper-leaning guess of a request's input tokens from its size (about 4 bytes a token)."""
    return size_bytes // 4 + 1


def is_sse(content_type: str) -> bool:
    return content_type.startswith("text/event-stream")


def error_type_of(doc: Any) -> str | None:
    """The error type in any of the providers' error shapes."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        for key in ("type", "status", "code"):
            value = err.get(key)
            if isinstance(value, str) and value:
                return value
        code = err.get("code")
        if isinstance(code, int):
            return str(code)
    elif isinstance(err, str):
        return err
    return None


class JsonObserver:
    """Collects a whole JSON body and extracts an Observation from it at the end."""

    __slots__ = ("body", "extract")
    done = False  # the end of the body is the end of the call

    def __init__(self, extract: Callable[[Any], Observation]) -> None:
        self.body = JsonBody()
        self.extract = extract

    def feed(self, chunk: bytes) -> bytes:
        self.body.feed(chunk)
        return chunk

    def leftover(self) -> bytes:
        return b""

    def finish(self) -> Observation:
        if self.body.overflow:
            return Observation(anomaly="body_too_large")
        raw = self.body.body()
        if not raw:
            return Observation(anomaly="empty_body")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Observation(anomaly="malformed_json")
        try:
            return self.extract(doc)
        except (TypeError, ValueError, AttributeError, KeyError):
            return Observation(anomaly="unexpected_shape")


def error_observation(doc: Any) -> Observation:
    return Observation(error_type=error_type_of(doc))


class SseObserver:
    """Splits an SSE stream into events and hands each to `on_event`; subclasses keep the state
    and set `done` on the stream's closing event."""

    def __init__(self) -> None:
        self.splitter = SseSplitter()
        self.seen = Observation()
        self.bad_events = 0
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        for event in self.splitter.feed(chunk):
            self._handle(event)
        return chunk

    def _handle(self, event: SseEvent) -> None:
        if not event.data:
            return
        if event.data == b"[DONE]":
            self.done = True
            return
        try:
            doc = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            self.bad_events += 1
            return
        try:
            self.on_event(event.event, doc)
        except (TypeError, ValueError, AttributeError, KeyError):
            self.bad_events += 1

    def on_event(self, name: str | None, doc: Any) -> None:
        raise NotImplementedError

    def leftover(self) -> bytes:
        return b""

    def finish(self) -> Observation:
        last = self.splitter.flush()
        if last is not None:
            self._handle(last)
        seen = self.seen
        if self.splitter.overflow:
            seen.anomaly = "event_too_large"  # metering stopped there; the app still got every byte
        elif self.bad_events and seen.anomaly is None:
            seen.anomaly = "malformed_event"
        elif seen.usage.is_empty() and seen.anomaly is None:
            seen.anomaly = "no_usage"
        return seen

