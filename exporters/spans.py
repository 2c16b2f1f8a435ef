"""One OTLP span per call, encoded from its CallRecord (and CallExtras) straight to protobuf bytes, in batches.

No OpenTelemetry SDK objects are involved: ids and times come from the record. The parts that
are the same for many calls (name, kind, status and the attributes that depend only on
provider, model, app, outcome...) are encoded once and reused from a bounded cache; the
resource and scope are encoded once per encoder. `request()` wraps a batch of encoded spans
into one ExportTraceServiceRequest.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from decimal import Decimal

from ledger.records import OK, CallExtras, CallRecord

from . import protowire as pw
from . import resource, semconv
from .settings import TelemetrySettings

log = logging.getLogger("meterline.telemetry")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CACHE_LIMIT = 4096  # entries per cache; a cache that fills is emptied and starts again

# Span fields (opentelemetry/proto/trace/v1/trace.proto)
_TRACE_ID = pw.tag(1, pw.WIRE_LEN) + b"\x10"  # always 16 bytes
_SPAN_ID = pw.tag(2, pw.WIRE_LEN) + b"\x08"  # always 8 bytes
_TRACE_STATE = pw.tag(3, pw.WIRE_LEN)
_PARENT_SPAN_ID = pw.tag(4, pw.WIRE_LEN) + b"\x08"
_NAME = pw.tag(5, pw.WIRE_LEN)
_KIND_CLIENT = pw.tag(6, pw.WIRE_VARINT) + pw.varint(3)
_START = pw.tag(7, pw.WIRE_FIXED64)
_END = pw.tag(8, pw.WIRE_FIXED64)
_EVENT = pw.tag(11, pw.WIRE_LEN)
_STATUS = pw.tag(15, pw.WIRE_LEN)
_FLAGS = pw.tag(16, pw.WIRE_FIXED32)
# Span.Event and Status fields
_EVENT_TIME = pw.tag(1, pw.WIRE_FIXED64)
_EVENT_NAME = pw.tag(2, pw.WIRE_LEN)
_STATUS_MESSAGE = pw.tag(2, pw.WIRE_LEN)
_STATUS_CODE_ERROR = pw.tag(3, pw.WIRE_VARINT) + pw.varint(2)
# containers
_SCOPE_SPANS_SPAN = pw.tag(2, pw.WIRE_LEN)
_FIRST_FIELD = pw.tag(1, pw.WIRE_LEN)  # ExportTraceServiceRequest.resource_spans, ResourceSpans.resource, ScopeSpans.scope
_RESOURCE_SPANS_SCOPE_SPANS = pw.tag(2, pw.WIRE_LEN)

# trace flags: sampled; the W3C context's is-remote bit is known; the parent is remote (the app)
_SAMPLED = 0x01
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_FLAGS_ROOT = _FLAGS + pw.fixed32(_SAMPLED | _HAS_IS_REMOTE)
_FLAGS_REMOTE_PARENT = _FLAGS + pw.fixed32(_SAMPLED | _HAS_IS_REMOTE | _IS_REMOTE)


def unix_nanos(moment: datetime) -> int:
    """Exact nanoseconds since the epoch of a timezone-aware datetime."""
    delta = moment - _EPOCH
    return ((delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1000


class SpanEncoder:
    """Turns (CallRecord, CallExtras) pairs into encoded spans; not thread-safe (one exporter thread uses it)."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.names = settings.names
        self.capture_content = settings.capture_content
        self.content_max_bytes = settings.content_max_bytes
        self._attr = pw.AttributeWriter(9)  # Span.attributes
        self._event_attr = pw.AttributeWriter(3)  # Span.Event.attributes
        self._common: dict[tuple, bytes] = {}
        self._strings: dict[tuple[str, str], bytes] = {}
        self._tag_keys: dict[str, str] = {}
        self._resource_field = pw.length_delimited(_FIRST_FIELD, resource.resource(settings).SerializeToString())
        self._scope_field = pw.length_delimited(_FIRST_FIELD, resource.scope().SerializeToString())
        self.invalid = 0  # records that could not be spans (no valid trace or span id, or bad values)

    # --- a batch ---------------------------------------------------------------------------------

    def encode_all(self, items: Iterable[tuple[CallRecord, CallExtras | None]]) -> list[bytes]:
        """The encoded spans of the items that can be spans; a bad record costs its own span only."""
        out = []
        for record, extras in items:
            try:
                span = self.encode(record, extras)
            except Exception:  # noqa: BLE001 - e.g. a value of a type no attribute can hold
                if not self.invalid:
                    log.exception("call %s cannot be encoded as a span; skipped (logged once)", record.call_id)
                self.invalid += 1
                continue
            if span is not None:
                out.append(span)
        return out

    def request(self, spans: list[bytes]) -> bytes:
        """An ExportTraceServiceRequest holding the encoded spans under one resource and scope."""
        scope_spans = self._scope_field + b"".join(spans)
        resource_spans = self._resource_field + pw.length_delimited(_RESOURCE_SPANS_SCOPE_SPANS, scope_spans)
        return pw.length_delimited(_FIRST_FIELD, resource_spans)

    # --- one span --------------------------------------------------------------------------------

    def encode(self, r: CallRecord, x: CallExtras | None) -> bytes | None:
        """The span as a ScopeSpans.spans field, or None when the record has no valid trace context."""
        parent = None
        try:
            trace_id = bytes.fromhex(r.trace_id or "")
            span_id = bytes.fromhex(r.span_id or "")
            if x is not None and x.parent_span_id:
                parent = bytes.fromhex(x.parent_span_id)
        except ValueError:
            trace_id = span_id = b""
        if len(trace_id) != 16 or len(span_id) != 8 or (parent is not None and len(parent) != 8):
            self.invalid += 1
            return None
        start = unix_nanos(r.started_at)
        if r.ended_at is not None:
            end = unix_nanos(r.ended_at)
        elif r.duration_ms is not None:
            end = start + int(r.duration_ms * 1_000_000)
        else:
            end = start  # interrupted before it ended: a zero-length span that still shows the call

        n = self.names
        a = self._attr
        parts = [_TRACE_ID, trace_id, _SPAN_ID, span_id]
        if parent is not None:
            parts += (_PARENT_SPAN_ID, parent, _FLAGS_REMOTE_PARENT)
        else:
            parts.append(_FLAGS_ROOT)
        if x is not None and x.tracestate:
            parts.append(pw.length_delimited(_TRACE_STATE, x.tracestate.encode()))
        parts += (_START, pw.fixed64(start), _END, pw.fixed64(end), self._common_part(r, x))

        parts.append(a.string(n.call_id, r.call_id))
        if r.response_id is not None:
            parts.append(a.string(n.response_id, r.response_id))
        if r.input_tokens is not None:
            parts.append(a.integer(n.input_tokens, r.input_tokens))
        if r.output_tokens is not None:
            parts.append(a.integer(n.output_tokens, r.output_tokens))
        if r.cache_read_tokens is not None:
            parts.append(a.integer(n.cache_read_tokens, r.cache_read_tokens))
        if r.cache_write_tokens is not None:
            parts.append(a.integer(n.cache_write_tokens, r.cache_write_tokens))
        if r.reasoning_tokens is not None:
            parts.append(a.integer(n.reasoning_tokens, r.reasoning_tokens))
        if r.ttft_ms is not None:
            parts.append(a.float(n.time_to_first_chunk, r.ttft_ms / 1000.0))
        if r.cost_usd is not None:
            parts.append(a.float(n.cost_usd, float(r.cost_usd)))
            parts.append(a.string(n.cost_usd_exact, _decimal_text(r.cost_usd)))
        if r.user_id is not None:
            parts.append(self._string(n.user, r.user_id))
        if r.key_fingerprint is not None:
            parts.append(self._string(n.key_fingerprint, r.key_fingerprint))
        if r.tags:
            for key, value in r.tags.items():
                parts.append(self._string(self._tag_key(key), value))
        if x is not None:
            if x.attributes:
                for key, value in x.attributes.items():
                    parts.append(a.any(key, value))
            if x.events:
                for name, when, attributes in x.events:
                    parts.append(self._event(name, when, attributes))
            if self.capture_content and (x.input_messages or x.output_messages):
                parts += self._content(x)
        return pw.length_delimited(_SCOPE_SPANS_SPAN, b"".join(parts))

    def _common_part(self, r: CallRecord, x: CallExtras | None) -> bytes:
        """Name, kind, status and the attributes that repeat across calls, encoded once per combination."""
        if x is not None:
            key = (r.operation, r.provider, r.request_model, r.response_model, r.stream, r.status_code, r.outcome,
                   r.error_type, r.finish_reason, r.app, r.upstream, r.price_source, r.anomaly,
                   x.server_address, x.server_port, x.temperature, x.top_p, x.max_output_tokens)
        else:
            key = (r.operation, r.provider, r.request_model, r.response_model, r.stream, r.status_code, r.outcome,
                   r.error_type, r.finish_reason, r.app, r.upstream, r.price_source, r.anomaly)
        found = self._common.get(key)
        if found is None:
            if len(self._common) >= _CACHE_LIMIT:
                self._common.clear()
            found = self._common[key] = self._build_common(r, x)
        return found

    def _build_common(self, r: CallRecord, x: CallExtras | None) -> bytes:
        n = self.names
        a = self._attr
        name = f"{r.operation} {r.request_model}" if r.request_model else r.operation
        parts = [pw.length_delimited(_NAME, name.encode()), _KIND_CLIENT]
        if r.outcome != OK:
            error = r.error_type or r.outcome
            message = r.outcome if error == r.outcome else f"{r.outcome}: {error}"
            if r.status_code is not None and r.status_code >= 400:
                message += f" (HTTP {r.status_code})"
            status = pw.length_delimited(_STATUS_MESSAGE, message.encode()) + _STATUS_CODE_ERROR
            parts.append(pw.length_delimited(_STATUS, status))
            parts.append(a.string(n.error_type, error))
        provider = semconv.provider_name(r.provider)
        parts += (a.string(n.operation, r.operation), a.string(n.provider, provider))
        if n.provider_legacy:
            parts.append(a.string(n.provider_legacy, provider))
        if r.request_model is not None:
            parts.append(a.string(n.request_model, r.request_model))
        parts.append(a.any(n.request_stream, bool(r.stream)))
        if r.response_model is not None:
            parts.append(a.string(n.response_model, r.response_model))
        if r.finish_reason is not None:
            parts.append(a.any(n.finish_reasons, [r.finish_reason]))
        if r.status_code is not None:
            parts.append(a.integer(n.http_status, r.status_code))
        parts.append(a.string(n.outcome, r.outcome))
        if r.app is not None:
            parts.append(a.string(n.app, r.app))
        parts.append(a.string(n.upstream, r.upstream))
        if r.price_source is not None:
            parts.append(a.string(n.price_source, r.price_source))
        if r.anomaly is not None:
            parts.append(a.string(n.anomaly, r.anomaly))
        if x is not None:
            if x.server_address:
                parts.append(a.string(n.server_address, x.server_address))
            if x.server_port:
                parts.append(a.integer(n.server_port, x.server_port))
            if x.max_output_tokens is not None:
                parts.append(a.integer(n.request_max_tokens, x.max_output_tokens))
            if x.temperature is not None:
                parts.append(a.float(n.request_temperature, float(x.temperature)))
            if x.top_p is not None:
                parts.append(a.float(n.request_top_p, float(x.top_p)))
        return b"".join(parts)

    def _string(self, key: str, value: str) -> bytes:
        """A string attribute whose value tends to repeat (user, tags, key fingerprint), cached."""
        found = self._strings.get((key, value))
        if found is None:
            if len(self._strings) >= _CACHE_LIMIT:
                self._strings.clear()
            found = self._strings[(key, value)] = self._attr.string(key, value)
        return found

    def _tag_key(self, tag: str) -> str:
        found = self._tag_keys.get(tag)
        if found is None:
            if len(self._tag_keys) >= _CACHE_LIMIT:
                self._tag_keys.clear()
            found = self._tag_keys[tag] = self.names.tag_prefix + tag
        return found

    def _event(self, name: str, when: datetime, attributes: dict[str, str | int | float | bool]) -> bytes:
        body = [_EVENT_TIME, pw.fixed64(unix_nanos(when)), pw.length_delimited(_EVENT_NAME, name.encode())]
        body += (self._event_attr.any(k, v) for k, v in attributes.items())
        return pw.length_delimited(_EVENT, b"".join(body))

    def _content(self, x: CallExtras) -> list[bytes]:
        parts = []
        truncated = False
        for key, text in ((self.names.input_messages, x.input_messages), (self.names.output_messages, x.output_messages)):
            if not text:
                continue
            data = text.encode("utf-8", "replace")
            if len(data) > self.content_max_bytes:
                text = data[: self.content_max_bytes].decode("utf-8", "ignore")
                truncated = True
            parts.append(self._attr.string(key, text))
        if truncated:
            parts.append(self._attr.any(self.names.content_truncated, True))
        return parts


def _decimal_text(value: Decimal) -> str:
    """A Decimal as plain text, never in exponent form (1E-7 -> 0.0000001)."""
    return format(value, "f")
