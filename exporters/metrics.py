"""A small thread-safe metrics aggregator: counters, fixed-bucket histograms and gauges, keyed by attribute tuples.

One aggregation feeds both outputs (OTLP and Prometheus text), cumulatively since start.
Writers take `registry.lock` once per batch and call the instruments' `add`/`record`/`set`
while holding it; `collect()` takes a consistent snapshot under the same lock and then runs the
registered callbacks (outside it). Each instrument holds at most `max_series` attribute sets;
further ones are folded into a single series marked `otel.metric.overflow=true`, as the
OpenTelemetry SDK's cardinality limit does.
"""
from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Union

log = logging.getLogger("meterline.telemetry")

# an attribute set: (name, value) pairs in the instrument's label order; values are never None
Attributes = tuple[tuple[str, Union[str, int, bool]], ...]
Number = Union[int, float, Decimal]
GaugeCallback = Callable[[], Union[Number, None, Iterable[tuple[Mapping[str, Union[str, int, bool]], Number]]]]

COUNTER = "counter"
HISTOGRAM = "histogram"
GAUGE = "gauge"


@dataclass(slots=True)
class HistogramPoint:
    counts: list[int]  # len(bounds) + 1; bucket i holds values in (bounds[i-1], bounds[i]]
    sum: float = 0.0
    count: int = 0
    min: float = float("inf")
    max: float = float("-inf")


@dataclass(slots=True)
class MetricSnapshot:
    """One instrument's points at collection time (copies: safe to read without the lock)."""

    name: str
    unit: str
    description: str
    kind: str  # COUNTER, HISTOGRAM or GAUGE
    points: list[tuple[Attributes, Number | HistogramPoint]]
    bounds: tuple[float, ...] = ()


class _Instrument:
    kind = ""

    def __init__(self, name: str, unit: str, description: str, max_series: int, overflow_key: Attributes) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.max_series = max_series
        self.overflow_key = overflow_key
        self.overflowed = 0  # attribute sets folded into the overflow series

    def _admit(self, series: dict, attributes: Attributes) -> Attributes:
        """The key to use for a new attribute set: itself, or the overflow series once the cap is hit."""
        if len(series) < self.max_series - 1 or attributes == self.overflow_key:
            return attributes
        self.overflowed += 1
        return self.overflow_key


class Counter(_Instrument):
    """A monotonic sum. Values may be Decimal (cost stays exact until exported)."""

    kind = COUNTER

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.series: dict[Attributes, Number] = {}

    def add(self, attributes: Attributes, value: Number) -> None:
        series = self.series
        if attributes in series:
            series[attributes] += value
        else:
            key = self._admit(series, attributes)
            series[key] = series.get(key, 0) + value

    def snapshot(self) -> MetricSnapshot:
        return MetricSnapshot(self.name, self.unit, self.description, COUNTER, list(self.series.items()))


class Histogram(_Instrument):
    kind = HISTOGRAM

    def __init__(self, name: str, unit: str, description: str, max_series: int, overflow_key: Attributes,
                 bounds: tuple[float, ...]) -> None:
        super().__init__(name, unit, description, max_series, overflow_key)
        self.bounds = tuple(bounds)
        self.series: dict[Attributes, HistogramPoint] = {}

    def record(self, attributes: Attributes, value: float) -> None:
        point = self.series.get(attributes)
        if point is None:
            key = self._admit(self.series, attributes)
            point = self.series.get(key)
            if point is None:
                point = self.series[key] = HistogramPoint([0] * (len(self.bounds) + 1))
        point.counts[bisect_left(self.bounds, value)] += 1
        point.sum += value
        point.count += 1
        if value < point.min:
            point.min = value
        if value > point.max:
            point.max = value

    def snapshot(self) -> MetricSnapshot:
        points = [(k, HistogramPoint(list(p.counts), p.sum, p.count, p.min, p.max)) for k, p in self.series.items()]
        return MetricSnapshot(self.name, self.unit, self.description, HISTOGRAM, points, self.bounds)


