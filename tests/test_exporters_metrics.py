"""Metrics from call records: the OTLP push (HTTP and gRPC, decoded by a receiver) and the Prometheus text, parsed by prometheus_client."""
from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.parser import text_string_to_metric_families

from exporters import Telemetry, semconv
from exporters.prometheus import metric_name
from tests.otlp_receiver import Receiver, attributes, call, metrics_by_name

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def known_calls() -> list:
    """Three ok streamed chat calls, one failed call, one ok Anthropic call: totals below follow from these."""
    return [
        call(0), call(1), call(2, ttft_ms=50.0, duration_ms=100.0),
        call(3, outcome="upstream_error", status_code=500, error_type="server_error", input_tokens=None,
             output_tokens=None, cost_usd=None, stream=False, ttft_ms=None, response_model=None, duration_ms=40.0),
        call(4, provider="anthropic", upstream="anthropic", request_model="claude-sonnet-4-5",
             response_model="claude-sonnet-4-5-20250929", input_tokens=20, output_tokens=5, stream=False, ttft_ms=None,
             cost_usd=Decimal("0.000135"), extras={"server_address": "api.anthropic.com"}),
    ]


def families(telemetry: Telemetry) -> dict[str, Any]:
    body, content_type = telemetry.prometheus()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(family: Any, name: str, **labels: str) -> list[Any]:
    return [s for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def test_otlp_metrics_push(receiver: Receiver) -> None:
    telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "otlp_protocol": getattr(receiver, "protocol"),
                           "traces": False}, {}, "checkout")
    assert not telemetry.tracing_enabled
    telemetry.start()
    telemetry.consume(known_calls())
    telemetry.set_budget_utilization("team-monthly", None, 0.42)
    telemetry.register_gauge("meterline.ledger.pending", "{record}", "Records not yet committed", lambda: 7)
    telemetry.shutdown(10)  # the last push happens at shutdown
    [request] = receiver.wait_for_metrics(1)
    assert receiver.trace_requests == []
    [rm] = request.resource_metrics
    assert attributes(rm.resource) == {"service.name": "checkout"}
    assert rm.scope_metrics[0].scope.name == "meterline"
    metrics = metrics_by_name(request)

    tokens = metrics["gen_ai.client.token.usage"]
    assert tokens.unit == "{token}" and tokens.histogram.aggregation_temporality == CUMULATIVE
    points = {(attributes(p)["gen_ai.request.model"], attributes(p)["gen_ai.token.type"]): p
              for p in tokens.histogram.data_points}
    openai_in = points[("gpt-4o-mini", "input")]
    assert list(openai_in.explicit_bounds) == list(map(float, semconv.TOKEN_BUCKETS))
    assert (openai_in.count, openai_in.sum, openai_in.min, openai_in.max) == (3, 3600, 1200, 1200)
    assert openai_in.bucket_counts[semconv.TOKEN_BUCKETS.index(4096)] == 3 and sum(openai_in.bucket_counts) == 3
    assert attributes(openai_in) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18", "server.address": "api.openai.com", "server.port": 443,
        "meterline.app": "checkout", "gen_ai.token.type": "input"}
    assert points[("claude-sonnet-4-5", "output")].sum == 5
    assert attributes(points[("claude-sonnet-4-5", "output")])["gen_ai.provider.name"] == "anthropic"

    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    by_error = {attributes(p).get("error.type"): p for p in duration.histogram.data_points
                if attributes(p)["gen_ai.provider.name"] == "openai"}
    assert by_error[None].count == 3 and by_error[None].sum == pytest.approx(0.85 + 0.85 + 0.1)
    assert list(by_error[None].explicit_bounds) == list(semconv.DURATION_BUCKETS)
    assert by_error["server_error"].count == 1

    ttft = metrics["gen_ai.client.operation.time_to_first_chunk"]
    [ttft_point] = ttft.histogram.data_points  # streams only
    assert ttft_point.count == 3 and ttft_point.sum == pytest.approx(0.21 + 0.21 + 0.05)

    cost = metrics["meterline.cost"]
    assert cost.unit == "USD" and cost.sum.is_monotonic and cost.sum.aggregation_temporality == CUMULATIVE
    by_model = {attributes(p)["gen_ai.request.model"]: p.as_double for p in cost.sum.data_points}
    assert by_model == {"gpt-4o-mini": pytest.approx(0.00108), "claude-sonnet-4-5": pytest.approx(0.000135)}

    requests = metrics["meterline.requests"]
    by_outcome = {(attributes(p)["gen_ai.provider.name"], attributes(p)["meterline.outcome"]): p.as_int
                  for p in requests.sum.data_points}
    assert by_outcome == {("openai", "ok"): 3, ("openai", "upstream_error"): 1, ("anthropic", "ok"): 1}

    overhead = metrics["meterline.overhead"]
    assert overhead.unit == "s" and sum(p.count for p in overhead.histogram.data_points) == 5
    assert sum(p.sum for p in overhead.histogram.data_points) == pytest.approx(0.002)

    [budget] = metrics["meterline.budget.utilization"].gauge.data_points
    assert budget.as_double == 0.42 and attributes(budget) == {"meterline.budget.rule": "team-monthly"}
    [pending] = metrics["meterline.ledger.pending"].gauge.data_points
    assert pending.as_int == 7
    for point in duration.histogram.data_points:
        # the SDK starts a cumulative series at its first measurement (not at the provider's start)
        assert telemetry.registry.start_ns <= point.start_time_unix_nano  # type: ignore[union-attr]
        assert point.time_unix_nano >= point.start_time_unix_nano


