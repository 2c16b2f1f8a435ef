"""Prometheus text exposition (format 0.0.4) of the metric snapshots, named by the OpenTelemetry-to-Prometheus compatibility rules.

Names: characters other than [a-zA-Z0-9_:] become `_`; the unit is appended as a suffix
(`s` -> `_seconds`, `By` -> `_bytes`, `1` on a gauge -> `_ratio`, `USD` -> `_usd`, `a/b` ->
`_a_per_b`; annotations in braces such as `{token}` are dropped); counters end in `_total`.
Label names: dots become underscores. The resource goes out as `target_info`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from decimal import Decimal

from .metrics import COUNTER, GAUGE, HISTOGRAM, HistogramPoint, MetricSnapshot

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


def label_name(name: str) -> str:
    label = _UNDERSCORES.sub("_", _INVALID_LABEL.sub("_", name))
    return "_" + label if label[:1].isdigit() else label


def render(snapshots: Iterable[MetricSnapshot], resource: Iterable[tuple[str, object]] = ()) -> bytes:
    lines: list[str] = []
    resource_labels = _labels(tuple(resource))
    if resource_labels:
        lines += ["# HELP target_info Target metadata", "# TYPE target_info gauge", f"target_info{resource_labels} 1"]
    for snap in snapshots:
        if not snap.points:
            continue
        family = metric_name(snap.name, snap.unit, snap.kind)
        ptype = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}[snap.kind]
        lines.append(f"# HELP {family} {_escape_help(snap.description)}")
        lines.append(f"# TYPE {family} {ptype}")
        if snap.kind == HISTOGRAM:
            for attributes, point in snap.points:
                assert isinstance(point, HistogramPoint)
                lines += _histogram_lines(family, attributes, point, snap.bounds)
        else:
            for attributes, value in snap.points:
                lines.append(f"{family}{_labels(attributes)} {_number(value)}")  # type: ignore[arg-type]
    lines.append("")
    return "\n".join(lines).encode("utf-8")


def _histogram_lines(family: str, attributes: tuple, point: HistogramPoint, bounds: tuple[float, ...]) -> list[str]:
    lines = []
    cumulative = 0
    for bound, count in zip(bounds, point.counts):
        cumulative += count
        lines.append(f"{family}_bucket{_labels(attributes, ('le', _number(bound)))} {cumulative}")
    lines.append(f"{family}_bucket{_labels(attributes, ('le', '+Inf'))} {point.count}")
    lines.append(f"{family}_sum{_labels(attributes)} {_number(point.sum)}")
    lines.append(f"{family}_count{_labels(attributes)} {point.count}")
    return lines


def _labels(attributes: tuple, extra: tuple[str, str] | None = None) -> str:
    pairs = [(label_name(k), _label_value(v)) for k, v in attributes]
    if extra is not None:
        pairs.append(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


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
