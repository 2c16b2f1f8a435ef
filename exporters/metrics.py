"""The metrics pipeline on the OpenTelemetry SDK: one MeterProvider, read for Prometheus scrapes and pushed over OTLP.

The provider has our resource (no SDK defaults or detectors: the settings already merged
OTEL_RESOURCE_ATTRIBUTES and the service name), the `meterline` scope, a View per histogram
with the bucket boundaries of `semconv.HISTOGRAM_BUCKETS`, exemplars off, and its readers:

- with an OTLP target, the SDK's PeriodicExportingMetricReader (`PushReader`) around the SDK OTLP
  exporter (`otlp_exporters.metric_exporter`), wrapped in `PushExporter` to count pushes and
  failed attempts and to say failures once a minute instead of the SDK's line per attempt;
- for `/_meterline/metrics`, `collect()` reads that same reader's cumulative totals (`pull`),
  so every measurement is aggregated once; without a push, or when the push is delta
  (OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE), a pull reader of its own (the SDK's
  InMemoryMetricReader, cumulative) instead.

The cardinality rule is the SDK's: a reader keeps `metric_max_series - 1` attribute sets per
metric and folds further ones into one `otel.metric.overflow=true` series, so a metric shows at
most `metric_max_series` series, as before (`metric_max_series: 1` gives one series plus the
overflow one, the SDK's smallest limit being 1).

`lock` makes a scrape one snapshot: CallMetrics holds it while it records a chunk of calls and
`collect()` holds it while it collects, so a scrape never shows half a chunk (the push's own
collections, on its thread, do not take it: cumulative totals catch up at the next push).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any, Union

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from . import semconv
from .settings import Target, TelemetrySettings
from .spans import sdk_resource
from .workers import SDK_LOGS, FailureLog

log = logging.getLogger("meterline.telemetry")

Number = Union[int, float, Decimal]
GaugeCallback = Callable[[], Union[Number, None, Iterable[tuple[Mapping[str, Union[str, int, bool]], Number]]]]

OVERFLOW_ATTRIBUTE = "otel.metric.overflow"


class MetricsPipeline:
    """The MeterProvider and its readers; instruments are made here so names are registered once."""

    def __init__(self, settings: TelemetrySettings, push: PushExporter | None = None) -> None:
        self.lock = threading.Lock()
        self.start_ns = time.time_ns()
        limit = max(1, settings.metric_max_series - 1)
        limits: dict[type, int] = {cls: limit for cls in (Counter, UpDownCounter, Histogram, ObservableCounter,
                                                          ObservableUpDownCounter, ObservableGauge)}
        self.push = push
        readers: list[Any] = []
        if push is not None:
            push_reader = PushReader(push, export_interval_millis=settings.metrics_export_interval_s * 1000.0,
                                     cardinality_limits=limits)
            readers.append(push_reader)
        if push is not None and all(t is AggregationTemporality.CUMULATIVE
                                    for t in push._preferred_temporality.values()):
            # one aggregation for both: the scrape reads the push reader's cumulative totals (a second
            # reader would aggregate every measurement again, ~40% more CPU a call)
            self._pull: Callable[[], MetricsData | None] = push_reader.pull
        else:  # no push, or a delta push (the scrape must stay cumulative): a reader of its own
            pull_reader = InMemoryMetricReader(cardinality_limits=limits)
            readers.append(pull_reader)
            self._pull = pull_reader.get_metrics_data
        views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
                 for name, bounds in semconv.HISTOGRAM_BUCKETS.items()]
        # exemplars off: calls are recorded on the ledger writer's thread, where no span is current, so
        # the default trace-based filter would only spend time deciding not to keep one
        self.provider = MeterProvider(readers, resource=sdk_resource(settings), views=views,
                                      exemplar_filter=AlwaysOffExemplarFilter(), shutdown_on_exit=False)
        self.meter = self.provider.get_meter(semconv.SCOPE_NAME, semconv.SCOPE_VERSION)
        self._names: set[str] = set()
        self._overflowed = 0
        self._shut = False

    # --- instruments -----------------------------------------------------------------------------

    def counter(self, metric: semconv.Metric) -> Any:
        self._claim(metric.name)
        return self.meter.create_counter(metric.name, metric.unit, metric.description)

    def histogram(self, metric: semconv.Metric) -> Any:
        self._claim(metric.name)
        return self.meter.create_histogram(metric.name, metric.unit, metric.description)

    def observe_gauge(self, name: str, unit: str, description: str, fn: GaugeCallback) -> None:
        """A gauge read from `fn` at each collection: a number, None, or (attributes, number) pairs."""
        self._claim(name)
        self.meter.create_observable_gauge(name, [_callback(name, fn)], unit, description)

    def observe_counter(self, name: str, unit: str, description: str, fn: GaugeCallback) -> None:
        """A monotonic total kept elsewhere (e.g. spans exported), read at each collection."""
        self._claim(name)
        self.meter.create_observable_counter(name, [_callback(name, fn)], unit, description)

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"metric {name!r} is already registered")
        self._names.add(name)

    # --- reading ---------------------------------------------------------------------------------

    def collect(self) -> MetricsData | None:
        """Everything, cumulative since start, as one snapshot (for the Prometheus text)."""
        with self.lock:
            data = self._pull()
        self._overflowed = count_overflowed(data)
        return data

    def overflowed(self) -> int:
        """Metrics whose series reached metric_max_series, as of the last scrape or push."""
        push = self.push.overflowed if self.push is not None else 0
        return max(self._overflowed, push)

    def shutdown(self, timeout_s: float) -> None:
        """The last OTLP push (the periodic reader's, on its thread), within about `timeout_s`."""
        if self._shut:
            return
        self._shut = True
        try:
            self.provider.shutdown(timeout_millis=max(timeout_s, 0.001) * 1000.0)
        except Exception:  # noqa: BLE001 - a reader that failed to stop is not the caller's problem
            log.debug("metric provider shutdown", exc_info=True)


class PushReader(PeriodicExportingMetricReader):
    """The SDK's periodic OTLP push, which a scrape can also read (`pull`) without sending anything.

    `_receive_metrics` is the reader hook the SDK means subclasses to override: a collection made by
    `pull()` is handed back to its caller on that thread instead of to the exporter, so a scrape never
    waits for a push in flight (the export lock) nor sends one. Only right for cumulative temporality,
    where each collection holds the full totals whoever asks for it.
    """

    def __init__(self, exporter: MetricExporter, **kwargs: Any) -> None:
        self._pulling = threading.local()
        super().__init__(exporter, **kwargs)

    def pull(self) -> MetricsData | None:
        self._pulling.data = None
        self._pulling.active = True
        try:
            self.collect()
            return self._pulling.data
        finally:
            self._pulling.active = False
            self._pulling.data = None

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        if getattr(self._pulling, "active", False):
            self._pulling.data = metrics_data
            return
        super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)


