"""Metrics on the OpenTelemetry SDK's MeterProvider: the OTLP push (http/protobuf, grpc, http/json) and /_meterline/metrics come from one provider and agree."""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.parser import text_string_to_metric_families

from exporters import Telemetry, semconv
from exporters.prometheus import label_name
from tests.fakes import FakeProvider
from tests.otlp_receiver import HttpReceiver, Receiver, attributes, call, metrics_by_name
from tests.sidecar_process import Sidecar

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA


def some_calls() -> list:
    return [call(0), call(1, ttft_ms=40.0, duration_ms=95.0, input_tokens=3, output_tokens=70000),
            call(2, outcome="upstream_error", error_type="server_error", status_code=500, cost_usd=None,
                 input_tokens=None, output_tokens=None, stream=False, response_model=None, duration_ms=30.0),
            call(3, provider="anthropic", upstream="anthropic", request_model="claude-haiku-4-5",
                 response_model="claude-haiku-4-5-20251001", stream=False, cost_usd=Decimal("0.000011"))]


def prometheus_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, for every sample of a scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def as_labels(attrs: dict[str, Any], **extra: str) -> frozenset:
    return frozenset({**{label_name(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in attrs.items()},
                      **extra}.items())


def assert_push_matches_scrape(request: ExportMetricsServiceRequest, text: str) -> int:
    """Every counter and histogram point of the push is in the scrape with the same value; returns how many."""
    scrape = prometheus_samples(text)
    checked = 0
    for metric in metrics_by_name(request).values():
        if metric.WhichOneof("data") == "histogram":
            family = {"gen_ai.client.token.usage": "gen_ai_client_token_usage"}.get(
                metric.name, metric.name.replace(".", "_") + "_seconds")
            for p in metric.histogram.data_points:
                attrs = attributes(p)
                assert scrape[(f"{family}_count", as_labels(attrs))] == p.count
                assert scrape[(f"{family}_sum", as_labels(attrs))] == pytest.approx(p.sum)
                cumulative = 0
                for bound, count in zip(p.explicit_bounds, p.bucket_counts):
                    cumulative += count
                    le = str(int(bound)) if metric.name == "gen_ai.client.token.usage" else repr(bound)
                    assert scrape[(f"{family}_bucket", as_labels(attrs, le=le))] == cumulative
                checked += 1
        elif metric.WhichOneof("data") == "sum" and metric.name in ("meterline.requests", "meterline.cost"):
            family = "meterline_requests_total" if metric.name == "meterline.requests" else "meterline_cost_usd_total"
            for p in metric.sum.data_points:
                value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                assert scrape[(family, as_labels(attributes(p)))] == pytest.approx(value)
                checked += 1
    return checked


def test_the_push_and_the_scrape_agree_point_by_point(receiver: Receiver) -> None:
    telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "otlp_protocol": getattr(receiver, "protocol"),
                           "traces": False}, {}, "checkout")
    telemetry.start()
    telemetry.consume(some_calls())
    text = telemetry.prometheus()[0].decode()
    telemetry.shutdown(10)  # the last push: the same totals as the scrape (nothing came in between)
    [request] = receiver.wait_for_metrics(1)
    metrics = metrics_by_name(request)
    for name, bounds in semconv.HISTOGRAM_BUCKETS.items():
        for p in metrics[name].histogram.data_points:
            assert list(p.explicit_bounds) == [float(b) for b in bounds]
    assert [p.as_int for p in metrics["meterline.requests"].sum.data_points if
            attributes(p)["meterline.outcome"] == "upstream_error"] == [1]
    # 4 calls: 2 token series + overhead per provider, 3 duration, 1 ttft (streams), cost, requests
    assert assert_push_matches_scrape(request, text) >= 15
    # an observable counter with attributes (the exporters' own failures, by signal), in both
    [failures] = metrics["meterline.telemetry.export.failures"].sum.data_points
    assert (attributes(failures), failures.as_int) == ({"signal": "metrics"}, 0)
    assert metrics["meterline.telemetry.export.failures"].sum.is_monotonic
    assert prometheus_samples(text)[("meterline_telemetry_export_failures_total",
                                     frozenset({("signal", "metrics")}))] == 0


def test_the_series_cap_is_the_same_in_the_push_and_the_scrape(receiver: Receiver) -> None:
    telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "otlp_protocol": getattr(receiver, "protocol"),
                           "traces": False, "metric_max_series": 5}, {})
    telemetry.start()
    telemetry.consume([call(i, request_model=f"model-{i}", response_model=None) for i in range(20)])
    text = telemetry.prometheus()[0].decode()
    telemetry.shutdown(10)
    [request] = receiver.wait_for_metrics(1)
    points = metrics_by_name(request)["meterline.requests"].sum.data_points
    assert len(points) == 5
    [overflow] = [p for p in points if attributes(p).get("otel.metric.overflow") is True]
    assert overflow.as_int == 16 and attributes(overflow) == {"otel.metric.overflow": True}
    assert prometheus_samples(text)[("meterline_requests_total",
                                     frozenset({("otel_metric_overflow", "true")}))] == 16
    assert telemetry.stats()["metric_series_overflow"] >= 1


