"""The tamed failure log both exporters use (spans: exporters/span_export.py, metrics: exporters/metrics.py).

Both signals are sent by the OpenTelemetry SDK now. Failures are logged at most once per
`FailureLog.interval_s` per exporter, with counts, and once more on recovery; what the SDK's own
exporters log while ours run (`SDK_LOGS`) is held back, since FailureLog says it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("meterline.telemetry")


class FailureLog:
    """Tames logging of a failing exporter: one warning at the first failure, then at most one per interval."""

    def __init__(self, what: str, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.interval_s = interval_s
        self.clock = clock
        self.failing = False
        self._last_warning = float("-inf")
        self._failures = 0  # since the last warning
        self._dropped = 0
        self._total_failures = 0  # since the last success

    def failed(self, error: str, dropped: int = 0) -> None:
        self.failing = True
        self._failures += 1
        self._dropped += dropped
        self._total_failures += 1
        now = self.clock()
        if now - self._last_warning >= self.interval_s:
            extra = f"; {self._dropped} dropped" if self._dropped else ""
            log.warning("%s is failing: %s (%d failed attempt%s since the last report%s; "
                        "retrying with backoff, reported at most once a minute)", self.what, error,
                        self._failures, "" if self._failures == 1 else "s", extra)
            self._last_warning = now
            self._failures = 0
            self._dropped = 0

    def dropped(self, count: int) -> None:
        self._dropped += count

    def succeeded(self) -> None:
        if self.failing:
            log.info("%s works again after %d failed attempts", self.what, self._total_failures)
        self.failing = False
        self._failures = self._dropped = self._total_failures = 0
        self._last_warning = float("-inf")


# The SDK exporters' loggers: one line per failed attempt, and per retry. While one of our exporters
# runs on a thread, what they say there is held back (FailureLog says it, once, then at most once a
# minute, with counts; a warning is kept as the reason when an export failed before any request);
# elsewhere they log as usual.
SDK_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.common._internal",
    "opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder",
    "opentelemetry.exporter.otlp.json.http.trace_exporter",
    "opentelemetry.exporter.otlp.json.http.metric_exporter",
    "opentelemetry.exporter.otlp.json.http._internal",
    "opentelemetry.exporter.otlp.json.common._internal",
    "opentelemetry.exporter.otlp.json.common._internal.metrics_encoder",
)


class SdkLogTap(logging.Filter):
    """Holds back the SDK exporters' records on a thread while it is inside `with SDK_LOGS:`; the
    warnings are in the list the `with` gives."""

    _local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        said: list[str] | None = getattr(self._local, "said", None)
        if said is None:
            return True
        if record.levelno >= logging.WARNING:
            said.append(record.getMessage())
        return False

    def __enter__(self) -> list[str]:
        said: list[str] = []
        self._local.said = said
        return said

    def __exit__(self, *exc: object) -> None:
        self._local.said = None


SDK_LOGS = SdkLogTap()
for _name in SDK_EXPORTER_LOGGERS:
    logging.getLogger(_name).addFilter(SDK_LOGS)
