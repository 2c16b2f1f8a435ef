"""A slow, failing or dead collector costs bounded memory and counted drops, never a blocked caller or a flood of log lines."""
from __future__ import annotations

import logging
import socket
import time
import types
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.exporter.otlp.common import http as sdk_http
from opentelemetry.exporter.otlp.proto.grpc import exporter as sdk_grpc

from exporters import Telemetry, workers
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, call

LOGGER = "meterline.telemetry"


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK exporters' backoff (2**n s, +-20%) in milliseconds instead of seconds, so a test sees many
    retries (the retry itself is the SDK's now: up to 6 attempts within the export timeout)."""
    monkeypatch.setattr(sdk_http._OTLPHTTPClient, "_compute_backoff", lambda self, retry: 0.005 * 2 ** retry)
    monkeypatch.setattr(sdk_grpc, "random", types.SimpleNamespace(uniform=lambda low, high: 0.005))


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver().start()
    yield r
    r.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def warnings_from(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING and text in r.getMessage()]


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_dead_endpoint_drops_and_counts_without_blocking(protocol: str) -> None:
    telemetry = Telemetry({"otlp_endpoint": f"http://127.0.0.1:{closed_port()}", "otlp_protocol": protocol,
                           "queue_max_spans": 100, "batch_max_spans": 50, "batch_delay_s": 0.01}, {})
    telemetry.start()
    items = [call(i) for i in range(1000)]
    started = time.perf_counter()
    for k in range(0, 1000, 100):
        telemetry.consume(items[k:k + 100])
    elapsed = time.perf_counter() - started
    # a sanity bound, not a benchmark: the work is tens of microseconds a record, and none of it waits on the network
    assert elapsed < 1.0
    stats = telemetry.stats()
    assert stats["spans_dropped_queue_full"] >= 1000 - 100 - 50  # the queue's bound, plus the batch in flight
    assert stats["spans_queued"] <= 100
    wait_until(lambda: telemetry.stats()["span_export_failures"] >= 1)
    started = time.perf_counter()
    telemetry.shutdown(1.0)
    assert time.perf_counter() - started < 2.0
    stats = telemetry.stats()
    assert stats["spans_exported"] == 0
    assert stats["spans_dropped"] + stats["spans_queued"] == 1000
    assert "Connection refused" in stats["last_export_error"] or "UNAVAILABLE" in stats["last_export_error"]


def test_a_hanging_collector_never_slows_consume(http_receiver: HttpReceiver) -> None:
    http_receiver.delay_s = 3.0
    telemetry = Telemetry({"otlp_endpoint": http_receiver.endpoint, "otlp_timeout_s": 0.3, "batch_delay_s": 0.01,
                           "queue_max_spans": 200, "batch_max_spans": 100}, {})
    telemetry.start()
    items = [call(i) for i in range(1000)]
    started = time.perf_counter()
    for k in range(0, 1000, 100):
        telemetry.consume(items[k:k + 100])
        time.sleep(0.01)  # the exporter thread is inside its send by now
    assert time.perf_counter() - started < 2.0  # far below the collector's 3 s: nothing waited on it
    wait_until(lambda: telemetry.stats()["span_export_failures"] >= 1)
    assert "timed out" in telemetry.stats()["last_export_error"]
    started = time.perf_counter()
    telemetry.shutdown(1.0)
    assert time.perf_counter() - started < 1.5


def test_logging_is_tamed_while_the_endpoint_stays_down(quick_retries: None,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    telemetry = Telemetry({"otlp_endpoint": endpoint, "batch_delay_s": 0.005, "batch_max_spans": 10,
                           "metrics_export_interval_s": 0.01}, {})
    telemetry.start()
    for k in range(30):
        telemetry.consume([call(i) for i in range(k * 10, k * 10 + 10)])
        time.sleep(0.005)
    wait_until(lambda: telemetry.stats()["span_export_failures"] >= 30
               and telemetry.stats()["metric_export_failures"] >= 10)
    telemetry.shutdown(1.0)
    assert len(warnings_from(caplog, "OTLP span export")) == 1
    assert len(warnings_from(caplog, "OTLP metric export")) == 1
    assert all(r.name == LOGGER for r in caplog.records if r.levelno >= logging.WARNING)  # no library noise


def test_failure_log_reports_once_a_minute_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    now = [1000.0]
    flog = workers.FailureLog("OTLP span export to X", clock=lambda: now[0])
    for step in range(120):  # two minutes of failures, one a second
        now[0] = 1000.0 + step
        flog.failed("Connection refused", dropped=10)
    flog.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "1 failed attempt since" in messages[0] and "10 dropped" in messages[0]
    assert "60 failed attempts since" in messages[1] and "600 dropped" in messages[1]
    assert messages[2] == "OTLP span export to X works again after 120 failed attempts"


def test_retryable_failures_are_retried_until_the_collector_recovers(
        quick_retries: None, http_receiver: HttpReceiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    http_receiver.fail_with = lambda attempt: 503 if attempt <= 3 else None
    telemetry = Telemetry({"otlp_endpoint": http_receiver.endpoint, "batch_delay_s": 0.01, "metrics": False}, {})
    telemetry.start()
    telemetry.consume([call(i) for i in range(5)])
    http_receiver.wait_for_spans(5)
    telemetry.shutdown(5)
    stats = telemetry.stats()
    assert (stats["spans_exported"], stats["spans_dropped"], stats["span_export_failures"]) == (5, 0, 3)
    assert any("works again after 3 failed attempts" in r.getMessage() for r in caplog.records)


def test_grpc_unavailable_is_retried(quick_retries: None, grpc_receiver: GrpcReceiver) -> None:
    grpc_receiver.fail_with = lambda attempt: grpc.StatusCode.UNAVAILABLE if attempt <= 2 else None
    telemetry = Telemetry({"otlp_endpoint": grpc_receiver.endpoint, "otlp_protocol": "grpc", "batch_delay_s": 0.01,
                           "metrics": False}, {})
    telemetry.start()
    telemetry.consume([call(i) for i in range(4)])
    grpc_receiver.wait_for_spans(4)
    telemetry.shutdown(5)
    assert (telemetry.stats()["spans_exported"], telemetry.stats()["span_export_failures"]) == (4, 2)


def test_grpc_export_resumes_when_the_collector_comes_up(quick_retries: None) -> None:
    # the SDK gives a batch up when its retries (within the export timeout) fail: the first batch is
    # dropped while the collector is down, and the next gets through once it is up (the channel
    # reconnects within its short reconnect backoff, not gRPC's default of up to 120 s)
    port = closed_port()
    telemetry = Telemetry({"otlp_endpoint": f"http://127.0.0.1:{port}", "otlp_protocol": "grpc",
                           "batch_delay_s": 0.01, "metrics": False}, {})
    telemetry.start()
    telemetry.consume([call(i) for i in range(3)])
    wait_until(lambda: telemetry.stats()["span_export_failures"] >= 3)
    wait_until(lambda: telemetry.stats()["spans_dropped_export"] == 3)
    receiver = GrpcReceiver().start(port)
    try:
        later = [call(i) for i in range(3, 6)]
        telemetry.consume(later)
        spans = receiver.wait_for_spans(3, timeout=10)
    finally:
        telemetry.shutdown(2)
        receiver.stop()
    assert {s.span_id.hex() for s in spans} == {r.span_id for r, _ in later}
    assert telemetry.stats()["spans_exported"] == 3


@pytest.mark.parametrize("status", [400, 401, 404])
def test_permanent_errors_drop_the_batch_without_retrying(http_receiver: HttpReceiver, status: int,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    http_receiver.fail_with = lambda attempt: status
    telemetry = Telemetry({"otlp_endpoint": http_receiver.endpoint, "batch_delay_s": 0.01, "metrics": False}, {})
    telemetry.start()
    telemetry.consume([call(i) for i in range(7)])
    wait_until(lambda: telemetry.stats()["spans_dropped"] == 7)
    telemetry.shutdown(2)
    assert http_receiver.attempts == 1
    assert telemetry.stats()["last_export_error"].startswith(f"HTTP {status}")
    assert len(warnings_from(caplog, "OTLP span export")) == 1


def test_the_retry_honours_the_servers_retry_after(quick_retries: None, http_receiver: HttpReceiver) -> None:
    # the backoff itself is the SDK's now (made milliseconds here): what we keep is that the hint is obeyed
    http_receiver.fail_with = lambda attempt: 429 if attempt == 1 else None
    http_receiver.retry_after = "1"
    telemetry = Telemetry({"otlp_endpoint": http_receiver.endpoint, "batch_delay_s": 0.01, "metrics": False}, {})
    telemetry.start()
    telemetry.consume([call(1)])
    http_receiver.wait_for_spans(1)
    telemetry.shutdown(2)
    first, second = http_receiver.attempt_times[:2]
    assert second - first >= 0.9
    assert (telemetry.stats()["span_export_failures"], telemetry.stats()["spans_exported"]) == (1, 1)