def test_calls_consumed_before_start_are_in_the_push(receiver: Receiver) -> None:
    """The sidecar starts telemetry after the ledger writer, which may already feed it a journal replay."""
    telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "otlp_protocol": getattr(receiver, "protocol"),
                           "traces": False}, {})
    telemetry.consume([call(0), call(1)])
    telemetry.start()
    telemetry.consume([call(2)])
    telemetry.shutdown(10)
    [request] = receiver.wait_for_metrics(1)
    assert [p.as_int for p in metrics_by_name(request)["meterline.requests"].sum.data_points] == [3]


def test_delta_temporality_asked_by_the_variable_goes_to_the_push_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE: the push turns delta, the scrape stays cumulative."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    receiver = HttpReceiver().start()
    try:
        telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "traces": False,
                               "metrics_export_interval_s": 0.1}, {})
        telemetry.start()
        telemetry.consume([call(0)])
        receiver.wait_for_metrics(1)
        telemetry.consume([call(1), call(2)])
        deadline = time.monotonic() + 10
        while True:
            counts = [p.as_int for req in receiver.wait_for_metrics(1) for p in
                      metrics_by_name(req).get("meterline.requests", _NO_SUM).sum.data_points]
            if sum(counts) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        scrape = text_string_to_metric_families(telemetry.prometheus()[0].decode())
        telemetry.shutdown(5)
    finally:
        receiver.stop()
    assert sum(counts) == 3 and max(counts) == 2  # 1, then 2: what came in since the push before
    temporalities = {metrics_by_name(req)["meterline.requests"].sum.aggregation_temporality
                     for req in receiver.metric_requests if "meterline.requests" in metrics_by_name(req)}
    assert temporalities == {DELTA}
    [requests] = [f for f in scrape if f.name == "meterline_requests"]
    assert [s.value for s in requests.samples] == [3]


class _NoSum:
    class sum:  # noqa: N801 - stands in for a Metric without the counter
        data_points: list = []


_NO_SUM = _NoSum()


# --- http/json --------------------------------------------------------------------------------------


class JsonReceiver:
    """An OTLP/HTTP JSON endpoint (/v1/metrics), parsed into the protobuf classes with protobuf's JSON mapping."""

    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.content_types: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.content_types.append(self.headers["Content-Type"])
                receiver.requests.append(json_format.Parse(body, ExportMetricsServiceRequest()))
                reply = json.dumps({}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def json_receiver() -> Iterator[JsonReceiver]:
    r = JsonReceiver()
    yield r
    r.stop()


def test_metrics_over_http_json_with_the_exact_cost_as_a_double(json_receiver: JsonReceiver) -> None:
    telemetry = Telemetry({"otlp_endpoint": json_receiver.endpoint, "otlp_protocol": "http/json",
                           "traces": False}, {}, "checkout")
    telemetry.start()
    telemetry.consume(some_calls())
    text = telemetry.prometheus()[0].decode()
    telemetry.shutdown(10)
    [request] = json_receiver.requests
    assert json_receiver.content_types == ["application/json"]
    assert telemetry.stats()["metric_exports"] == 1 and telemetry.stats()["metric_export_failures"] == 0
    metrics = metrics_by_name(request)
    cost = metrics["meterline.cost"]
    assert cost.unit == "USD" and cost.sum.aggregation_temporality == CUMULATIVE
    by_model = {attributes(p)["gen_ai.request.model"]: p.as_double for p in cost.sum.data_points}
    assert by_model == {"gpt-4o-mini": pytest.approx(0.00072), "claude-haiku-4-5": pytest.approx(0.000011)}
    assert 'meterline_app="checkout"} 0.000720' in text  # the scrape keeps the exact Decimal
    tokens = metrics["gen_ai.client.token.usage"]
    assert {p.count for p in tokens.histogram.data_points} >= {1, 2}
    assert assert_push_matches_scrape(request, text) >= 15


# --- through the real sidecar -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider(chunk_delay_ms=1).start_in_thread()
    yield provider
    provider.stop_thread()


def test_the_sidecar_pushes_what_it_serves(tmp_path, fake: FakeProvider) -> None:
    receiver = HttpReceiver().start()
    config = {"upstreams": {"openai": {"base_url": fake.base_url}}}
    sc = Sidecar(tmp_path / "sidecar", config, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                                    "OTEL_TRACES_EXPORTER": "none",
                                                    "OTEL_METRIC_EXPORT_INTERVAL": "200"}).start()
    try:
        client = openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test", max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        sc.rows("outcome = 'ok'", 3)
        deadline = time.monotonic() + 15
        while True:  # a push and a scrape taken while no call is in flight: the same totals
            with urllib.request.urlopen(f"{sc.url}/_meterline/metrics", timeout=5) as r:
                text = r.read().decode()
            pushes = receiver.wait_for_metrics(1)
            last = pushes[-1]
            requests = metrics_by_name(last).get("meterline.requests")
            pushed = sum(p.as_int for p in requests.sum.data_points) if requests is not None else 0
            if pushed == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert pushed == 3
        assert attributes(last.resource_metrics[0].resource)["service.name"] == "meterline"
        metrics = metrics_by_name(last)
        assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration", "meterline.cost",
                "meterline.requests", "meterline.overhead", "meterline.ledger.pending"} <= set(metrics)
        assert list(metrics["gen_ai.client.operation.duration"].histogram.data_points[0].explicit_bounds) == list(
            semconv.DURATION_BUCKETS)
        assert assert_push_matches_scrape(last, text) >= 5
    finally:
        sc.stop()
        receiver.stop()
