"""Budget guardrails end to end: real SDKs, the real sidecar process, a fake provider and a local webhook receiver."""
from __future__ import annotations

import asyncio
import http.server
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.fakes import FakeProvider
from tests.sidecar_process import Sidecar, free_port

MESSAGES = [{"role": "user", "content": "How many budgets does it take?"}]


@pytest.fixture(scope="module")
def fake():
    provider = FakeProvider(chunk_delay_ms=1).start_in_thread()
    yield provider
    provider.stop_thread()


class Receiver:
    """A webhook receiver on loopback that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("content-length", 0))
                received.append(orjson.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/T000/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.bodies)

    def close(self) -> None:
        self.server.shutdown()


def start(tmp_path: Path, fake: FakeProvider, **extra: Any) -> Sidecar:
    config = {"upstreams": {name: {"base_url": fake.base_url} for name in ("openai", "anthropic", "gemini")},
              **extra}
    return Sidecar(tmp_path / "sidecar", config).start()


def oai(sc: Sidecar, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test", **kw)


def chat(client: openai.OpenAI, headers: dict[str, str] | None = None, max_tokens: int = 100) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=max_tokens,
                                          extra_headers=headers or {})


def budgets(sc: Sidecar) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{sc.url}/_meterline/budgets", timeout=10) as r:
        return orjson.loads(r.read())["budgets"]


def api(sc: Sidecar, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"{sc.url}/_meterline/budgets{path}", method=method,
                                 data=orjson.dumps(body) if body is not None else None,
                                 headers={"content-type": "application/json",
                                          **({"authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


def settled(sc: Sidecar, expected_rows: int) -> list[dict[str, Any]]:
    rows = sc.rows("true", expected_rows)
    assert len(rows) == expected_rows, f"ledger has {len(rows)} rows, expected {expected_rows}"
    return rows


# --- enforcement under concurrency ----------------------------------------------------------------

@pytest.mark.timeout(240)  # it waits for a fresh minute twice
async def test_200_concurrent_calls_never_overspend_and_refusals_are_not_retried(tmp_path, fake):
    limit = Decimal("0.0005")
    sc = start(tmp_path, fake, budgets=[{"name": "burst", "window": "minute", "limit_usd": str(limit),
                                         "action": "block"}])
    try:
        # start early in a minute, so the whole burst falls in one window
        while datetime.now(timezone.utc).second > 40:
            await asyncio.sleep(0.5)
        client = openai.AsyncOpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test")  # default retries on
        aclient = anthropic.AsyncAnthropic(base_url=f"{sc.url}/anthropic", api_key="sk-ant-test")

        async def one(i: int) -> Any:
            try:
                if i % 2:
                    return await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                max_tokens=100)
                return await aclient.messages.create(model="claude-haiku-4-5", messages=MESSAGES,
                                                     max_tokens=100)
            except (openai.RateLimitError, anthropic.RateLimitError) as e:
                return e

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(200)))
        elapsed = time.monotonic() - t0
        refused = [r for r in results if isinstance(r, Exception)]
        passed = [r for r in results if not isinstance(r, Exception)]
        assert passed and refused, (len(passed), len(refused))
        # the SDKs did not retry: one ledger row per client call, refused ones 'blocked'
        rows = settled(sc, 200)
        assert len(rows) == 200
        blocked = [r for r in rows if r["outcome"] == "blocked"]
        assert len(blocked) == len(refused)
        assert all(r["status_code"] == 429 and r["cost_usd"] is None for r in blocked)
        ok_spend = sum(Decimal(r["cost_usd"]) for r in rows if r["outcome"] == "ok")
        assert Decimal(0) < ok_spend <= limit
        assert elapsed < 50  # no 429 was slept on by an SDK retry loop

        for err in refused:
            assert err.response.headers["x-should-retry"] == "false"
            assert err.response.headers["x-meterline-budget"] == "burst"
            assert 1 <= int(err.response.headers["retry-after"]) <= 60
            body = err.response.json()
            if isinstance(err, openai.RateLimitError):
                assert body["error"]["code"] == "budget_exceeded" and "burst" in body["error"]["message"]
            else:
                assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"

        # a new window: calls pass again
        now = datetime.now(timezone.utc)
        await asyncio.sleep(60 - now.second - now.microsecond / 1e6 + 0.5)
        again = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
        assert again.usage.total_tokens > 0
        await client.close()
        await aclient.close()
    finally:
        sc.stop()


def test_gemini_refusal_has_googles_error_shape(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "none-left", "window": "day", "limit_requests": 0}])
    try:
        req = urllib.request.Request(f"{sc.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                                     data=b'{"contents":[{"parts":[{"text":"hi"}]}]}', method="POST",
                                     headers={"content-type": "application/json", "x-goog-api-key": "g-key"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        err = info.value
        assert err.code == 429
        body = orjson.loads(err.read())
        assert body["error"]["status"] == "RESOURCE_EXHAUSTED" and body["error"]["code"] == 429
        assert err.headers["x-should-retry"] == "false" and err.headers["x-meterline-budget"] == "none-left"
        assert not [e for e in fake.exchanges if "g-key" in (e.api_key or "")], "a refused call reached the provider"
    finally:
        sc.stop()


# --- split rules, token and request limits -----------------------------------------------------------

def test_per_user_split_rule_gives_each_user_an_allowance(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "per-user", "per": "user", "window": "day", "limit_requests": 2}])
    try:
        client = oai(sc, max_retries=0)
        for _ in range(2):
            chat(client, {"x-meterline-user": "alice"})
        with pytest.raises(openai.RateLimitError):
            chat(client, {"x-meterline-user": "alice"})
        chat(client, {"x-meterline-user": "bob"})  # bob has his own allowance
        status = {r["key"]: r for r in budgets(sc) if r["rule"] == "per-user"}
        assert status["alice"]["requests"] == 2 and status["bob"]["requests"] == 1
        assert status["alice"]["utilization"] == 1.0
    finally:
        sc.stop()


def test_token_limit_reserves_max_tokens_and_counts_real_tokens(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "tokens", "window": "hour", "limit_tokens": 300,
                                         "match": {"provider": "openai"}}])
    try:
        client = oai(sc, max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            chat(client, max_tokens=1000)  # its worst case alone passes the limit
        assert "tokens limit" in info.value.message
        first = chat(client, max_tokens=50)
        used = first.usage.prompt_tokens + first.usage.completion_tokens
        (row,) = [r for r in budgets(sc) if r["rule"] == "tokens"]
        assert row["spent_tokens"] == used  # settled to the real count, not the reservation
        while True:  # calls pass until the next one's worst case no longer fits
            try:
                r = chat(client, max_tokens=50)
                used += r.usage.prompt_tokens + r.usage.completion_tokens
            except openai.RateLimitError:
                break
        assert used <= 300
        # anthropic calls are not matched by the rule
        anthropic.Anthropic(base_url=f"{sc.url}/anthropic", api_key="k", max_retries=0).messages.create(
            model="claude-haiku-4-5", messages=MESSAGES, max_tokens=1000)
    finally:
        sc.stop()


def test_alert_action_never_refuses(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "watch", "window": "day", "limit_requests": 1, "action": "alert"}])
    try:
        client = oai(sc, max_retries=0)
        for _ in range(3):
            chat(client)
        (row,) = budgets(sc)
        assert row["requests"] == 3 and row["utilization"] == 3.0
    finally:
        sc.stop()


# --- total budgets and top-ups; restarts ---------------------------------------------------------------

def test_total_budget_is_used_up_then_topped_up(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "prepaid", "window": "total", "limit_usd": "0.0001"}])
    try:
        client = oai(sc, max_retries=0)
        calls = 0
        with pytest.raises(openai.RateLimitError) as info:
            while calls < 50:
                chat(client, max_tokens=20)
                calls += 1
        assert calls >= 1
        assert "retry-after" not in info.value.response.headers  # a total allowance never resets
        status, body = api(sc, "POST", "/prepaid/topup", {"amount_usd": "0.001"})
        assert status == 200, body
        assert Decimal(body["budgets"][0]["limit_usd"]) == Decimal("0.0011")
        chat(client, max_tokens=20)  # passes again
    finally:
        sc.stop()
    # the top-up is in the ledger: it survives a restart
    sc.start()
    try:
        (row,) = budgets(sc)
        assert Decimal(row["limit_usd"]) == Decimal("0.0011")
        assert Decimal(row["spent_usd"]) > Decimal("0.0001")
    finally:
        sc.stop()


def test_restart_rebuilds_window_spend_from_the_ledger(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "daily", "window": "day", "limit_usd": "5", "limit_requests": 3}])
    try:
        client = oai(sc, max_retries=0)
        for _ in range(2):
            chat(client)
        (before,) = budgets(sc)
        settled(sc, 2)
    finally:
        sc.stop()
    sc.start()
    try:
        (after,) = budgets(sc)
        assert after["spent_usd"] == before["spent_usd"] and after["requests"] == 2
        chat(oai(sc, max_retries=0))
        with pytest.raises(openai.RateLimitError):  # the third was the last: restart did not forget
            chat(oai(sc, max_retries=0))
    finally:
        sc.stop()


def test_runtime_api_adds_changes_and_removes_rules(tmp_path, fake):
    sc = start(tmp_path, fake)
    try:
        client = oai(sc, max_retries=0)
        chat(client)
        status, body = api(sc, "POST", "", {"name": "api-rule", "window": "day", "limit_requests": 1})
        assert status == 201, body
        assert body["budgets"][0]["requests"] == 1  # spend so far today was rebuilt from the ledger
        with pytest.raises(openai.RateLimitError):
            chat(client)
        assert api(sc, "POST", "", {"name": "api-rule", "window": "day", "limit_requests": 5})[0] == 409
        status, body = api(sc, "PUT", "/api-rule", {"window": "day", "limit_requests": 5})
        assert status == 200 and body["budgets"][0]["limit_requests"] == 5
        chat(client)
        status, body = api(sc, "POST", "", {"name": "bad", "window": "fortnight", "limit_usd": 1})
        assert status == 400 and "window" in body["error"]
        assert api(sc, "DELETE", "/api-rule")[0] == 200
        assert budgets(sc) == []
    finally:
        sc.stop()


def test_budget_api_needs_the_admin_token_when_one_is_set(tmp_path, fake):
    sc = start(tmp_path, fake, admin_token="s3cret")
    try:
        rule = {"name": "r", "window": "day", "limit_requests": 1}
        assert api(sc, "POST", "", rule)[0] == 401
        assert api(sc, "POST", "", rule, token="wrong")[0] == 401
        assert api(sc, "POST", "", rule, token="s3cret")[0] == 201
    finally:
        sc.stop()


# --- alerts -------------------------------------------------------------------------------------

def test_each_threshold_alert_is_delivered_once(tmp_path, fake):
    hook, slack = Receiver(), Receiver()
    sc = start(tmp_path, fake,
               budgets=[{"name": "team-search", "match": {"tags": {"team": "search"}}, "window": "day",
                         "limit_requests": 4}],
               alerts={"webhooks": [{"url": hook.url}, {"url": slack.url, "format": "slack"}],
                       "thresholds": [0.5, 0.8, 1.0]})
    try:
        client = oai(sc, max_retries=0)
        tagged = {"x-meterline-tags": "team=search"}
        for _ in range(4):
            chat(client, tagged)
        with pytest.raises(openai.RateLimitError):
            chat(client, tagged)
        chat(client, {"x-meterline-tags": "team=ads"})  # another team: no alert
        got = hook.wait(3)
        time.sleep(0.5)  # a duplicate would arrive now
        assert sorted(b["threshold"] for b in hook.bodies) == [0.5, 0.8, 1.0]
        assert all(b["rule"] == "team-search" and b["type"] == "meterline.budget_alert" for b in got)
        assert len(slack.wait(3)) == 3 and all("team-search" in b["text"] for b in slack.bodies)
        rows = sc.sql("SELECT threshold, call_id FROM alerts ORDER BY threshold")
        assert [Decimal(r["threshold"]) for r in rows] == [Decimal("0.5"), Decimal("0.8"), Decimal("1.0")]
    finally:
        sc.stop()
        hook.close()
        slack.close()


def test_dead_webhook_does_not_affect_calls(tmp_path, fake):
    dead = f"http://127.0.0.1:{free_port()}/hook"
    sc = start(tmp_path, fake, budgets=[{"name": "r", "window": "day", "limit_requests": 100, "action": "alert",
                                         "thresholds": [0.01, 0.02, 0.03]}],
               alerts={"webhooks": [dead], "attempts": 2, "backoff_s": 0.05})
    try:
        client = oai(sc, max_retries=0)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            chat(client)
            times.append(time.perf_counter() - t)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{sc.url}/_meterline/budgets", timeout=5) as r:
                stats = orjson.loads(r.read())["alerts"]
            if stats["failed"] == 3:
                break
            time.sleep(0.1)
        assert stats["fired"] == 3 and stats["failed"] == 3 and stats["delivered"] == 0
        assert max(times) < 2.0  # no call waited on a webhook (each call itself takes milliseconds)
        assert sc.proc.poll() is None
    finally:
        sc.stop()


def test_meterline_budgets_cli_from_the_sidecar_and_from_the_file(tmp_path, fake):
    import subprocess
    import sys

    sc = start(tmp_path, fake, budgets=[{"name": "cli-rule", "window": "day", "limit_usd": "5",
                                         "limit_requests": 10}])
    cfg = str(sc.workdir / "meterline.yaml")
    cmd = [sys.executable, "-m", "sidecar.cli", "budgets", "--config", cfg]
    try:
        chat(oai(sc, max_retries=0))
        settled(sc, 1)
        live = subprocess.run(cmd + ["--url", sc.url], capture_output=True, text=True, timeout=60)
        assert live.returncode == 0, live.stderr
        assert "cli-rule" in live.stdout and "1 req" in live.stdout and "10 req" in live.stdout
    finally:
        sc.stop()
    offline = subprocess.run(cmd + ["--url", f"http://127.0.0.1:{free_port()}", "--db", str(sc.db), "--format", "json"],
                             capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0, offline.stderr
    (row,) = orjson.loads(offline.stdout)
    assert row["rule"] == "cli-rule" and row["requests"] == 1 and Decimal(row["spent_usd"]) > 0
