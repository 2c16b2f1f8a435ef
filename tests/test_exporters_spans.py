"""Spans built from call records, exported over OTLP (HTTP and gRPC) to a receiver that decodes the real protobuf bytes."""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from exporters import Telemetry
from exporters.spans import unix_nanos
from tests.otlp_receiver import HttpReceiver, Receiver, attributes, call

FAST = {"batch_delay_s": 0.05}


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver().start()
    yield r
    r.stop()


def export(receiver: Receiver, items: list, config: dict[str, Any] | None = None,
           env: dict[str, str] | None = None) -> list[Span]:
    """Feeds the items to a Telemetry aimed at the receiver, flushes, and returns the spans it got."""
    protocol = getattr(receiver, "protocol", "http/protobuf")
    telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "otlp_protocol": protocol,  # type: ignore[attr-defined]
                           **FAST, **(config or {})}, env or {}, "checkout")
    telemetry.start()
    telemetry.consume(items)
    telemetry.shutdown(10)
    return receiver.spans()


def test_a_call_becomes_a_client_span_inside_the_apps_trace(receiver: Receiver) -> None:
    record, extras = call(3, extras={"tracestate": "vendor=abc"})
    [span] = export(receiver, [(record, extras)])
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.trace_id == bytes.fromhex(record.trace_id)
    assert span.span_id == bytes.fromhex(record.span_id)
    assert span.parent_span_id == bytes.fromhex(extras.parent_span_id)
    assert span.trace_state == "vendor=abc"
    assert span.flags == 0x301  # sampled; parent is remote (the app's)
    assert span.start_time_unix_nano == unix_nanos(record.started_at)
    assert span.end_time_unix_nano - span.start_time_unix_nano == 850_000_000
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert attributes(span) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 512,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.stream": True,
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.response.id": "chatcmpl-3",
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.response.time_to_first_chunk": 0.21,
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1024,
        "gen_ai.usage.cache_creation.input_tokens": 16,
        "gen_ai.usage.reasoning.output_tokens": 64,
        "server.address": "api.openai.com",
        "server.port": 443,
        "http.response.status_code": 200,
        "meterline.call_id": record.call_id,
        "meterline.cost_usd": 0.00036,
        "meterline.cost_usd_exact": "0.000360",
        "meterline.price_source": "genai-prices 0.2.3",
        "meterline.user": "u123",
        "meterline.app": "checkout",
        "meterline.outcome": "ok",
        "meterline.upstream": "openai",
        "meterline.key_fingerprint": "kf-1",
        "meterline.tags.team": "search",
        "meterline.tags.feature": "summarize",
    }
    [request] = receiver.trace_requests
    [resource_spans] = request.resource_spans
    assert attributes(resource_spans.resource) == {"service.name": "checkout"}
    assert resource_spans.scope_spans[0].scope.name == "meterline"


def test_failed_calls_have_error_status_and_error_type(http_receiver: HttpReceiver) -> None:
    limited = call(1, outcome="upstream_error", status_code=429, error_type="rate_limit_error", input_tokens=None,
                   output_tokens=None, cache_read_tokens=None, cache_write_tokens=None, reasoning_tokens=None,
                   cost_usd=None, response_model=None, finish_reason=None, ttft_ms=None)
    timed_out = call(2, outcome="timeout", status_code=None, error_type=None)
    spans = {s.span_id: s for s in export(http_receiver, [limited, timed_out])}
    first = spans[bytes.fromhex(limited[0].span_id)]
    assert first.status.code == Status.STATUS_CODE_ERROR
    assert first.status.message == "upstream_error: rate_limit_error (HTTP 429)"
    attrs = attributes(first)
    assert attrs["error.type"] == "rate_limit_error" and attrs["http.response.status_code"] == 429
    assert attrs["meterline.outcome"] == "upstream_error"
    for absent in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "meterline.cost_usd",
                   "gen_ai.response.model", "gen_ai.response.finish_reasons", "gen_ai.response.time_to_first_chunk"):
        assert absent not in attrs  # None is left out, never sent as 0
    second = spans[bytes.fromhex(timed_out[0].span_id)]
    assert (second.status.code, second.status.message) == (Status.STATUS_CODE_ERROR, "timeout")
    assert attributes(second)["error.type"] == "timeout"


