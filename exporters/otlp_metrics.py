"""Metric snapshots as an OTLP ExportMetricsServiceRequest (cumulative temporality), built with the opentelemetry.proto messages.

This runs once per export interval over a few hundred series at most, so the message classes'
cost does not matter here (unlike spans, see spans.py).
"""
from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .metrics import COUNTER, GAUGE, HISTOGRAM, HistogramPoint, MetricSnapshot
from .resource import any_value_message

CUMULATIVE = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def request(snapshots: Iterable[MetricSnapshot], resource: Resource, scope: InstrumentationScope,
            start_ns: int, now_ns: int) -> bytes:
    req = ExportMetricsServiceRequest()
    resource_metrics = req.resource_metrics.add()
    resource_metrics.resource.CopyFrom(resource)
    scope_metrics = resource_metrics.scope_metrics.add()
    scope_metrics.scope.CopyFrom(scope)
    for snap in snapshots:
        if not snap.points:
            continue
        metric = scope_metrics.metrics.add(name=snap.name, unit=snap.unit, description=snap.description)
        if snap.kind == HISTOGRAM:
            metric.histogram.aggregation_temporality = CUMULATIVE
            for attributes, point in snap.points:
                assert isinstance(point, HistogramPoint)
                dp = metric.histogram.data_points.add(
                    start_time_unix_nano=start_ns, time_unix_nano=now_ns, count=point.count, sum=float(point.sum),
                    bucket_counts=point.counts, explicit_bounds=[float(b) for b in snap.bounds])
                if point.count:
                    dp.min = float(point.min)
                    dp.max = float(point.max)
                _attributes(dp.attributes, attributes)
        elif snap.kind == COUNTER:
            metric.sum.aggregation_temporality = CUMULATIVE
            metric.sum.is_monotonic = True
            for attributes, value in snap.points:
                _number_point(metric.sum.data_points.add(start_time_unix_nano=start_ns, time_unix_nano=now_ns),
                              attributes, value)  # type: ignore[arg-type]
        elif snap.kind == GAUGE:
            for attributes, value in snap.points:
                _number_point(metric.gauge.data_points.add(time_unix_nano=now_ns), attributes, value)  # type: ignore[arg-type]
    return req.SerializeToString()


def _number_point(dp: metrics_pb2.NumberDataPoint, attributes: tuple, value: int | float | Decimal) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        dp.as_int = value
    else:
        dp.as_double = float(value)
    _attributes(dp.attributes, attributes)


def _attributes(target, attributes: tuple) -> None:  # type: ignore[no-untyped-def]
    target.extend(KeyValue(key=k, value=any_value_message(v)) for k, v in attributes)
