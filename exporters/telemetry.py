"""The sidecar's one telemetry object: takes finished calls in batches and turns them into OTLP spans and metrics (on the OpenTelemetry SDK) and Prometheus text.

Wiring (see exporters/README.md):

    telemetry = Telemetry(config.telemetry, os.environ, config.app)
    runtime.tracing = telemetry.tracing_enabled
    writer.sinks.append(telemetry)           # consume(batch) runs on the ledger writer thread
    telemetry.register_gauge("meterline.ledger.pending", "{record}", "...", lambda: writer.pending)
    telemetry.start()
    ...
    body, content_type = telemetry.prometheus()   # GET /_meterline/metrics
    telemetry.shutdown(5.0)
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from ledger.records import CallExtras, CallRecord

from . import otlp_exporters, prometheus, semconv
from .call_metrics import CallMetrics
from .metrics import GaugeCallback, MetricsPipeline, PushExporter
from .sampling import Sampler
from .settings import TelemetrySettings, load_settings, tracing_enabled
from .span_export import SpanPipeline
from .spans import SpanBuilder


class Telemetry:
    def __init__(self, telemetry_config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None,
                 app_name: str | None = None) -> None:
        """Validates the settings (ValueError naming the key) and builds what they ask for; starts nothing
        but the SDK's metric push timer (with an OTLP metrics endpoint: the first push one interval later)."""
        self.settings: TelemetrySettings = load_settings(telemetry_config, os.environ if env is None else env,
                                                         app_name)
        s = self.settings
        self.sampler = Sampler(s.sampler, s.sampler_arg)
        self.registry: MetricsPipeline | None = None
        self._calls: CallMetrics | None = None
        self._spans: SpanPipeline | None = None
        self._builder: SpanBuilder | None = None
        self._metrics: PushExporter | None = None
        self.sampled_out = 0
        if tracing_enabled(s):
            assert s.traces is not None
            self._builder = SpanBuilder(s)
            # the SDK exporter is built now (a bad protocol or certificate fails here); its processor's
            # thread only at start()
            self._spans = SpanPipeline(s.traces, s.queue_max_spans, s.batch_max_spans, s.batch_delay_s)
        if s.metrics:  # last: the SDK's metric push timer starts with it
            target = s.metrics_target
            self._metrics = PushExporter(otlp_exporters.metric_exporter, target) if target is not None else None
            self.registry = MetricsPipeline(s, self._metrics)
            self._calls = CallMetrics(self.registry, s)
        self._register_own_metrics()

    # --- what the sidecar asks -------------------------------------------------------------------

    @property
    def tracing_enabled(self) -> bool:
        """Spans are exported, so upstream requests should carry the call's own span context."""
        return self._spans is not None

    @property
    def capture_content(self) -> bool:
        """Whether the sidecar should fill extras.input_messages / output_messages."""
        return self.settings.capture_content and self._spans is not None

    def should_sample(self, trace_id: str, parent_span_id: str | None, parent_sampled: bool = True) -> bool:
        """The sampling decision a call's span will get (e.g. for the sampled flag sent upstream)."""
        return self._spans is not None and self.sampler(trace_id, parent_span_id, parent_sampled)

    def consume(self, batch: list[tuple[CallRecord, CallExtras | None]]) -> None:
        """Takes a batch of finished calls (ledger writer thread): aggregates metrics, builds the sampled
        calls' SDK spans and hands them to the batch processor (never waits on the network)."""
        if self._calls is not None:
            self._calls.record_batch(batch)
        spans = self._spans
        if spans is None or not batch:
            return
        sampler = self.sampler
        if sampler.name == "always_on":
            keep = batch
        else:
            keep = [item for item in batch
                    if sampler(item[0].trace_id, item[1].parent_span_id if item[1] is not None else None,
                               item[1].sampled if item[1] is not None else True)]
            self.sampled_out += len(batch) - len(keep)
        assert self._builder is not None
        spans.offer(self._builder.build_all(keep))

    def prometheus(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text exposition format, and its content type."""
        if self.registry is None:
            return b"", prometheus.CONTENT_TYPE
        return prometheus.render(self.registry.collect()), prometheus.CONTENT_TYPE

    def register_gauge(self, name: str, unit: str, description: str, fn: GaugeCallback) -> None:
        """A gauge read from `fn` at each collection: a number, None, or (attributes, number) pairs."""
        if self.registry is not None:
            self.registry.observe_gauge(name, unit, description, fn)

    def set_budget_utilization(self, rule: str, key: str | None, value: float | Decimal) -> None:
        if self._calls is not None:
            self._calls.set_budget_utilization(rule, key, value)

    def stats(self) -> dict[str, Any]:
        spans, metrics = self._spans, self._metrics
        return {
            "tracing": spans is not None,
            "traces_endpoint": spans.exporter.endpoint if spans is not None else None,
            "metrics_endpoint": metrics.endpoint if metrics is not None else None,
            "spans_queued": spans.queued if spans is not None else 0,
            "spans_exported": spans.exporter.exported if spans is not None else 0,
            # dropped = queue full + export given up (after the SDK's retries) + rejected by the endpoint
            "spans_dropped": self._spans_dropped(),
            "spans_dropped_queue_full": spans.dropped_queue_full if spans is not None else 0,
            "spans_dropped_export": spans.exporter.dropped_export if spans is not None else 0,
            "spans_rejected": spans.exporter.rejected if spans is not None else 0,
            "spans_sampled_out": self.sampled_out,
            "spans_invalid": self._builder.invalid if self._builder is not None else 0,
            "span_export_failures": spans.exporter.failures if spans is not None else 0,
            "metric_exports": metrics.exports if metrics is not None else 0,
            "metric_export_failures": metrics.failures if metrics is not None else 0,
            "metric_series_overflow": self.registry.overflowed() if self.registry is not None else 0,
            "last_export_error": (spans.exporter.last_error if spans is not None else "") or (
                metrics.last_error if metrics is not None else ""),
        }

    def start(self) -> None:
        if self._spans is not None:
            self._spans.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flushes queued spans and pushes the metrics one last time, within about `timeout` seconds."""
        deadline = time.monotonic() + timeout
        # the last metric push runs beside the span flush (each within the deadline), not after it
        last_push = None
        if self.registry is not None:
            last_push = threading.Thread(target=self.registry.shutdown, args=(timeout,), name="meterline-metrics-stop",
                                         daemon=True)
            last_push.start()
        if self._spans is not None:
            self._spans.shutdown(max(0.0, deadline - time.monotonic()))
        if last_push is not None:
            last_push.join(max(0.0, deadline - time.monotonic()) + 0.5)

    # --- inside ----------------------------------------------------------------------------------

    def _spans_dropped(self) -> int:
        spans = self._spans
        if spans is None:
            return 0
        return spans.dropped_queue_full + spans.exporter.dropped_export + spans.exporter.rejected

    def _register_own_metrics(self) -> None:
        if self.registry is None:
            return
        spans, metrics = self._spans, self._metrics
        if spans is not None:
            self.registry.observe_counter(semconv.SPANS_EXPORTED.name, semconv.SPANS_EXPORTED.unit,
                                          semconv.SPANS_EXPORTED.description, lambda: spans.exporter.exported)
            self.registry.observe_counter(semconv.SPANS_DROPPED.name, semconv.SPANS_DROPPED.unit,
                                          semconv.SPANS_DROPPED.description, self._spans_dropped)
        if spans is not None or metrics is not None:
            def failures() -> list[tuple[dict[str, str], int]]:
                result = []
                if spans is not None:
                    result.append(({"signal": "traces"}, spans.exporter.failures))
                if metrics is not None:
                    result.append(({"signal": "metrics"}, metrics.failures))
                return result

            self.registry.observe_counter(semconv.EXPORT_FAILURES.name, semconv.EXPORT_FAILURES.unit,
                                          semconv.EXPORT_FAILURES.description, failures)


__all__ = ["Telemetry", "TelemetrySettings", "load_settings", "tracing_enabled"]
