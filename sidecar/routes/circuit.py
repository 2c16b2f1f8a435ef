"""A circuit breaker per route target: opens after N failures in a window, lets one probe through after a cooldown."""
from __future__ import annotations

import collections
import time

from .config import Circuit

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    """One target's circuit, on the event loop (no locks). State is this forwarder's own."""

    __slots__ = ("spec", "state", "failures", "opened_at", "probing", "opened", "calls", "errors")

    def __init__(self, spec: Circuit) -> None:
        self.spec = spec
        self.state = CLOSED
        self.failures: collections.deque[float] = collections.deque()
        self.opened_at = 0.0
        self.probing = False  # a half-open probe is in flight: no other call goes through
        self.opened = 0  # times it opened, for metrics
        # recent outcomes, for `meterline routes` (error rate of the last 100 attempts)
        self.calls: collections.deque[bool] = collections.deque(maxlen=100)
        self.errors = 0

    def allow(self, now: float | None = None) -> bool:
        """Whether an attempt may go to this target now (a half-open circuit admits one probe)."""
        if self.state == CLOSED:
            return True
        now = time.monotonic() if now is None else now
        if self.state == OPEN and now - self.opened_at >= self.spec.cooldown_s:
            self.state = HALF_OPEN
            self.probing = False
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def record(self, ok: bool, now: float | None = None) -> None:
        """The outcome of an attempt that was allowed."""
        now = time.monotonic() if now is None else now
        if len(self.calls) == self.calls.maxlen and not self.calls[0]:
            self.errors -= 1
        self.calls.append(ok)
        if not ok:
            self.errors += 1
        if ok:
            if self.state != CLOSED:
                self.state = CLOSED
                self.failures.clear()
            self.probing = False
            return
        if self.state == HALF_OPEN:
            self._open(now)  # the probe failed: another cooldown
            return
        window = self.spec.window_s
        failures = self.failures
        failures.append(now)
        while failures and now - failures[0] > window:
            failures.popleft()
        if len(failures) >= self.spec.failures:
            self._open(now)

    def release(self) -> None:
        """An allowed attempt that never reached the target (refused by a budget): the probe is free again."""
        self.probing = False

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.opened_at = now
        self.probing = False
        self.failures.clear()
        self.opened += 1

    def status(self) -> dict[str, object]:
        return {"state": self.state, "opened": self.opened, "recent_attempts": len(self.calls),
                "recent_error_rate": round(self.errors / len(self.calls), 4) if self.calls else None}
