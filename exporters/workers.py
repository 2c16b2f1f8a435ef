"""The span exporter thread (a bounded queue shipped in batches with retry and backoff) and the failure log both signals use (metrics are pushed by the SDK's reader, exporters/metrics.py).

Nothing here ever blocks the caller of `offer()`: when the queue is full, spans are dropped and
counted. A failing endpoint is retried with exponential backoff (honouring Retry-After) for up
to `RETRY_WINDOW_S` per batch, then the batch is dropped and counted. Failures are logged at
most once per `FailureLog.interval_s` per exporter, with counts, and once more on recovery.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable

from ledger.records import CallExtras, CallRecord

from .otlp_transport import ExportResult, Transport
from .spans import SpanEncoder

log = logging.getLogger("meterline.telemetry")

RETRY_WINDOW_S = 60.0  # how long one batch of spans is retried before it is dropped
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0

Item = tuple[CallRecord, CallExtras | None]


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


def backoff_s(consecutive_failures: int, hint: float | None = None) -> float:
    if hint is not None:
        return min(hint, BACKOFF_MAX_S * 2)
    base = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, consecutive_failures - 1))
    return base * random.uniform(0.8, 1.2)


class _Worker:
    """The thread handling of a worker: start once, and join then close the transport."""

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


class SpanWorker(_Worker):
    """Owns the span queue and the thread that encodes and sends it."""

    thread_name = "meterline-otlp-spans"

    def __init__(self, encoder: SpanEncoder, transport: Transport, max_queue: int, max_batch: int,
                 delay_s: float) -> None:
        self.encoder = encoder
        self.transport = transport
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.log = FailureLog(f"OTLP span export to {transport.endpoint}")
        self._queue: collections.deque[Item] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._consecutive_failures = 0
        self._flush_deadline: float | None = None
        # counters (each written by one thread only)
        self.dropped_queue_full = 0  # by offer()
        self.exported = 0  # the rest by the worker thread
        self.dropped_export = 0
        self.rejected = 0
        self.failures = 0
        self.last_error = ""

    @property
    def queued(self) -> int:
        return len(self._queue)

    def offer(self, items: list[Item]) -> None:
        """Queues what fits; drops and counts the rest. Never blocks for longer than a lock hand-off."""
        if not items:
            return
        with self._cond:
            room = self.max_queue - len(self._queue)
            if room >= len(items):
                self._queue.extend(items)
            else:
                if room > 0:
                    self._queue.extend(items[:room])
                self.dropped_queue_full += len(items) - max(room, 0)
            if len(self._queue) >= self.max_batch:
                self._cond.notify()

    def stop(self, deadline: float) -> None:
        """Asks the thread to send what is queued (one attempt per batch, until `deadline`, a
        time.monotonic() value) and end; `join` waits for it."""
        self._flush_deadline = deadline
        self._stopping.set()
        with self._cond:
            self._cond.notify()

    def _last_attempt(self) -> None:
        self._flush()

    # --- the worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = self._next_batch()
            if batch:
                try:
                    self._export(batch)
                except Exception:  # noqa: BLE001 - the thread must survive anything a batch does
                    self.dropped_export += len(batch)
                    log.exception("exporting %d spans failed unexpectedly; they are dropped", len(batch))
        self._flush()

    def _next_batch(self) -> list[Item]:
        wake_at = time.monotonic() + self.delay_s
        with self._cond:
            while len(self._queue) < self.max_batch and not self._stopping.is_set():
                remaining = wake_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take()

    def _take(self) -> list[Item]:
        queue = self._queue
        count = min(len(queue), self.max_batch)
        return [queue.popleft() for _ in range(count)]

    def _flush(self) -> None:
        deadline = self._flush_deadline if self._flush_deadline is not None else time.monotonic() + 5.0
        while True:
            with self._cond:
                batch = self._take()
            if not batch:
                return
            if time.monotonic() >= deadline:
                with self._cond:
                    rest = len(self._queue)
                    self._queue.clear()
                self.dropped_export += len(batch) + rest
                return
            spans = self.encoder.encode_all(batch)
            if spans and not self._send(spans, retry=False):
                with self._cond:  # the endpoint is down: the rest would fail the same way
                    rest = len(self._queue)
                    self._queue.clear()
                self.dropped_export += rest
                self.log.dropped(rest)
                return

    def _export(self, batch: list[Item]) -> None:
        spans = self.encoder.encode_all(batch)
        if spans:
            self._send(spans, retry=True)

    def _send(self, spans: list[bytes], retry: bool) -> bool:
        body = self.encoder.request(spans)
        first_attempt = time.monotonic()
        while True:
            result: ExportResult = self.transport.send(body)
            if result.ok:
                self._consecutive_failures = 0
                self.exported += len(spans) - result.rejected
                if result.rejected:
                    self.rejected += result.rejected
                    log.warning("OTLP endpoint %s rejected %d of %d spans: %s", self.transport.endpoint,
                                result.rejected, len(spans), result.error)
                self.log.succeeded()
                return True
            self.failures += 1
            self._consecutive_failures += 1
            self.last_error = result.error
            wait = backoff_s(self._consecutive_failures, result.retry_after_s)
            give_up = (not retry or not result.retryable or self._stopping.is_set()
                       or time.monotonic() + wait - first_attempt > RETRY_WINDOW_S)
            if give_up:
                self.dropped_export += len(spans)
                self.log.failed(result.error, dropped=len(spans))
                if retry and not self._stopping.is_set():
                    self._stopping.wait(wait)  # keep the pace down while the endpoint is failing
                return False
            self.log.failed(result.error)
            if self._stopping.wait(wait):
                retry = False  # shutting down: one last attempt for this batch

