"""One OpenTelemetry SDK span (a `ReadableSpan`) per call, built from its CallRecord (and CallExtras), and a child per try of a routed call.

No Tracer is involved: ids, parent and times come from the record, so the span is built finished
and handed straight to the SDK's BatchSpanProcessor. The attributes that are the same for many
calls (name, status and the attributes that depend only on provider, model, app, outcome...)
are built once per combination and copied from a bounded cache.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from ledger import attempt_rows
from ledger.records import OK, CallExtras, CallRecord

from . import semconv
from .settings import TelemetrySettings

log = logging.getLogger("meterline.telemetry")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CACHE_LIMIT = 4096  # entries per cache; a cache that fills is emptied and starts again
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NO_STATE = TraceState()
_UNSET = Status(StatusCode.UNSET)
_SCALARS = (str, bool, int, float)


def unix_nanos(moment: datetime) -> int:
    """Exact nanoseconds since the epoch of a timezone-aware datetime."""
    delta = moment - _EPOCH
    return ((delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1000


def sdk_resource(settings: TelemetrySettings) -> Resource:
    """The SDK Resource of the settings' attributes alone (not Resource.create: no telemetry.sdk.* defaults)."""
    return Resource(dict(settings.resource_attributes))


def sdk_scope() -> InstrumentationScope:
    return InstrumentationScope(semconv.SCOPE_NAME, semconv.SCOPE_VERSION)


