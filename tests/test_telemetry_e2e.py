"""Traces and metrics through the real sidecar: OTLP bytes decoded in the test process, Prometheus text parsed."""
from __future__ import annotations

import time
import urllib.request
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeProvider
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, attributes
from tests.sidecar_process import Sidecar, free_port

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
MESSAGES = [{"role": "user", "content": "Say something secret-ish: the password is swordfish"}]


@pytest.fixture(scope="module")
def fake():
    provider = FakeProvider(chunk_delay_ms=1).start_in_thread()
    yield provider
    provider.stop_thread()


def start(tmp_path, fake: FakeProvider, env: dict[str, str], **extra: Any) -> Sidecar:
    config = {"upstreams": {n: {"base_url": fake.base_url} for n in ("openai", "anthropic", "gemini")}, **extra}
    return Sidecar(tmp_path / "sidecar", config, env=env).start()


def span_by_call(spans: list[Span], call_id: str) -> Span:
    for s in spans:
        if attributes(s).get("meterline.call_id") == call_id:
            return s
    raise AssertionError(f"no span for call {call_id}")


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_each_call_is_a_genai_span_inside_the_apps_trace(tmp_path, fake, protocol):
    receiver = (HttpReceiver() if protocol == "http/protobuf" else GrpcReceiver()).start()
    sc = start(tmp_path, fake, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_SERVICE_NAME": "checkout",
                                "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        client = openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test", max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=64, temperature=0.2,
            extra_headers={"traceparent": f"00-{APP_TRACE}-{APP_SPAN}-01", "x-meterline-tags": "team=search",
                           "x-fake-scenario": "cache,reasoning"})
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           extra_headers={"x-fake-scenario": "error500"})
        (ok_row,) = sc.rows(f"response_id = '{reply.id}'")
        (err_row,) = sc.rows("status_code = 500")
        spans = receiver.wait_for_spans(2)
        span = span_by_call(spans, ok_row["call_id"])
        attrs = attributes(span)
        assert span.name == "chat gpt-4o-mini" and span.kind == Span.SPAN_KIND_CLIENT
        assert span.trace_id.hex() == APP_TRACE and span.parent_span_id.hex() == APP_SPAN
        assert span.span_id.hex() == ok_row["span_id"] and ok_row["trace_id"] == APP_TRACE
        assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.request.model"] == "gpt-4o-mini" and attrs["gen_ai.request.max_tokens"] == 64
        assert attrs["gen_ai.request.temperature"] == pytest.approx(0.2)
        assert attrs["gen_ai.response.model"] == reply.model and attrs["gen_ai.response.id"] == reply.id
        assert list(attrs["gen_ai.response.finish_reasons"]) == ["stop"]
        assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
        assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
        assert attrs["gen_ai.usage.cache_read.input_tokens"] == reply.usage.prompt_tokens_details.cached_tokens
        assert attrs["gen_ai.usage.reasoning.output_tokens"] == reply.usage.completion_tokens_details.reasoning_tokens
        assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == int(fake.base_url.rsplit(":", 1)[1])
        assert attrs["http.response.status_code"] == 200 and attrs["meterline.tags.team"] == "search"
        assert Decimal(str(attrs["meterline.cost_usd"])) == Decimal(ok_row["cost_usd"]).normalize() or \
            attrs["meterline.cost_usd"] == pytest.approx(float(ok_row["cost_usd"]))
        assert "gen_ai.input.messages" not in attrs and "gen_ai.output.messages" not in attrs  # not opted in
        # the upstream request carried the sidecar span's context
        exchange = next(e for e in fake.exchanges if e.response_id == reply.id)
        assert exchange.request_headers["traceparent"] == f"00-{APP_TRACE}-{ok_row['span_id']}-01"

        err = span_by_call(spans, err_row["call_id"])
        assert err.status.code == Status.STATUS_CODE_ERROR
        assert attributes(err)["error.type"] and attributes(err)["http.response.status_code"] == 500
        assert not err.parent_span_id  # no traceparent from the app: a root span of its own trace
    finally:
        sc.stop()
        receiver.stop()


def test_content_is_on_spans_only_when_opted_in(tmp_path, fake):
    receiver = HttpReceiver().start()
    sc = start(tmp_path, fake, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
               telemetry={"capture_content": True})
    try:
        client = anthropic.Anthropic(base_url=f"{sc.url}/anthropic", api_key="sk-ant", max_retries=0)
        reply = client.messages.create(model="claude-haiku-4-5", messages=MESSAGES, max_tokens=50)
        (row,) = sc.rows(f"response_id = '{reply.id}'")
        attrs = attributes(span_by_call(receiver.wait_for_spans(1), row["call_id"]))
        assert "swordfish" in attrs["gen_ai.input.messages"]
        assert reply.content[0].text[:20] in attrs["gen_ai.output.messages"]
        # the ledger never holds content, opted in or not
        assert not sc.sql("SELECT * FROM calls WHERE CAST(calls AS VARCHAR) LIKE '%swordfish%'")
    finally:
        sc.stop()
        receiver.stop()


def test_prometheus_metrics_after_known_calls(tmp_path, fake):
    sc = start(tmp_path, fake, {})
    try:
        client = openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test", max_retries=0)
        replies = [client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES) for _ in range(3)]
        rows = sc.rows("outcome = 'ok'", 3)
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{sc.url}/_meterline/metrics", timeout=5) as r:
                text = r.read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            requests = [s for s in families.get("meterline_requests", None).samples] if "meterline_requests" in families else []
            if sum(s.value for s in requests if s.labels.get("outcome") == "ok") >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        tokens = families["gen_ai_client_token_usage"]
        sums = {s.labels["gen_ai_token_type"]: s.value for s in tokens.samples if s.name.endswith("_sum")}
        assert sums["input"] == sum(r.usage.prompt_tokens for r in replies)
        assert sums["output"] == sum(r.usage.completion_tokens for r in replies)
        cost = sum(s.value for s in families["meterline_cost_usd"].samples if s.name.endswith("_total"))
        assert cost == pytest.approx(float(sum(Decimal(r["cost_usd"]) for r in rows)), rel=1e-9)
        durations = families["gen_ai_client_operation_duration_seconds"]
        count = sum(s.value for s in durations.samples if s.name.endswith("_count"))
        assert count == 3
        # no user or call ids as labels
        assert "call_id" not in text and "user" not in {k for f in families.values() for s in f.samples for k in s.labels}
    finally:
        sc.stop()


def test_a_dead_otlp_endpoint_leaves_calls_alone(tmp_path, fake):
    dead = f"http://127.0.0.1:{free_port()}"
    sc = start(tmp_path, fake, {"OTEL_EXPORTER_OTLP_ENDPOINT": dead})
    try:
        client = openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test", max_retries=0)
        times = []
        for _ in range(30):
            t = time.perf_counter()
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            times.append(time.perf_counter() - t)
        assert len(sc.rows("outcome = 'ok'", 30)) == 30
        times.sort()
        assert times[len(times) // 2] < 0.5  # milliseconds each; nothing waits on the collector
        stats = sc.health()["telemetry"]
        assert stats["tracing"] and stats["spans_exported"] == 0
        deadline = time.monotonic() + 15
        while "WARNING meterline.telemetry" not in sc.log() and time.monotonic() < deadline:
            time.sleep(0.1)  # the first export attempt comes after the batch delay
        time.sleep(1.0)  # and its retries, which must stay quiet
        warnings = sc.log().count("WARNING meterline.telemetry")
        assert 1 <= warnings <= 2, sc.log()  # said once per signal, not once per retry
    finally:
        sc.stop()
