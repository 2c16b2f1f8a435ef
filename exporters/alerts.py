"""Budget alerts delivered off the request path: the log, webhooks (generic JSON or Slack) with retries, and a persist hook.

Self-contained, so it runs in whichever process has the event loop for it: its own httpx2 client
(exporters/http_client.py), made in start() and closed in stop(). Crossings arrive as live
ledger.budgets.Crossing objects or as CrossingNote (plain data, e.g. read back from the journal);
either way a note is taken when fire() is called, and the log line, the webhooks and persist all
use that one snapshot.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2
import orjson

from ledger.budgets import Crossing, CrossingNote, exact

from . import http_client

log = logging.getLogger("meterline.alerts")

FORMATS = ("json", "slack")
MAX_QUEUE = 10_000


class AlertConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    format: str = "json"


@dataclass(slots=True)
class AlertStats:
    fired: int = 0
    delivered: int = 0
    failed: int = 0  # deliveries given up after every retry
    dropped: int = 0  # alerts not queued because the queue was full


@dataclass(slots=True)
class AlertSettings:
    webhooks: list[Webhook] = field(default_factory=list)
    attempts: int = 5
    backoff_s: float = 1.0  # doubles after each failed attempt
    timeout_s: float = 5.0


def parse_settings(doc: dict[str, Any]) -> AlertSettings:
    """The config's `alerts:` mapping (thresholds are read by the budget rules)."""
    known = {"webhooks", "thresholds", "attempts", "backoff_s", "timeout_s"}
    unknown = set(doc) - known
    if unknown:
        raise AlertConfigError(f"config key 'alerts.{sorted(unknown)[0]}': unknown (known: {', '.join(sorted(known))})")
    settings = AlertSettings()
    hooks = doc.get("webhooks") or []
    if not isinstance(hooks, list):
        raise AlertConfigError("config key 'alerts.webhooks': expected a list of {url, format}")
    for i, hook in enumerate(hooks):
        where = f"alerts.webhooks[{i}]"
        if isinstance(hook, str):
            hook = {"url": hook}
        if not isinstance(hook, dict):
            raise AlertConfigError(f"config key {where!r}: expected a mapping with url")
        url = hook.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise AlertConfigError(f"config key '{where}.url': expected an http(s) URL, got {url!r}")
        fmt = hook.get("format", "json")
        if fmt not in FORMATS:
            raise AlertConfigError(f"config key '{where}.format': expected json or slack, got {fmt!r}")
        settings.webhooks.append(Webhook(url, fmt))
    for key, cast in (("attempts", int), ("backoff_s", float), ("timeout_s", float)):
        if key in doc:
            value = doc[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise AlertConfigError(f"config key 'alerts.{key}': expected a positive number, got {value!r}")
            setattr(settings, key, cast(value))
    return settings


def payload(crossing: CrossingNote | Crossing, call_id: str | None) -> dict[str, Any]:
    """The generic webhook's JSON body."""
    n = crossing if isinstance(crossing, CrossingNote) else CrossingNote.of(crossing)
    return {
        "type": "meterline.budget_alert",
        "rule": n.rule, "per": n.per, "key": n.key if n.per else None,
        "window": n.window, "window_start": n.window_start.isoformat(),
        "threshold": float(n.threshold), "utilization": round(float(n.utilization), 6),
        "spent_usd": exact(n.spent_usd), "limit_usd": None if n.limit_usd is None else exact(n.limit_usd),
        "spent_tokens": n.spent_tokens, "limit_tokens": n.limit_tokens,
        "requests": n.requests, "limit_requests": n.limit_requests,
        "action": n.action, "at": n.at.isoformat(), "call_id": call_id,
    }


def render(body: dict[str, Any], fmt: str) -> bytes:
    if fmt == "slack":
        who = f" ({body['per']}={body['key']})" if body["per"] else ""
        limit = f" of ${body['limit_usd']}" if body["limit_usd"] else ""
        text = (f":warning: meterline budget *{body['rule']}*{who} reached {body['threshold']:.0%}{limit} "
                f"in its {body['window']} window (spent ${body['spent_usd']}; action: {body['action']})")
        return orjson.dumps({"text": text})
    return orjson.dumps(body)


class AlertDispatcher:
    """Takes crossings on the event loop without waiting; a background task logs, persists and delivers."""

    def __init__(self, settings: AlertSettings,
                 persist: Callable[[CrossingNote, str | None], None] | None = None) -> None:
        self.settings = settings
        self.persist = persist  # called on a thread of the default executor
        self.stats = AlertStats()
        self.queue: asyncio.Queue[tuple[CrossingNote, str | None]] = asyncio.Queue(MAX_QUEUE)
        self.task: asyncio.Task[None] | None = None
        self.deliveries: set[asyncio.Task[None]] = set()
        self.client: httpx2.AsyncClient | None = None

    def start(self) -> None:
        """On the event loop that will deliver. The client is made here, before calls are served:
        building its TLS context takes 45-75 ms here, once (and not at all without webhooks)."""
        if self.settings.webhooks:
            self.client = http_client.async_client(self.settings.timeout_s)
        self.task = asyncio.get_running_loop().create_task(self._run(), name="meterline-alerts")

    async def stop(self) -> None:
        for task in [self.task, *self.deliveries]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self.task = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def fire(self, crossing: Crossing | CrossingNote, call_id: str | None) -> None:
        # the numbers as they are now: later spend in the same window must not change what this alert says
        note = crossing if isinstance(crossing, CrossingNote) else CrossingNote.of(crossing)
        self.stats.fired += 1
        log.warning("budget alert: %s reached %s of its limit: %s", note.describe(), f"{note.threshold:.0%}",
                    note.spend_text)
        try:
            self.queue.put_nowait((note, call_id))
        except asyncio.QueueFull:
            self.stats.dropped += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            note, call_id = await self.queue.get()
            if self.persist is not None:
                try:
                    await loop.run_in_executor(None, self.persist, note, call_id)
                except Exception:  # noqa: BLE001 - the alert is still delivered
                    log.exception("could not record the alert in the ledger")
            body = payload(note, call_id)
            # each webhook on its own task: one slow receiver does not hold up the others
            for hook in self.settings.webhooks:
                task = loop.create_task(self._deliver(hook, render(body, hook.format)))
                self.deliveries.add(task)
                task.add_done_callback(self.deliveries.discard)

    async def _deliver(self, hook: Webhook, data: bytes) -> None:
        assert self.client is not None
        delay = self.settings.backoff_s
        for attempt in range(1, self.settings.attempts + 1):
            try:
                # timeout_s bounds the whole attempt (httpx2's own timeout bounds each read or write)
                async with asyncio.timeout(self.settings.timeout_s):
                    # the status is all that counts: the receiver's body is never read, so none is held
                    async with self.client.stream("POST", hook.url, content=data,
                                                  headers={"content-type": "application/json"}) as resp:
                        status = resp.status_code
                if status < 300:
                    self.stats.delivered += 1
                    return
                problem = f"HTTP {status}"
            except (httpx2.HTTPError, httpx2.InvalidURL, TimeoutError, OSError) as e:
                problem = type(e).__name__
            if attempt < self.settings.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        self.stats.failed += 1
        log.warning("alert webhook %s failed after %d attempts (%s)", _safe(hook.url),
                    self.settings.attempts, problem)


def _safe(url: str) -> str:
    """A webhook URL without its path, which often carries a secret token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."
