"""The span pipeline on the OpenTelemetry SDK: a BatchSpanProcessor feeding the OTLP exporter, with the counts stats() reports.

`SpanPipeline.offer(spans)` hands finished SDK spans to the processor and never waits: what does
not fit in its queue (`queue_max_spans`) is dropped and counted here, before the processor would
drop (the oldest) with a warning of its own. The exporter is wrapped (`CountingExporter`) to count
exported, dropped and rejected spans, and to see each attempt the SDK exporter makes (its own
retry, the spec's) through an `otlp_exporters.Observer`: failures are counted and logged tamed
(`workers.FailureLog`), and the SDK exporter's own log lines during an export are kept out of the
sidecar's log (the FailureLog says the same, once a minute).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence, Sized

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from . import otlp_exporters
from .settings import Target
from .workers import SDK_LOGS, FailureLog

log = logging.getLogger("meterline.telemetry")

SHUTDOWN_GRACE_S = 0.5  # after shutdown's timeout, for the request in flight to end (and its batch be counted)

class CountingExporter(SpanExporter):
    """Wraps the SDK's OTLP span exporter: counts what each export did, and each attempt inside it."""

    def __init__(self, target: Target) -> None:
        self.endpoint = target.url
        self.log = FailureLog(f"OTLP span export to {target.url}")
        self.exported = 0
        self.dropped_export = 0
        self.rejected = 0
        self.failures = 0  # failed attempts (the SDK retries inside one export)
        self.last_error = ""
        self._idle = threading.Event()
        self._idle.set()
        self._rejected_now = 0
        self._rejected_message = ""
        self._attempt_failed = False
        self.inner = otlp_exporters.span_exporter(target, self)

    # --- otlp_exporters.Observer: each attempt -----------------------------------------------------

    def attempt_failed(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        self._attempt_failed = True
        self.log.failed(error)

    def attempt_succeeded(self, rejected: int, message: str) -> None:
        self._rejected_now += rejected
        self._rejected_message = message

    # --- SpanExporter ----------------------------------------------------------------------------

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        count = len(spans)
        self._idle.clear()
        self._rejected_now = 0
        self._attempt_failed = False
        try:
            with SDK_LOGS:
                result = self.inner.export(spans)
        except Exception as e:  # noqa: BLE001 - the processor's thread must survive anything a batch does
            result = SpanExportResult.FAILURE
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("exporting %d spans failed unexpectedly; they are dropped", count)
        if result is SpanExportResult.SUCCESS:
            rejected = min(self._rejected_now, count)
            self.exported += count - rejected
            if rejected:
                self.rejected += rejected
                log.warning("OTLP endpoint %s rejected %d of %d spans: %s", self.endpoint, rejected, count,
                            self._rejected_message)
            self.log.succeeded()
        else:
            self.dropped_export += count
            if self._attempt_failed:
                self.log.dropped(count)
            else:  # failed before any request (e.g. encoding, or the exporter shut down)
                self.log.failed(self.last_error or "export failed", dropped=count)
        self._idle.set()
        return result

    def shutdown(self) -> None:
        """Ends the SDK exporter's retries; an export still sending gets a moment to finish and be counted."""
        self.inner.shutdown()
        self._idle.wait(SHUTDOWN_GRACE_S)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class SpanPipeline:
    """The BatchSpanProcessor and its exporter; `offer()` from one thread (the caller of consume)."""

    def __init__(self, target: Target, max_queue: int, max_batch: int, delay_s: float) -> None:
        self.exporter = CountingExporter(target)
        self.max_queue = max_queue
        self.max_batch = min(max_batch, max_queue)
        self.delay_s = delay_s
        self.dropped_queue_full = 0
        self.processor: BatchSpanProcessor | None = None
        self._queue: Sized = ()
        self._shut = False

    def start(self) -> None:
        """Creates the processor, whose thread starts with it (once; offer() does it too if need be)."""
        if self.processor is None:
            self.processor = BatchSpanProcessor(self.exporter, max_queue_size=self.max_queue,
                                                schedule_delay_millis=self.delay_s * 1000.0,
                                                max_export_batch_size=self.max_batch)
            # SDK 1.45: the queue lives in the BatchProcessor inside (its length is the room left), and
            # only BatchProcessor.shutdown takes a timeout (BatchSpanProcessor.shutdown always waits 30 s)
            self._queue = self.processor._batch_processor._queue  # noqa: SLF001

    @property
    def queued(self) -> int:
        """Spans waiting in the processor's queue (not the batch being exported)."""
        return len(self._queue)

    def offer(self, spans: list[ReadableSpan]) -> None:
        """Queues what fits; drops and counts the rest (the newest). Never blocks."""
        if not spans:
            return
        if self._shut:  # after shutdown the processor would drop them uncounted
            self.dropped_queue_full += len(spans)
            return
        if self.processor is None:
            self.start()
        assert self.processor is not None
        room = self.max_queue - len(self._queue)  # only the processor's thread takes from it meanwhile
        if room < len(spans):
            self.dropped_queue_full += len(spans) - max(room, 0)
            spans = spans[:max(room, 0)]
        on_end = self.processor.on_end
        for span in spans:
            on_end(span)

    def shutdown(self, timeout_s: float) -> None:
        """Exports what is queued for up to `timeout_s`, then shuts the exporter down (which ends its retries)."""
        if self._shut:
            return
        self._shut = True
        if self.processor is None:
            self.exporter.shutdown()
            return
        self.processor._batch_processor.shutdown(timeout_millis=max(0.0, timeout_s) * 1000.0)  # noqa: SLF001
