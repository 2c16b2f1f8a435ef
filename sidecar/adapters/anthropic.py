"""The Anthropic Messages wire format: messages as JSON or SSE, and count_tokens (recorded, free)."""
from __future__ import annotations

from typing import Any

import orjson

from ledger.records import CallInfo, Observation, Usage

from .base import (
    JsonObserver,
    Observer,
    SseObserver,
    dig,
    error_observation,
    estimate_tokens,
    int_or_none,
    is_sse,
    number_or_none,
)


def describe(provider: str, path: str, body: Any, raw: bytes = b"") -> CallInfo:
    if path.endswith("/messages/count_tokens"):
        operation = "count_tokens"
    elif path.endswith("/messages"):
        operation = "chat"
    elif path.endswith("/complete"):
        operation = "text_completion"
    else:
        operation = "other"
    info = CallInfo(provider=provider, operation=operation, endpoint=path,
                    input_estimate=estimate_tokens(len(raw)),
                    priced=operation in ("chat", "text_completion"))
    if isinstance(body, dict):
        model = body.get("model")
        info.request_model = model if isinstance(model, str) else None
        info.stream = body.get("stream") is True
        info.max_output_tokens = int_or_none(body.get("max_tokens") or body.get("max_tokens_to_sample"))
        info.temperature = number_or_none(body.get("temperature"))
        info.top_p = number_or_none(body.get("top_p"))
        user = dig(body, "metadata", "user_id")
        info.user_id = user if isinstance(user, str) else None
    return info


def prepare(info: CallInfo, body: Any) -> bytes | None:
    return None  # Anthropic always streams usage


def observe(info: CallInfo, status: int, content_type: str, rewritten: bool) -> Observer:
    if status >= 400:
        return JsonObserver(error_observation)
    if is_sse(content_type):
        return MessageStream()
    if info.operation == "count_tokens":
        return JsonObserver(_count_observation)
    return JsonObserver(_message_observation)


def error_body(status: int, message: str, kind: str) -> bytes:
    # Anthropic's error types are a fixed set; ours map onto the nearest
    kind = {429: "rate_limit_error", 504: "timeout_error"}.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


_COUNTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
_CACHE_SPLIT = (("ephemeral_5m_input_tokens", "cache_write_5m_tokens"),
                ("ephemeral_1h_input_tokens", "cache_write_1h_tokens"))


def merge_usage(acc: dict[str, Any], u: Any) -> None:
    """Folds an Anthropic `usage` object into `acc`; values seen later (message_delta) replace earlier."""
    if not isinstance(u, dict):
        return
    for key in _COUNTS:
        value = int_or_none(u.get(key))
        if value is not None:
            acc[key] = value
    for key, name in _CACHE_SPLIT:
        value = int_or_none(dig(u, "cache_creation", key))
        if value is not None:
            acc[name] = value
    searches = int_or_none(dig(u, "server_tool_use", "web_search_requests"))
    if searches is not None:
        acc["web_searches"] = searches
    if isinstance(u.get("service_tier"), str):
        acc["service_tier"] = u["service_tier"]
    thinking = int_or_none(dig(u, "output_tokens_details", "thinking_tokens"))
    if thinking is not None:
        acc["thinking_tokens"] = thinking  # part of output_tokens


def anthropic_usage(acc: dict[str, Any]) -> Usage:
    """Anthropic reports cache tokens beside `input_tokens`; ours count them inside."""
    uncached = acc.get("input_tokens")
    write = acc.get("cache_creation_input_tokens")
    read = acc.get("cache_read_input_tokens")
    total = None if uncached is None and write is None and read is None else (uncached or 0) + (write or 0) + (read or 0)
    units = {name: acc[name] for name in ("cache_write_5m_tokens", "cache_write_1h_tokens", "web_searches")
             if acc.get(name)}
    return Usage(input_tokens=total, output_tokens=acc.get("output_tokens"),
                 cache_read_tokens=read, cache_write_tokens=write, reasoning_tokens=acc.get("thinking_tokens"),
                 units=units)


def _message_observation(doc: Any) -> Observation:
    acc: dict[str, int] = {}
    merge_usage(acc, doc.get("usage"))
    seen = Observation(usage=anthropic_usage(acc), response_model=doc.get("model"),
                       response_id=doc.get("id"), finish_reason=doc.get("stop_reason"),
                       service_tier=acc.get("service_tier"))
    if seen.usage.is_empty():
        seen.anomaly = "no_usage"
    return seen


def _count_observation(doc: Any) -> Observation:
    counted = int_or_none(doc.get("input_tokens"))
    # counting is free and consumes nothing: the count is kept as a unit, not as input tokens
    return Observation(usage=Usage(units={"counted_tokens": counted} if counted is not None else {}))


class MessageStream(SseObserver):
    """`message_start` carries the first usage; each `message_delta` carries cumulative values."""

    def __init__(self) -> None:
        super().__init__()
        self.acc: dict[str, int] = {}

    def on_event(self, name: str | None, doc: Any) -> None:
        kind = doc.get("type") or name
        seen = self.seen
        if kind == "message_start":
            message = doc.get("message") or {}
            seen.response_id = message.get("id")
            seen.response_model = message.get("model")
            merge_usage(self.acc, message.get("usage"))
        elif kind == "message_delta":
            merge_usage(self.acc, doc.get("usage"))
            reason = dig(doc, "delta", "stop_reason")
            if reason:
                seen.finish_reason = reason
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            seen.error_type = dig(doc, "error", "type") or "error"

    def finish(self) -> Observation:
        self.seen.usage = anthropic_usage(self.acc)
        self.seen.service_tier = self.acc.get("service_tier")
        return super().finish()
