"""Budgets on a new user's first day: calls without max_tokens, refusals that explain themselves, exact amounts.

Real openai SDK, the real sidecar process, the fake provider (4 output tokens a chunk, so
`x-fake-chunks` sets how long an answer is).
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.fakes import FakeProvider
from tests.sidecar_process import Sidecar, free_port
from tests.test_budgets import MESSAGES, Receiver

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def fake():
    provider = FakeProvider(chunk_delay_ms=0).start_in_thread()
    yield provider
    provider.stop_thread()


def start(tmp_path: Path, fake: FakeProvider, **extra: Any) -> Sidecar:
    return Sidecar(tmp_path / "sidecar", {"upstreams": {"openai": {"base_url": fake.base_url}}, **extra}).start()


def client(sc: Sidecar) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test", max_retries=0)


def call(c: openai.OpenAI, chunks: int = 5, app: str | None = None, **kw: Any) -> Any:
    headers = {"x-fake-chunks": str(chunks)}
    if app:
        headers["x-meterline-app"] = app
    return c.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=headers, **kw)


def status(sc: Sidecar) -> dict[str, Any]:
    with urllib.request.urlopen(f"{sc.url}/_meterline/budgets", timeout=10) as r:
        return orjson.loads(r.read())


def rule_rows(sc: Sidecar, name: str) -> list[dict[str, Any]]:
    return [r for r in status(sc)["budgets"] if r["rule"] == name]


def api(sc: Sidecar, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"{sc.url}/_meterline/budgets{path}", method=method,
                                 data=orjson.dumps(body) if body is not None else None,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


def ledger_spend(sc: Sidecar, count: int) -> Decimal:
    rows = sc.rows("outcome = 'ok'", count)
    assert len(rows) == count
    return sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))


def cli_budgets(sc: Sidecar, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sidecar.cli", "budgets", "--config", str(sc.workdir / "meterline.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


# --- calls without max_tokens ---------------------------------------------------------------------

def test_call_without_max_tokens_is_admitted_by_a_small_rule_and_fires_no_alert(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "small", "window": "day", "limit_usd": "0.01"}])
    try:
        reply = call(client(sc))  # no max_tokens: not the whole context window's worth
        assert reply.usage.completion_tokens > 0
        (row,) = rule_rows(sc, "small")
        assert row["requests"] == 1 and row["refused"] == 0 and row["alerts_fired"] == []
        assert status(sc)["alerts"]["fired"] == 0
    finally:
        sc.stop()


def test_repeated_calls_are_refused_only_when_spend_plus_the_likely_cost_passes_the_limit(tmp_path, fake):
    limit = Decimal("0.01")
    hook = Receiver()
    sc = start(tmp_path, fake, budgets=[{"name": "daily", "window": "day", "limit_usd": str(limit)}],
               alerts={"webhooks": [{"url": hook.url}]})
    try:
        c = client(sc)
        passed, costs = 0, []
        with pytest.raises(openai.RateLimitError) as info:
            while passed < 40:
                call(c, chunks=500)  # 2,000 output tokens, about $0.0012 a call
                passed += 1
                costs.append(ledger_spend(sc, passed) - sum(costs, Decimal(0)))
        spent = ledger_spend(sc, passed)
        assert passed >= 5, "refused long before the limit"
        assert spent <= limit  # the estimate was right: no overshoot
        # refused only because the next call (costing what the last ones did) would not have fitted
        assert spent + max(costs) * Decimal("1.1") > limit, (spent, costs)
        (row,) = rule_rows(sc, "daily")
        assert Decimal(row["spent_usd"]) == spent and row["refused"] == 1
        assert "1.0" not in row["alerts_fired"] and row["utilization"] < 1  # spend never reached 100%
        err = info.value
        assert err.response.headers["x-should-retry"] == "false"
        assert err.response.headers["x-meterline-budget"] == "daily"
        assert 1 <= int(err.response.headers["retry-after"]) <= 86400
        body = err.response.json()
        assert body["error"]["code"] == "budget_exceeded"
        message = body["error"]["message"]
        assert f"spent ${spent.normalize():f} of $0.01 limit" in message, message
        assert "no max_tokens" in message and MODEL in message and "set max_tokens" in message, message
        assert "for the window to reset" in message, message
        hook.wait(2)
        time.sleep(0.5)
        assert sorted(b["threshold"] for b in hook.bodies) == [0.5, 0.8]  # spend crossed those, not 1.0
        assert "None" not in sc.log()
    finally:
        sc.stop()
        hook.close()


def test_refusal_at_zero_spend_fires_no_alert_and_says_what_the_call_needs(tmp_path, fake):
    hook = Receiver()
    sc = start(tmp_path, fake, budgets=[{"name": "tiny", "window": "day", "limit_usd": "0.001"}],
               alerts={"webhooks": [{"url": hook.url}]})
    try:
        with pytest.raises(openai.RateLimitError) as info:
            call(client(sc), max_tokens=4096)  # its hard bound alone costs more than the limit
        err = info.value
        assert err.response.headers["x-should-retry"] == "false"
        assert err.response.headers["x-meterline-budget"] == "tiny"
        assert err.response.headers["retry-after"].isdigit()
        message = err.response.json()["error"]["message"]
        assert "spent $0 of $0.001 limit" in message, message
        # the reservation: 4096 output tokens at gpt-4o-mini's $0.60/Mtok and a few input tokens
        assert "this call needs up to $0.0024" in message and "max_tokens 4096" in message, message
        assert "set max_tokens lower" in message and "top up" in message, message
        (row,) = rule_rows(sc, "tiny")
        assert row["refused"] == 1 and row["alerts_fired"] == [] and row["utilization"] == 0
        assert status(sc)["alerts"]["fired"] == 0 and status(sc)["refused"] == 1
        time.sleep(0.5)  # an alert would be delivered by now
        assert hook.bodies == []
        assert sc.sql("SELECT count(*) AS n FROM alerts")[0]["n"] == 0
        assert "None" not in sc.log()
    finally:
        sc.stop()
        hook.close()


# --- what budgets status shows ------------------------------------------------------------------

def test_split_rule_shows_before_its_first_call(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "per-user", "per": "user", "window": "day", "limit_usd": "0.5"}])
    try:
        (row,) = rule_rows(sc, "per-user")
        assert row["key"] is None and row["per"] == "user"
        assert Decimal(row["spent_usd"]) == 0 and row["requests"] == 0 and row["limit_usd"] == "0.5"
        out = cli_budgets(sc, "--url", sc.url)
        assert out.returncode == 0, out.stderr
        assert "per-user" in out.stdout and "$0.5" in out.stdout
        c = openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="k", max_retries=0,
                          default_headers={"x-meterline-user": "alice"})
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)
        keys = sorted(r["key"] for r in rule_rows(sc, "per-user"))
        assert "alice" in keys and None not in keys  # once split keys exist, the placeholder goes
    finally:
        sc.stop()


def test_amounts_are_printed_exactly(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "half-a-tenth", "window": "day", "limit_usd": "0.0005"},
                                        {"name": "speck", "window": "day", "limit_usd": "0.0000001",
                                         "action": "alert"}])
    try:
        rows = {r["rule"]: r for r in status(sc)["budgets"]}
        assert rows["half-a-tenth"]["limit_usd"] == "0.0005"
        assert rows["speck"]["limit_usd"] == "0.0000001"  # not 1E-7
        call(client(sc), max_tokens=100)
        spent = ledger_spend(sc, 1)
        out = cli_budgets(sc, "--url", sc.url)
        assert out.returncode == 0, out.stderr
        table = out.stdout
        assert "$0.0005" in table and "$0.00 " not in table and "$0.0000001" in table, table
        assert f"${spent.normalize():f}" in table, (spent, table)
        assert "E-" not in table
        rows = {r["rule"]: r for r in status(sc)["budgets"]}
        assert Decimal(rows["speck"]["spent_usd"]) == spent and "E" not in rows["speck"]["spent_usd"]
    finally:
        sc.stop()


# --- a replaced rule ------------------------------------------------------------------------------

def test_replaced_rule_starts_clean(tmp_path, fake):
    hook = Receiver()
    sc = start(tmp_path, fake, alerts={"webhooks": [{"url": hook.url}]})
    try:
        c = client(sc)
        rule = {"name": "team", "match": {"app": "a"}, "window": "day", "limit_usd": "1", "limit_requests": 2,
                "thresholds": [0.5]}
        assert api(sc, "POST", "", rule)[0] == 201
        call(c, app="a", max_tokens=50)
        assert len(hook.wait(1)) == 1  # 1 of 2 requests: 50%
        deadline = time.monotonic() + 10  # the alert is in the ledger
        while sc.sql("SELECT count(*) AS n FROM alerts")[0]["n"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api(sc, "POST", "/team/topup", {"amount_usd": "5"})[0] == 200
        assert rule_rows(sc, "team")[0]["limit_usd"] == "6"

        replaced = {**rule, "match": {"app": "b"}}
        status_code, body = api(sc, "PUT", "/team", replaced)
        assert status_code == 200, body
        (row,) = body["budgets"]
        # nothing of the old definition: app a's call does not match, its alert and top-up are gone
        assert row["requests"] == 0 and Decimal(row["spent_usd"]) == 0, row
        assert row["alerts_fired"] == [] and row["limit_usd"] == "1", row

        call(c, app="b", max_tokens=50)  # the new definition reaches 50% on its own
        assert len(hook.wait(2)) == 2
        (row,) = rule_rows(sc, "team")
        assert row["requests"] == 1 and row["alerts_fired"] == ["0.5"]
        sc.rows("true", 2)
    finally:
        sc.stop()
    sc.start()  # and a restart rebuilds the new definition only
    try:
        (row,) = rule_rows(sc, "team")
        assert row["requests"] == 1 and row["limit_usd"] == "1" and row["alerts_fired"] == ["0.5"], row
    finally:
        sc.stop()
        hook.close()


def test_cli_shows_exact_amounts_from_the_ledger_file(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "cap", "window": "day", "limit_usd": "0.0005"}])
    try:
        call(client(sc), max_tokens=100)
        spent = ledger_spend(sc, 1)
    finally:
        sc.stop()
    out = cli_budgets(sc, "--url", f"http://127.0.0.1:{free_port()}", "--db", str(sc.db))
    assert out.returncode == 0, out.stderr
    assert "$0.0005" in out.stdout and f"${spent.normalize():f}" in out.stdout, out.stdout


def test_a_restart_keeps_the_estimate_for_calls_without_max_tokens(tmp_path, fake):
    # one answer of 8,000 output tokens costs about $0.0048: a second does not fit in $0.0075
    sc = start(tmp_path, fake, budgets=[{"name": "cap", "window": "day", "limit_usd": "0.0075"}])
    try:
        call(client(sc), chunks=2000, app="writer")
        with pytest.raises(openai.RateLimitError) as info:
            call(client(sc), chunks=2000, app="writer")
        assert "8,000 output tokens" in info.value.message, info.value.message
        sc.rows("outcome = 'ok'", 1)
    finally:
        sc.stop()
    sc.start()  # the estimate comes back from the ledger, not the 1,024-token first-call default
    try:
        with pytest.raises(openai.RateLimitError) as info:
            call(client(sc), chunks=2000, app="writer")
        assert "8,000 output tokens" in info.value.message and "last 16 calls" in info.value.message
        assert ledger_spend(sc, 1) <= Decimal("0.0075")
    finally:
        sc.stop()


def test_a_zero_allowance_is_used_up_so_its_refusal_alerts(tmp_path, fake):
    sc = start(tmp_path, fake, budgets=[{"name": "none", "window": "day", "limit_usd": "0", "thresholds": [1.0]}])
    try:
        with pytest.raises(openai.RateLimitError):
            call(client(sc), max_tokens=10)
        (row,) = rule_rows(sc, "none")
        assert row["utilization"] == 1 and row["alerts_fired"] == ["1"] and row["refused"] == 1
        assert status(sc)["alerts"]["fired"] == 1
    finally:
        sc.stop()


def test_a_call_in_flight_when_its_rule_is_replaced_counts_under_the_new_definition(tmp_path, fake):
    import threading

    sc = start(tmp_path, fake, budgets=[])
    try:
        assert api(sc, "POST", "", {"name": "r", "window": "day", "limit_requests": 10})[0] == 201
        done: list[Any] = []
        slow = threading.Thread(target=lambda: done.append(client(sc).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=50,
            extra_headers={"x-fake-scenario": "slow", "x-fake-chunks": "20", "x-fake-chunk-delay-ms": "100"})))
        slow.start()  # about 2 s upstream
        time.sleep(0.5)
        assert api(sc, "PUT", "/r", {"name": "r", "window": "day", "limit_requests": 20})[0] == 200
        slow.join(30)
        assert done, "the slow call failed"
        sc.rows("true", 1)
        (row,) = rule_rows(sc, "r")
        assert row["requests"] == 1, row  # neither lost with the old definition nor counted twice
    finally:
        sc.stop()
