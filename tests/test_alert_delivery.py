"""The alert dispatcher on its own, as the sinks process runs it: its own httpx2 client, webhook receivers on
loopback, crossings as live objects and as plain notes read back from JSON; retries, timeouts, proxies."""
from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest

from exporters.alerts import AlertDispatcher, AlertSettings, Webhook
from ledger.budgets import Account, Crossing, CrossingNote, Tally, parse_rule
from tests.fakes.env_proxy import RecordingProxy

AT = datetime(2026, 12, 1, 10, 30, tzinfo=timezone.utc)
DAY = datetime(2026, 12, 1, tzinfo=timezone.utc)

# what a webhook receives for crossing(), written out by hand
EXPECTED = {
    "type": "meterline.budget_alert", "rule": "team", "per": "user", "key": "alice", "window": "day",
    "window_start": "2026-12-01T00:00:00+00:00", "threshold": 0.5, "utilization": 0.6,
    "spent_usd": "1.0005", "limit_usd": "2", "spent_tokens": 420, "limit_tokens": 1000,
    "requests": 6, "limit_requests": 10, "action": "alert", "at": "2026-12-01T10:30:00+00:00", "call_id": "call-1",
}


def crossing() -> Crossing:
    rule = parse_rule({"name": "team", "window": "day", "per": "user", "limit_usd": "2", "limit_tokens": 1000,
                       "limit_requests": 10, "action": "alert"}, "test")
    account = Account(rule, "alice", DAY, DAY + timedelta(days=1), spent=Tally(Decimal("1.0005"), 420, 6),
                      reserved=Tally(Decimal("0.25"), 0, 1))
    return Crossing(account, Decimal("0.5"), account.utilization(), AT)


class Hook:
    """A webhook receiver on loopback: answers each POST with the next scripted status (then 204),
    after `delay_s`; keeps the bodies and when each arrived."""

    def __init__(self, statuses: tuple[int, ...] = (), delay_s: float = 0.0) -> None:
        self.bodies: list[Any] = []
        self.times: list[float] = []
        script = list(statuses)
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                hook.times.append(time.monotonic())
                hook.bodies.append(orjson.loads(data))
                time.sleep(delay_s)
                self.send_response(script.pop(0) if script else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/T000/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Any]:
    made: list[Hook] = []

    def make(*statuses: int, delay_s: float = 0.0) -> Hook:
        made.append(Hook(statuses, delay_s))
        return made[-1]

    yield make
    for h in made:
        h.close()