class Gauge(_Instrument):
    """The last value set for each attribute set."""

    kind = GAUGE

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.series: dict[Attributes, Number] = {}

    def set(self, attributes: Attributes, value: Number) -> None:
        if attributes not in self.series:
            attributes = self._admit(self.series, attributes)
        self.series[attributes] = value

    def snapshot(self) -> MetricSnapshot:
        return MetricSnapshot(self.name, self.unit, self.description, GAUGE, list(self.series.items()))


@dataclass(slots=True)
class _Callback:
    name: str
    unit: str
    description: str
    kind: str  # GAUGE or COUNTER (an observed cumulative total)
    fn: GaugeCallback
    failing: bool = field(default=False)


class Registry:
    """The instruments, plus callbacks observed at collection time; `start_ns` is the cumulative start."""

    def __init__(self, max_series: int = 2000, overflow_key: Attributes = (("otel.metric.overflow", True),)) -> None:
        self.lock = threading.Lock()
        self.max_series = max_series
        self.overflow_key = overflow_key
        self.start_ns = time.time_ns()
        self._instruments: list[Counter | Histogram | Gauge] = []
        self._callbacks: list[_Callback] = []

    def counter(self, name: str, unit: str, description: str) -> Counter:
        return self._add(Counter(name, unit, description, self.max_series, self.overflow_key))

    def histogram(self, name: str, unit: str, description: str, bounds: tuple[float, ...]) -> Histogram:
        return self._add(Histogram(name, unit, description, self.max_series, self.overflow_key, bounds))

    def gauge(self, name: str, unit: str, description: str) -> Gauge:
        return self._add(Gauge(name, unit, description, self.max_series, self.overflow_key))

    def _add(self, instrument):  # type: ignore[no-untyped-def]
        with self.lock:
            if any(i.name == instrument.name for i in self._instruments) or any(
                    c.name == instrument.name for c in self._callbacks):
                raise ValueError(f"metric {instrument.name!r} is already registered")
            self._instruments.append(instrument)
        return instrument

    def observe(self, name: str, unit: str, description: str, fn: GaugeCallback, kind: str = GAUGE) -> None:
        """Registers a callback read at each collection: it returns a number, None (no point), or
        an iterable of (attributes mapping, number) pairs."""
        if kind not in (GAUGE, COUNTER):
            raise ValueError(f"observed metric {name!r}: kind must be gauge or counter")
        with self.lock:
            if any(i.name == name for i in self._instruments) or any(c.name == name for c in self._callbacks):
                raise ValueError(f"metric {name!r} is already registered")
            self._callbacks.append(_Callback(name, unit, description, kind, fn))

    def collect(self) -> list[MetricSnapshot]:
        with self.lock:
            result = [i.snapshot() for i in self._instruments]
            callbacks = list(self._callbacks)
        for cb in callbacks:
            snapshot = self._observe(cb)
            if snapshot is not None:
                result.append(snapshot)
        return result

    def overflowed(self) -> int:
        with self.lock:
            return sum(i.overflowed for i in self._instruments)

    @staticmethod
    def _observe(cb: _Callback) -> MetricSnapshot | None:
        try:
            value = cb.fn()
            if value is None:
                points: list[tuple[Attributes, Number]] = []
            elif isinstance(value, (int, float, Decimal)):
                points = [((), value)]
            else:
                points = [(tuple((str(k), v) for k, v in attrs.items()), number) for attrs, number in value]
        except Exception:  # noqa: BLE001 - a broken callback costs its own metric, nothing else
            if not cb.failing:
                log.warning("metric callback for %s failed; its metric is left out until it works", cb.name,
                            exc_info=True)
            cb.failing = True
            return None
        if cb.failing:
            cb.failing = False
            log.info("metric callback for %s works again", cb.name)
        return MetricSnapshot(cb.name, cb.unit, cb.description, cb.kind, points)