def count_overflowed(data: MetricsData | None) -> int:
    if data is None:
        return 0
    return sum(1 for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
               if any(OVERFLOW_ATTRIBUTE in (p.attributes or ()) for p in m.data.data_points))


def _callback(name: str, fn: GaugeCallback) -> Callable[[CallbackOptions], list[Observation]]:
    """An SDK callback around `fn`: a broken `fn` costs its own metric (logged once), nothing else."""
    failing = False

    def observe(options: CallbackOptions) -> list[Observation]:
        nonlocal failing
        try:
            value = fn()
            if value is None:
                points: list[Observation] = []
            elif isinstance(value, (int, float, Decimal)):
                points = [Observation(_plain(value))]
            else:
                points = [Observation(_plain(number), {str(k): v for k, v in attrs.items()}) for attrs, number in value]
        except Exception:  # noqa: BLE001
            if not failing:
                log.warning("metric callback for %s failed; its metric is left out until it works", name,
                            exc_info=True)
            failing = True
            return []
        if failing:
            failing = False
            log.info("metric callback for %s works again", name)
        return points

    return observe


def _plain(value: Number) -> int | float:
    return value if isinstance(value, (int, float)) else float(value)


# --- the OTLP push ----------------------------------------------------------------------------------

class PushExporter(MetricExporter):
    """The SDK's OTLP metric exporter, counted: pushes, failed attempts (the SDK retries inside one push, each
    attempt is seen through `otlp_exporters.Observer`), the last failure's reason, overflowed metrics."""

    def __init__(self, make_exporter: Callable[..., MetricExporter], target: Target) -> None:
        self.endpoint = target.url
        self.log = FailureLog(f"OTLP metric export to {target.url}")
        self.exports = 0
        self.failures = 0  # failed attempts
        self.rejected = 0  # data points a collector refused in a partial success
        self.last_error = ""
        self.overflowed = 0
        self._attempt_failed = False
        self.inner = make_exporter(target, self)
        # the periodic reader takes temporality from its exporter: the SDK exporter's (cumulative unless
        # OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE says otherwise, as the SDK reads it)
        super().__init__(preferred_temporality=getattr(self.inner, "_preferred_temporality", None),
                         preferred_aggregation=getattr(self.inner, "_preferred_aggregation", None))

    # --- otlp_exporters.Observer: each attempt -----------------------------------------------------

    def attempt_failed(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        self._attempt_failed = True
        self.log.failed(error)

    def attempt_succeeded(self, rejected: int, message: str) -> None:
        if rejected:
            self.rejected += rejected
            log.warning("OTLP endpoint %s rejected %d metric data points: %s", self.endpoint, rejected, message)

    # --- MetricExporter ----------------------------------------------------------------------------

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        self.overflowed = count_overflowed(metrics_data)
        self._attempt_failed = False
        with SDK_LOGS as said:
            try:
                result = self.inner.export(floats(metrics_data), timeout_millis=timeout_millis, **kwargs)
            except Exception as e:  # noqa: BLE001 - the reader's thread must survive anything
                said.append(f"{type(e).__name__}: {e}")
                result = MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            self.exports += 1
            self.log.succeeded()
        elif not self._attempt_failed:  # failed before any request (encoding, or shut down)
            self.failures += 1
            self.last_error = said[-1] if said else "export failed"
            self.log.failed(self.last_error)
        # cumulative totals: the next push carries everything this one had
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with SDK_LOGS:
            self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def floats(data: MetricsData) -> MetricsData:
    """`data` with Decimal sums (the cost) as floats: OTLP has no decimal type, and the http/json encoder
    cannot serialize one. Only the metrics holding a Decimal are copied."""
    resource_metrics = []
    for rm in data.resource_metrics:
        scope_metrics = []
        for sm in rm.scope_metrics:
            metrics = [m if not any(isinstance(getattr(p, "value", None), Decimal) for p in m.data.data_points) else
                       replace(m, data=replace(m.data, data_points=[
                           replace(p, value=float(p.value)) if isinstance(p.value, Decimal) else p
                           for p in m.data.data_points]))
                       for m in sm.metrics]
            scope_metrics.append(replace(sm, metrics=metrics))
        resource_metrics.append(replace(rm, scope_metrics=scope_metrics))
    return replace(data, resource_metrics=resource_metrics)