def test_root_and_interrupted_calls(http_receiver: HttpReceiver) -> None:
    root = call(1, extras={"parent_span_id": None})
    interrupted = call(2, ended_at=None, duration_ms=None, outcome="interrupted")
    measured = call(3, ended_at=None, duration_ms=1500.0)
    spans = {s.span_id: s for s in export(http_receiver, [root, interrupted, measured])}
    first = spans[bytes.fromhex(root[0].span_id)]
    assert first.parent_span_id == b"" and first.flags == 0x101
    second = spans[bytes.fromhex(interrupted[0].span_id)]
    assert second.end_time_unix_nano == second.start_time_unix_nano
    assert second.status.code == Status.STATUS_CODE_ERROR
    third = spans[bytes.fromhex(measured[0].span_id)]
    assert third.end_time_unix_nano - third.start_time_unix_nano == 1_500_000_000


def test_records_without_valid_ids_are_skipped_and_counted(http_receiver: HttpReceiver) -> None:
    telemetry = Telemetry({"otlp_endpoint": http_receiver.endpoint, **FAST}, {})
    telemetry.start()
    naive = call(4)[0].started_at.replace(tzinfo=None)
    telemetry.consume([call(1, trace_id=None), call(2, span_id="xyz"), call(3), call(4, started_at=naive)])
    telemetry.shutdown(10)
    assert len(http_receiver.spans()) == 1
    assert telemetry.stats()["spans_invalid"] == 3


def test_extras_attributes_and_events(http_receiver: HttpReceiver) -> None:
    record, extras = call(1, extras={
        "attributes": {"meterline.budget.rule": "team-monthly", "meterline.budget.utilization": 0.81,
                       "meterline.budget.warned": True, "meterline.budget.spent_cents": 40500},
        "events": [("meterline.budget.threshold", record_time := call(0)[0].started_at + timedelta(seconds=1),
                    {"threshold": 0.8, "rule": "team-monthly"})]})
    [span] = export(http_receiver, [(record, extras)])
    attrs = attributes(span)
    assert attrs["meterline.budget.rule"] == "team-monthly"
    assert attrs["meterline.budget.utilization"] == 0.81
    assert attrs["meterline.budget.warned"] is True and attrs["meterline.budget.spent_cents"] == 40500
    [event] = span.events
    assert event.name == "meterline.budget.threshold"
    assert event.time_unix_nano == unix_nanos(record_time)
    assert attributes(event) == {"threshold": 0.8, "rule": "team-monthly"}


def test_content_is_captured_only_when_opted_in(http_receiver: HttpReceiver) -> None:
    messages = json.dumps([{"role": "user", "parts": [{"type": "text", "content": "héllo " * 50}]}])
    output = json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "hi"}],
                          "finish_reason": "stop"}])
    item = call(1, extras={"input_messages": messages, "output_messages": output})
    [span] = export(http_receiver, [item])
    assert not {"gen_ai.input.messages", "gen_ai.output.messages"} & set(attributes(span))

    http_receiver.trace_requests.clear()
    [span] = export(http_receiver, [call(2, extras={"input_messages": messages, "output_messages": output})],
                    {"capture_content": True})
    attrs = attributes(span)
    assert attrs["gen_ai.input.messages"] == messages and attrs["gen_ai.output.messages"] == output
    assert "meterline.content_truncated" not in attrs

    http_receiver.trace_requests.clear()
    [span] = export(http_receiver, [call(3, extras={"input_messages": messages, "output_messages": output})],
                    {"capture_content": True, "content_max_bytes": 41})
    attrs = attributes(span)
    assert len(attrs["gen_ai.input.messages"].encode()) <= 41
    assert messages.startswith(attrs["gen_ai.input.messages"])  # cut at a character boundary
    assert output.startswith(attrs["gen_ai.output.messages"]) and len(attrs["gen_ai.output.messages"]) == 41
    assert attrs["meterline.content_truncated"] is True


def test_semconv_opt_in_switches_attribute_names(http_receiver: HttpReceiver) -> None:
    [span] = export(http_receiver, [call(1)], env={"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental"})
    attrs = attributes(span)
    assert attrs["gen_ai.usage.cache_write.input_tokens"] == 16
    assert "gen_ai.usage.cache_creation.input_tokens" not in attrs
    assert attrs["gen_ai.provider.name"] == "openai" and "gen_ai.system" not in attrs


@pytest.mark.parametrize(("provider", "expected"), [
    ("google", "gcp.gemini"), ("mistral", "mistral_ai"), ("x-ai", "x_ai"), ("groq", "groq"),
    ("deepseek", "deepseek"), ("anthropic", "anthropic"), ("vllm", "vllm")])