async def settle(d: AlertDispatcher, done: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_a_note_round_trips_through_json() -> None:
    c = crossing()
    note = CrossingNote.of(c)
    assert note.spent_usd == Decimal("1.0005") and note.limit_usd == Decimal("2") and note.key == "alice"
    assert note.utilization == Decimal("0.6") and note.window_start == DAY and note.at == AT
    text = orjson.dumps(note.to_json())  # the journal's form: plain JSON
    back = CrossingNote.from_json(text)
    assert back == note and CrossingNote.from_json(orjson.loads(text)) == note
    assert isinstance(back.spent_usd, Decimal) and back.at.tzinfo is not None
    assert orjson.loads(text)["spent_usd"] == "1.0005"  # money as exact text, never a float
    # a rule with no split key and no dollar limit
    rule = parse_rule({"name": "calls", "window": "month", "limit_requests": 3}, "test")
    plain = CrossingNote.of(Crossing(Account(rule, "", DAY, DAY + timedelta(days=30), spent=Tally(requests=3)),
                                     Decimal("1"), Decimal("1"), AT))
    assert plain.per is None and plain.limit_usd is None and plain.limit_tokens is None
    assert CrossingNote.from_json(orjson.dumps(plain.to_json())) == plain


def test_a_bad_note_names_the_key() -> None:
    doc = CrossingNote.of(crossing()).to_json()
    for key, value in (("spent_usd", "lots"), ("at", "yesterday"), ("requests", "6"), ("rule", None)):
        with pytest.raises(ValueError, match=key):
            CrossingNote.from_json({**doc, key: value})
    with pytest.raises(ValueError, match="threshold"):
        CrossingNote.from_json({k: v for k, v in doc.items() if k != "threshold"})
    with pytest.raises(ValueError, match="object"):
        CrossingNote.from_json(b"[1, 2]")


async def test_a_webhook_from_a_note_equals_one_from_a_crossing(hooks: Any) -> None:
    json_hook, slack_hook = hooks(), hooks()
    persisted: list[tuple[Any, str | None]] = []
    d = AlertDispatcher(AlertSettings(webhooks=[Webhook(json_hook.url), Webhook(slack_hook.url, "slack")]),
                        persist=lambda note, call_id: persisted.append((note, call_id)))
    d.start()  # no session given: the dispatcher has a client of its own
    c = crossing()
    note = CrossingNote.from_json(orjson.dumps(CrossingNote.of(c).to_json()))  # as read back from the journal
    d.fire(c, "call-1")
    c.account.spent.add(Tally(Decimal("0.5"), 100, 1))  # later spend: the alert says what it was when fired
    d.fire(note, "call-1")
    await settle(d, lambda: d.stats.delivered == 4)
    client = d.client
    await d.stop()
    assert d.stats.fired == 2 and d.stats.delivered == 4 and d.stats.failed == 0
    assert json_hook.bodies == [EXPECTED, EXPECTED]
    assert len(slack_hook.bodies) == 2 and slack_hook.bodies[0] == slack_hook.bodies[1]
    assert slack_hook.bodies[0]["text"].startswith(":warning: meterline budget *team* (user=alice) reached 50% of $2")
    assert [call_id for _, call_id in persisted] == ["call-1", "call-1"]
    assert persisted[0][0] == persisted[1][0] == note  # the ledger's row is made from the same snapshot
    assert client is not None and client.is_closed  # stop() closed it


async def test_failed_attempts_are_retried_with_backoff(hooks: Any) -> None:
    hook = hooks(500, 503)
    d = AlertDispatcher(AlertSettings(webhooks=[Webhook(hook.url)], attempts=3, backoff_s=0.1))
    d.start()
    d.fire(crossing(), None)
    await settle(d, lambda: d.stats.delivered + d.stats.failed == 1)
    await d.stop()
    assert d.stats.delivered == 1 and d.stats.failed == 0 and len(hook.bodies) == 3
    gaps = [b - a for a, b in zip(hook.times, hook.times[1:])]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, gaps  # 0.1 s, then doubled


async def test_a_slow_webhook_times_out_without_holding_the_loop(hooks: Any) -> None:
    hook = hooks(delay_s=3.0)
    d = AlertDispatcher(AlertSettings(webhooks=[Webhook(hook.url)], attempts=2, backoff_s=0.05, timeout_s=0.3))
    d.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    d.fire(crossing(), None)
    worst = 0.0
    while d.stats.failed == 0 and loop.time() - t0 < 10:
        before = loop.time()
        await asyncio.sleep(0.005)
        worst = max(worst, loop.time() - before)
    took = loop.time() - t0
    await d.stop()
    assert d.stats.failed == 1 and d.stats.delivered == 0 and len(hook.bodies) == 2
    assert took < 2.0, took  # two attempts of 0.3 s and a 0.05 s pause, not the receiver's 3 s
    assert worst < 0.2, worst  # the loop kept turning while the webhook hung


async def test_a_proxy_in_the_environment_is_not_used_for_a_loopback_webhook(hooks: Any,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = RecordingProxy().start()
    try:
        for name, value in proxy.env().items():
            monkeypatch.setenv(name, value)
        hook = hooks()
        remote = "http://hooks.example/T000/secret"  # not loopback: the environment's proxy applies
        d = AlertDispatcher(AlertSettings(webhooks=[Webhook(hook.url), Webhook(remote)], attempts=1))
        d.start()
        d.fire(crossing(), "call-1")
        await settle(d, lambda: d.stats.delivered + d.stats.failed == 2)
        await d.stop()
        assert hook.bodies == [EXPECTED] and d.stats.delivered == 1 and d.stats.failed == 1
        assert proxy.requests == [remote]
    finally:
        proxy.close()
