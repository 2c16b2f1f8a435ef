"""Prometheus text exposition (format 0.0.4) of what the SDK's pull reader collected, named by the OpenTelemetry-to-Prometheus compatibility rules.

Kept on purpose instead of the SDK's PrometheusMetricReader (opentelemetry-exporter-prometheus),
whose output would change the names that dashboards, alert rules and tests use: it maps unit `1`
to nothing (`meterline_budget_utilization`, not `_ratio`), keeps `USD` upper-case
(`meterline_cost_USD_total`), puts `otel_scope_*` labels on every series, renders the cost sum
through a float (0.00108 for an exact 0.001080), and prometheus_client 0.26 serves
`version=1.0.0` by default. See exporters/README.md.

Names: characters other than [a-zA-Z0-9_:] become `_`; the unit is appended as a suffix
(`s` -> `_seconds`, `By` -> `_bytes`, `1` on a gauge -> `_ratio`, `USD` -> `_usd`, `a/b` ->
`_a_per_b`; annotations in braces such as `{token}` are dropped); counters end in `_total`.
Label names: dots become underscores. The resource goes out as `target_info`.
"""
from __future__ import annotations

import functools
import math
import re
from decimal import Decimal

from opentelemetry.sdk.metrics.export import Histogram, HistogramDataPoint, Metric, MetricsData, Sum

COUNTER = "counter"
HISTOGRAM = "histogram"
GAUGE = "gauge"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_UNITS = {
    "s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds",
    "min": "minutes", "h": "hours", "d": "days",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams",
    "Cel": "celsius", "Hz": "hertz", "%": "percent", "USD": "usd",
}
_PER = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}
_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]+")
_UNDERSCORES = re.compile(r"__+")


def unit_suffix(unit: str, kind: str) -> str:
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    if not unit:
        return ""
    if unit == "1":
        return "ratio" if kind == GAUGE else ""
    if "/" in unit:
        top, _, bottom = unit.partition("/")
        top_name = _UNITS.get(top, top) if top else ""
        bottom_name = _PER.get(bottom, _UNITS.get(bottom, bottom))
        return f"{top_name}_per_{bottom_name}" if top_name else f"per_{bottom_name}"
    return _UNITS.get(unit, unit)


def metric_name(name: str, unit: str, kind: str) -> str:
    """The Prometheus family name of an OpenTelemetry metric (without _bucket/_sum/_count)."""
    base = _UNDERSCORES.sub("_", _INVALID_NAME.sub("_", name)).strip("_")
    if base[:1].isdigit():
        base = "_" + base
    suffix = _UNDERSCORES.sub("_", _INVALID_NAME.sub("_", unit_suffix(unit, kind))).strip("_")
    if kind == COUNTER and base.endswith("_total"):
        base = base[: -len("_total")]
    if suffix and not base.endswith("_" + suffix) and base != suffix:
        base = f"{base}_{suffix}"
    if kind == COUNTER:
        base += "_total"
    return base


@functools.lru_cache(maxsize=4096)  # a few dozen names, looked up for every series
def label_name(name: str) -> str:
    label = _UNDERSCORES.sub("_", _INVALID_LABEL.sub("_", name))
    return "_" + label if label[:1].isdigit() else label


def render(data: MetricsData | None) -> bytes:
    """The text exposition of what the SDK's pull reader collected (cumulative since start)."""
    lines: list[str] = []
    if data is None:
        return b""
    for rm in data.resource_metrics:
        resource_labels = _labels(tuple(rm.resource.attributes.items()))
        if resource_labels:
            lines += ["# HELP target_info Target metadata", "# TYPE target_info gauge",
                      f"target_info{resource_labels} 1"]
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                _metric_lines(lines, metric)
    lines.append("")
    return "\n".join(lines).encode("utf-8")


def _metric_lines(lines: list[str], metric: Metric) -> None:
    points = metric.data.data_points
    if not points:
        return
    data = metric.data
    if isinstance(data, Histogram):
        kind = HISTOGRAM
    elif isinstance(data, Sum) and data.is_monotonic:
        kind = COUNTER
    else:  # a gauge, or an up-down sum (the compatibility rules make those gauges)
        kind = GAUGE
    family = metric_name(metric.name, metric.unit, kind)
    lines.append(f"# HELP {family} {_escape_help(metric.description)}")
    lines.append(f"# TYPE {family} {kind}")
    if kind == HISTOGRAM:
        for point in points:
            lines += _histogram_lines(family, point)  # type: ignore[arg-type]
    else:
        for point in points:
            value = point.value  # type: ignore[union-attr]
            lines.append(f"{family}{_labels(tuple(point.attributes.items()))} {_number(value)}")


def _histogram_lines(family: str, point: HistogramDataPoint) -> list[str]:
    # the label text is made once per point, not once per bucket line
    inner = _label_pairs(tuple(point.attributes.items()))
    prefix = f"{family}_bucket{{{inner}," if inner else f"{family}_bucket{{"
    labels = f"{{{inner}}}" if inner else ""
    lines = []
    cumulative = 0
    for bound, count in zip(point.explicit_bounds, point.bucket_counts):
        cumulative += count
        lines.append(f'{prefix}le="{_number(bound)}"}} {cumulative}')
    lines.append(f'{prefix}le="+Inf"}} {point.count}')
    lines.append(f"{family}_sum{labels} {_number(point.sum)}")
    lines.append(f"{family}_count{labels} {point.count}")
    return lines


def _labels(attributes: tuple) -> str:
    inner = _label_pairs(attributes)
    return "{" + inner + "}" if inner else ""


def _label_pairs(attributes: tuple) -> str:
    return ",".join(f'{label_name(k)}="{_escape_label(_label_value(v))}"' for k, v in attributes)


def _label_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(value: int | float | Decimal) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else ("NaN" if value.is_nan() else
                                                              ("+Inf" if value > 0 else "-Inf"))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
