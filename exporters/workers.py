"""The metrics push thread, and the tamed failure log both exporters use.

Spans go through the OpenTelemetry SDK's BatchSpanProcessor now (exporters/span_export.py).
Failures are logged at most once per `FailureLog.interval_s` per exporter, with counts, and once
more on recovery.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .otlp_transport import Transport

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


class _Worker:
    """The thread handling both workers share: start once, and join then close the transport."""

    _thread: threading.Thread | None
    transport: Transport
    thread_name = "meterline-otlp"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still in its last attempt: a daemon thread, it ends on its own
            self._thread = None
        else:
            self._last_attempt()  # never started: send what there is from here
        self.transport.close()

    def _run(self) -> None:
        raise NotImplementedError

    def _last_attempt(self) -> None:
        raise NotImplementedError


class MetricWorker(_Worker):
    """Pushes the cumulative metrics every `interval_s` (and once more at shutdown)."""

    thread_name = "meterline-otlp-metrics"

    def __init__(self, build_request: Callable[[], bytes | None], transport: Transport, interval_s: float) -> None:
        self.build_request = build_request
        self.transport = transport
        self.interval_s = interval_s
        self.log = FailureLog(f"OTLP metric export to {transport.endpoint}")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.exports = 0
        self.failures = 0
        self.last_error = ""

    def stop(self) -> None:
        """Asks the thread to make its last push and end (see `join`)."""
        self._stopping.set()

    def _last_attempt(self) -> None:
        self.export_once()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.export_once()
        self.export_once()

    def export_once(self) -> bool:
        try:
            body = self.build_request()
        except Exception:  # noqa: BLE001
            log.exception("building the OTLP metrics request failed")
            return False
        if body is None:
            return True
        result = self.transport.send(body)
        if result.ok:
            self.exports += 1
            self.log.succeeded()
            return True
        # cumulative totals: the next push carries everything this one had, so no retry here
        self.failures += 1
        self.last_error = result.error
        self.log.failed(result.error)
        return False