def test_metrics_are_pushed_periodically_and_stay_cumulative(receiver: Receiver) -> None:
    telemetry = Telemetry({"otlp_endpoint": receiver.endpoint, "otlp_protocol": getattr(receiver, "protocol"),
                           "traces": False, "metrics_export_interval_s": 0.1}, {})
    telemetry.start()
    telemetry.consume([call(0)])
    first = receiver.wait_for_metrics(1)[0]
    telemetry.consume([call(1)])
    pushes = receiver.wait_for_metrics(len(receiver.metric_requests) + 2)
    telemetry.shutdown(10)
    count = lambda req: sum(p.as_int for p in metrics_by_name(req)["meterline.requests"].sum.data_points)  # noqa: E731
    assert count(first) == 1 and count(pushes[-1]) == 2
    assert telemetry.stats()["metric_exports"] >= 3


def test_prometheus_text() -> None:
    telemetry = Telemetry({}, {}, "checkout")
    telemetry.consume(known_calls())
    telemetry.set_budget_utilization("per-user-daily", "u1", 0.3)
    telemetry.set_budget_utilization("per-user-daily", "u2", 0.9)
    telemetry.set_budget_utilization("per-user-daily", "u2", 0.1)  # u2's window reset: u1 is now the highest
    telemetry.register_gauge("meterline.ledger.write_lag", "s", "Age of the newest committed record", lambda: 0.25)
    f = families(telemetry)

    tokens = f["gen_ai_client_token_usage"]
    assert tokens.type == "histogram"
    le_4096 = samples(tokens, "gen_ai_client_token_usage_bucket", gen_ai_token_type="input",
                      gen_ai_request_model="gpt-4o-mini", le="4096")
    assert [s.value for s in le_4096] == [3.0]
    [total] = samples(tokens, "gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                      gen_ai_request_model="gpt-4o-mini")
    assert total.value == 900.0
    assert total.labels["gen_ai_provider_name"] == "openai" and total.labels["server_port"] == "443"

    duration = f["gen_ai_client_operation_duration_seconds"]
    [count] = samples(duration, "gen_ai_client_operation_duration_seconds_count", error_type="server_error")
    assert count.value == 1
    [inf] = samples(duration, "gen_ai_client_operation_duration_seconds_bucket", le="+Inf",
                    gen_ai_request_model="claude-sonnet-4-5")
    assert inf.value == 1
    [fast] = [s for s in samples(duration, "gen_ai_client_operation_duration_seconds_bucket", le="0.16",
                                 gen_ai_provider_name="openai") if "error_type" not in s.labels]
    assert fast.value == 1  # the 100 ms call; the failed one has its own series (error_type)
    assert "gen_ai_client_operation_time_to_first_chunk_seconds" in f

    cost = f["meterline_cost_usd"]
    assert cost.type == "counter"
    values = {s.labels["gen_ai_request_model"]: s.value for s in cost.samples if s.name == "meterline_cost_usd_total"}
    assert values == {"gpt-4o-mini": pytest.approx(0.00108), "claude-sonnet-4-5": pytest.approx(0.000135)}
    body = telemetry.prometheus()[0].decode()
    assert 'gen_ai_request_model="gpt-4o-mini",gen_ai_response_model="gpt-4o-mini-2024-07-18",' \
           'meterline_app="checkout"} 0.001080' in body  # exact Decimal sum, not a float's rounding

    requests = f["meterline_requests"]
    by_outcome = {(s.labels["gen_ai_provider_name"], s.labels["meterline_outcome"]): s.value
                  for s in requests.samples if s.name == "meterline_requests_total"}
    assert by_outcome == {("openai", "ok"): 3, ("openai", "upstream_error"): 1, ("anthropic", "ok"): 1}

    assert f["meterline_overhead_seconds"].type == "histogram"
    [budget] = f["meterline_budget_utilization_ratio"].samples
    assert (budget.labels, budget.value) == ({"meterline_budget_rule": "per-user-daily"}, 0.3)
    [lag] = f["meterline_ledger_write_lag_seconds"].samples
    assert lag.value == 0.25
    [target] = f["target_info"].samples
    assert target.labels == {"service_name": "checkout"}
    for family in f.values():  # cardinality: no user ids, call ids or unlisted tags as labels
        for s in family.samples:
            assert not {"meterline_user", "meterline_call_id", "meterline_tags_team", "meterline_budget_key"} & set(
                s.labels)


def test_tag_labels_are_an_allow_list() -> None:
    telemetry = Telemetry({"metric_tag_labels": ["team"]}, {})
    telemetry.consume([call(0), call(1, tags={"team": "ads", "feature": "x"}), call(2, tags={})])
    f = families(telemetry)
    teams = {s.labels.get("meterline_tags_team"): s.value for s in f["meterline_cost_usd"].samples}
    assert teams == {"search": pytest.approx(0.00036), "ads": pytest.approx(0.00036), None: pytest.approx(0.00036)}
    assert all("meterline_tags_feature" not in s.labels for fam in f.values() for s in fam.samples)


def test_budget_key_label_when_configured() -> None:
    telemetry = Telemetry({"budget_key_label": True}, {})
    telemetry.set_budget_utilization("per-user-daily", "u1", 0.3)
    telemetry.set_budget_utilization("per-user-daily", "u2", Decimal("0.9"))
    f = families(telemetry)
    values = {s.labels["meterline_budget_key"]: s.value for s in f["meterline_budget_utilization_ratio"].samples}
    assert values == {"u1": 0.3, "u2": 0.9}


def test_series_are_capped_and_overflow_is_marked() -> None:
    telemetry = Telemetry({"metric_max_series": 5}, {})
    telemetry.consume([call(i, request_model=f"model-{i}", response_model=None) for i in range(20)])
    f = families(telemetry)
    requests = {s.labels.get("gen_ai_request_model", "overflow"): s.value for s in f["meterline_requests"].samples}
    assert len(requests) == 5 and requests["overflow"] == 16
    assert all(s.labels.get("otel_metric_overflow") == "true" for s in f["meterline_requests"].samples
               if "gen_ai_request_model" not in s.labels)
    assert telemetry.stats()["metric_series_overflow"] > 0


def test_scrapes_while_batches_arrive_stay_consistent() -> None:
    telemetry = Telemetry({}, {})
    items = [call(i) for i in range(100)]
    done = threading.Event()
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            for _ in range(50):
                telemetry.consume(items)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=feed)
    thread.start()
    seen = []
    while not done.is_set():
        f = families(telemetry)
        if "meterline_requests" in f:
            [sample] = f["meterline_requests"].samples
            [count] = samples(f["gen_ai_client_operation_duration_seconds"],
                              "gen_ai_client_operation_duration_seconds_count")
            assert count.value == sample.value  # one snapshot: never half a chunk
            seen.append(sample.value)
    thread.join()
    assert not errors and seen == sorted(seen)
    [sample] = families(telemetry)["meterline_requests"].samples
    assert sample.value == 5000