def test_provider_ids_map_to_convention_values(http_receiver: HttpReceiver, provider: str, expected: str) -> None:
    [span] = export(http_receiver, [call(1, provider=provider, operation="generate_content",
                                         request_model="m-1")])
    assert attributes(span)["gen_ai.provider.name"] == expected
    assert span.name == "generate_content m-1"


def test_samplers_follow_the_app_and_the_trace_id(http_receiver: HttpReceiver) -> None:
    rng = random.Random(5)
    items = [call(i, trace_id=f"{rng.getrandbits(128):032x}",
                  extras={"sampled": i % 3 != 0, "parent_span_id": None if i % 5 == 0 else f"{i + 1:016x}"})
             for i in range(300)]
    spans = export(http_receiver, items)  # default: parentbased_always_on
    expected = {bytes.fromhex(r.span_id) for r, x in items if x.parent_span_id is None or x.sampled}
    assert {s.span_id for s in spans} == expected

    http_receiver.trace_requests.clear()
    spans = export(http_receiver, items, {"sampler": "traceidratio", "sampler_arg": 0.5})
    kept = {s.trace_id for s in spans}
    assert 100 < len(kept) < 200
    http_receiver.trace_requests.clear()
    again = export(http_receiver, items, env={"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    assert {s.trace_id for s in again} == kept  # the decision depends on the trace id alone

    http_receiver.trace_requests.clear()
    spans = export(http_receiver, items, {"sampler": "parentbased_traceidratio", "sampler_arg": 0.5})
    roots = {bytes.fromhex(r.trace_id) for r, x in items if x.parent_span_id is None}
    children = {bytes.fromhex(r.trace_id) for r, x in items if x.parent_span_id is not None and x.sampled}
    assert {s.trace_id for s in spans} == (roots & kept) | children

    telemetry = Telemetry({"otlp_endpoint": http_receiver.endpoint, "sampler": "always_off"}, {})
    assert not telemetry.tracing_enabled


def test_batches_share_one_resource_and_scope(http_receiver: HttpReceiver) -> None:
    items = [call(i) for i in range(1200)]
    spans = export(http_receiver, items, {"batch_max_spans": 500, "queue_max_spans": 5000})
    assert len(spans) == 1200
    assert [sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
            for r in http_receiver.trace_requests] == [500, 500, 200]
    assert all(len(r.resource_spans) == 1 and len(r.resource_spans[0].scope_spans) == 1
               for r in http_receiver.trace_requests)


def test_headers_compression_and_resource_attributes(receiver: Receiver) -> None:
    export(receiver, [call(1)], {"otlp_headers": {"Authorization": "Bearer t0k"}, "otlp_compression": "gzip",
                                 "resource_attributes": {"deployment.environment": "test", "replica": 2}},
           env={"OTEL_RESOURCE_ATTRIBUTES": "team=search%2Cranking"})
    assert receiver.headers[0]["authorization"] == "Bearer t0k"
    if isinstance(receiver, HttpReceiver):  # (grpc-encoding is consumed by gRPC before the servicer)
        assert receiver.headers[0]["content-encoding"] == "gzip"
    resource = receiver.trace_requests[0].resource_spans[0].resource
    assert attributes(resource) == {"team": "search,ranking", "deployment.environment": "test", "replica": 2,
                                    "service.name": "checkout"}


def test_partial_success_counts_rejected_spans(receiver: Receiver) -> None:
    receiver.rejected_spans = 2
    protocol = getattr(receiver, "protocol")
    telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "otlp_protocol": protocol, **FAST}, {})  # type: ignore[attr-defined]
    telemetry.start()
    telemetry.consume([call(i) for i in range(5)])
    telemetry.shutdown(10)
    stats = telemetry.stats()
    assert (stats["spans_exported"], stats["spans_rejected"], stats["spans_dropped"]) == (3, 2, 2)


def test_a_whole_ledger_writer_batch_is_queued_not_dropped(http_receiver: HttpReceiver) -> None:
    # the writer hands spans over in its batches; under load one reached 2,465 and the old
    # default queue (2,048) dropped the excess while the exporter kept up
    from ledger.writer import MAX_BATCH
    items = [call(i) for i in range(MAX_BATCH)]
    telemetry = Telemetry({"otlp_endpoint": http_receiver.endpoint, **FAST}, {}, "checkout")
    telemetry.start()
    telemetry.consume(items)
    telemetry.shutdown(30)
    assert telemetry.stats()["spans_dropped_queue_full"] == 0
    assert len(http_receiver.spans()) == MAX_BATCH