class SpanBuilder:
    """Turns (CallRecord, CallExtras) pairs into finished SDK spans; used from one thread (the caller of consume)."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.names = settings.names
        self.capture_content = settings.capture_content
        self.content_max_bytes = settings.content_max_bytes
        self.resource = sdk_resource(settings)
        self.scope = sdk_scope()
        self._common: dict[tuple, tuple[str, Status, dict[str, Any]]] = {}
        self._tag_keys: dict[str, str] = {}
        self.invalid = 0  # records that could not be spans (no valid trace or span id, or bad values)

    def build_all(self, items: Iterable[tuple[CallRecord, CallExtras | None]]) -> list[ReadableSpan]:
        """The spans of the items that can be spans; a bad record costs its own span only."""
        out = []
        for record, extras in items:
            try:
                span = self.build(record, extras)
            except Exception:  # noqa: BLE001 - e.g. a naive datetime, or a value no attribute can hold
                if not self.invalid:
                    log.exception("call %s cannot be made a span; skipped (logged once)", record.call_id)
                self.invalid += 1
                continue
            if span is not None:
                out.append(span)
                # a child per try when there was more than one: a single try's span would repeat
                # the call's (its route attributes say it was routed), and would double the spans
                # a routed workload exports (the bench dropped 25,492 of them with the queue full)
                if extras is not None and len(extras.attempts) > 1 and record.route:
                    out.extend(self._attempt_spans(record, extras, span))
        return out

    def _attempt_spans(self, r: CallRecord, x: CallExtras, call: ReadableSpan) -> list[ReadableSpan]:
        """A routed call's tries, children of its span (ids derived from the call's span id and the try number)."""
        out = []
        parent = call.context
        n = self.names
        for a in attempt_rows.read(x.attempts, r.call_id):
            span_id = int.from_bytes(hashlib.blake2b(f"{r.span_id}/{a.attempt}".encode(), digest_size=8).digest(),
                                     "big") or 1
            context = SpanContext(parent.trace_id, span_id, False, _SAMPLED, parent.trace_state)
            start = unix_nanos(a.started_at)
            end = start + int((a.duration_ms or 0) * 1_000_000)
            attrs: dict[str, Any] = {"meterline.attempt": a.attempt, n.upstream: a.upstream, n.outcome: a.outcome,
                                     n.provider: a.provider, n.request_model: a.model, n.call_id: r.call_id}
            if a.status_code is not None:
                attrs[n.http_status] = a.status_code
            if a.error_type:
                attrs[n.error_type] = a.error_type
            if a.input_tokens is not None:
                attrs[n.input_tokens] = a.input_tokens
            if a.output_tokens is not None:
                attrs[n.output_tokens] = a.output_tokens
            if a.cost_usd is not None:
                attrs[n.cost_usd] = float(a.cost_usd)
                attrs[n.cost_usd_exact] = _decimal_text(a.cost_usd)
            status = _UNSET if a.outcome == OK else Status(StatusCode.ERROR, a.error_type or a.outcome)
            out.append(ReadableSpan(f"attempt {a.attempt} {a.upstream}/{a.model}", context, parent, self.resource,
                                    attrs, (), (), SpanKind.INTERNAL, None, status, start, end, self.scope))
        return out

    def build(self, r: CallRecord, x: CallExtras | None) -> ReadableSpan | None:
        """The span, or None (counted in `invalid`) when the record has no valid trace context."""
        try:
            trace_id = int(r.trace_id, 16) if r.trace_id and len(r.trace_id) == 32 else 0
            span_id = int(r.span_id, 16) if r.span_id and len(r.span_id) == 16 else 0
            parent_hex = x.parent_span_id if x is not None else None
            parent_id = int(parent_hex, 16) if parent_hex and len(parent_hex) == 16 else (0 if parent_hex else None)
        except ValueError:
            trace_id = span_id = 0
            parent_id = None
        if not trace_id or not span_id or parent_id == 0:
            self.invalid += 1
            return None
        start = unix_nanos(r.started_at)
        if r.ended_at is not None:
            end = unix_nanos(r.ended_at)
        elif r.duration_ms is not None:
            end = start + int(r.duration_ms * 1_000_000)
        else:
            end = start  # interrupted before it ended: a zero-length span that still shows the call

        state = _NO_STATE
        if x is not None and x.tracestate:
            state = TraceState.from_header([x.tracestate])
        context = SpanContext(trace_id, span_id, False, _SAMPLED, state)
        parent = SpanContext(trace_id, parent_id, True, _SAMPLED, state) if parent_id is not None else None

        name, status, common = self._common_part(r, x)
        n = self.names
        attrs = dict(common)
        attrs[n.call_id] = r.call_id
        if r.response_id is not None:
            attrs[n.response_id] = r.response_id
        if r.input_tokens is not None:
            attrs[n.input_tokens] = r.input_tokens
        if r.output_tokens is not None:
            attrs[n.output_tokens] = r.output_tokens
        if r.cache_read_tokens is not None:
            attrs[n.cache_read_tokens] = r.cache_read_tokens
        if r.cache_write_tokens is not None:
            attrs[n.cache_write_tokens] = r.cache_write_tokens
        if r.reasoning_tokens is not None:
            attrs[n.reasoning_tokens] = r.reasoning_tokens
        if r.ttft_ms is not None:
            attrs[n.time_to_first_chunk] = r.ttft_ms / 1000.0
        if r.cost_usd is not None:
            attrs[n.cost_usd] = float(r.cost_usd)
            attrs[n.cost_usd_exact] = _decimal_text(r.cost_usd)
        if r.user_id is not None:
            attrs[n.user] = r.user_id
        if r.key_fingerprint is not None:
            attrs[n.key_fingerprint] = r.key_fingerprint
        if r.tags:
            for key, value in r.tags.items():
                attrs[self._tag_key(key)] = value
        if r.route is not None:
            attrs["meterline.route"] = r.route
            if r.attempts is not None:
                attrs["meterline.route.attempts"] = r.attempts
            if r.served_by is not None:
                attrs["meterline.route.served_by"] = r.served_by
            if r.arm is not None:
                attrs["meterline.route.arm"] = r.arm
        if r.client_format is not None:  # a One API call (docs/one-api.md): the formats on each side
            attrs["meterline.client_format"] = r.client_format
            attrs["meterline.upstream_format"] = r.upstream_format or ""
        events: tuple[Event, ...] | list[Event] = ()
        if x is not None:
            if x.attributes:
                attrs.update(_checked(x.attributes))
            if x.events:
                events = [Event(name, _checked(attributes), unix_nanos(when)) for name, when, attributes in x.events]
            if self.capture_content and (x.input_messages or x.output_messages):
                self._content(x, attrs)
        return ReadableSpan(name, context, parent, self.resource, attrs, events, (), SpanKind.CLIENT, None, status,
                            start, end, self.scope)

    def _common_part(self, r: CallRecord, x: CallExtras | None) -> tuple[str, Status, dict[str, Any]]:
        """Name, status and the attributes that repeat across calls, built once per combination."""
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

    def _build_common(self, r: CallRecord, x: CallExtras | None) -> tuple[str, Status, dict[str, Any]]:
        n = self.names
        name = f"{r.operation} {r.request_model}" if r.request_model else r.operation
        attrs: dict[str, Any] = {}
        status = _UNSET
        if r.outcome != OK:
            error = r.error_type or r.outcome
            message = r.outcome if error == r.outcome else f"{r.outcome}: {error}"
            if r.status_code is not None and r.status_code >= 400:
                message += f" (HTTP {r.status_code})"
            status = Status(StatusCode.ERROR, message)
            attrs[n.error_type] = error
        provider = semconv.provider_name(r.provider)
        attrs[n.operation] = r.operation
        attrs[n.provider] = provider
        if n.provider_legacy:
            attrs[n.provider_legacy] = provider
        if r.request_model is not None:
            attrs[n.request_model] = r.request_model
        attrs[n.request_stream] = bool(r.stream)
        if r.response_model is not None:
            attrs[n.response_model] = r.response_model
        if r.finish_reason is not None:
            attrs[n.finish_reasons] = (r.finish_reason,)
        if r.status_code is not None:
            attrs[n.http_status] = r.status_code
        attrs[n.outcome] = r.outcome
        if r.app is not None:
            attrs[n.app] = r.app
        attrs[n.upstream] = r.upstream
        if r.price_source is not None:
            attrs[n.price_source] = r.price_source
        if r.anomaly is not None:
            attrs[n.anomaly] = r.anomaly
        if x is not None:
            if x.server_address:
                attrs[n.server_address] = x.server_address
            if x.server_port:
                attrs[n.server_port] = x.server_port
            if x.max_output_tokens is not None:
                attrs[n.request_max_tokens] = x.max_output_tokens
            if x.temperature is not None:
                attrs[n.request_temperature] = float(x.temperature)
            if x.top_p is not None:
                attrs[n.request_top_p] = float(x.top_p)
        return name, status, attrs

    def _tag_key(self, tag: str) -> str:
        found = self._tag_keys.get(tag)
        if found is None:
            if len(self._tag_keys) >= _CACHE_LIMIT:
                self._tag_keys.clear()
            found = self._tag_keys[tag] = self.names.tag_prefix + tag
        return found

    def _content(self, x: CallExtras, attrs: dict[str, Any]) -> None:
        truncated = False
        for key, text in ((self.names.input_messages, x.input_messages), (self.names.output_messages, x.output_messages)):
            if not text:
                continue
            data = text.encode("utf-8", "replace")
            if len(data) > self.content_max_bytes:
                text = data[: self.content_max_bytes].decode("utf-8", "ignore")
                truncated = True
            attrs[key] = text
        if truncated:
            attrs[self.names.content_truncated] = True


def _checked(attributes: Mapping[str, Any]) -> Mapping[str, Any]:
    """The extras' attributes as they are, or TypeError (the record's span is skipped) for a value no attribute
    can hold: the SDK's encoder would otherwise fail the whole batch at export."""
    for key, value in attributes.items():
        if not isinstance(key, str) or not (
                isinstance(value, _SCALARS)
                or (isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value))):
            raise TypeError(f"attribute {key!r}: {type(value).__name__} is not a valid attribute value")
    return attributes


def _decimal_text(value: Decimal) -> str:
    """A Decimal as plain text, never in exponent form (1E-7 -> 0.0000001)."""
    return format(value, "f")