def test_metrics_off() -> None:
    telemetry = Telemetry({"metrics": False}, {})
    telemetry.consume(known_calls())
    telemetry.register_gauge("meterline.ledger.pending", "{record}", "x", lambda: 1)
    telemetry.set_budget_utilization("r", None, 0.5)
    assert telemetry.prometheus()[0] == b""


def test_a_broken_gauge_callback_costs_only_its_own_metric(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry({}, {})
    telemetry.register_gauge("meterline.broken", "1", "x", lambda: 1 / 0)
    telemetry.consume([call(0)])
    for _ in range(3):
        f = families(telemetry)
    assert "meterline_broken_ratio" not in f and "meterline_requests" in f
    assert len([r for r in caplog.records if "meterline.broken" in r.getMessage()]) == 1


@pytest.mark.parametrize(("name", "unit", "kind", "expected"), [
    ("gen_ai.client.token.usage", "{token}", "histogram", "gen_ai_client_token_usage"),
    ("gen_ai.client.operation.duration", "s", "histogram", "gen_ai_client_operation_duration_seconds"),
    ("meterline.cost", "USD", "counter", "meterline_cost_usd_total"),
    ("meterline.requests", "{request}", "counter", "meterline_requests_total"),
    ("meterline.budget.utilization", "1", "gauge", "meterline_budget_utilization_ratio"),
    ("meterline.ledger.write_lag", "s", "gauge", "meterline_ledger_write_lag_seconds"),
    ("http.server.request.size", "By", "histogram", "http_server_request_size_bytes"),
    ("throughput", "By/s", "gauge", "throughput_bytes_per_second"),
    ("already_seconds", "s", "gauge", "already_seconds"),
    ("jobs_total", "1", "counter", "jobs_total"),
])
def test_prometheus_names_follow_the_compatibility_rules(name: str, unit: str, kind: str, expected: str) -> None:
    assert metric_name(name, unit, kind) == expected
