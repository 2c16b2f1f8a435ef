"""Shared budgets across sidecars (`fleet.redis`) end to end: real `meterline serve` processes, one real redis-server, the real openai SDK, the fake provider."""
from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis

from tests.conftest import upstreams_for
from tests.fakes import FakeProvider
from tests.sidecar_process import Sidecar

MESSAGES = [{"role": "user", "content": "How many sidecars does it take?"}]
RULE = "team"
MICRO = Decimal(1_000_000)


def fleet_config(fake: FakeProvider, redis_url: str, limit: Decimal | None = None, **fleet: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {**upstreams_for(fake), "fleet": {"redis": redis_url, "sync_ms": 25, **fleet}}
    if limit is not None:
        doc["budgets"] = [{"name": RULE, "window": "total", "limit_usd": str(limit), "action": "block"}]
    return doc


def start_fleet(tmp_path: Path, config: dict[str, Any], count: int, **extra: Any) -> list[Sidecar]:
    sidecars = [Sidecar(tmp_path / f"sc{i}", {**config, **extra}) for i in range(count)]
    try:
        for sc in sidecars:
            sc.start()
    except BaseException:
        for sc in sidecars:
            sc.stop()
        raise
    return sidecars


def client(sc: Sidecar) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-fleet", max_retries=0)


async def burst(sc: Sidecar, calls: int, max_tokens: int = 20) -> list[Any]:
    c = client(sc)

    async def one() -> Any:
        try:
            return await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=max_tokens)
        except openai.APIStatusError as e:
            return e
        except openai.APIConnectionError as e:  # a killed sidecar
            return e

    try:
        return await asyncio.gather(*(one() for _ in range(calls)))
    finally:
        await c.close()


def one_call_cost(sc: Sidecar) -> Decimal:
    c = openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-fleet", max_retries=0)
    c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
    row = sc.rows("outcome = 'ok'")[-1]
    return Decimal(row["cost_usd"])


def redis_spent(url: str) -> Decimal:
    r = redis.Redis.from_url(url)
    try:
        total = 0
        for key in r.scan_iter(f"meterline:acct:{RULE}*"):
            if not key.endswith(b":holders"):
                total += int(r.hget(key, "su") or 0)
        return Decimal(total) / MICRO
    finally:
        r.close()


def ledger_rows(sc: Sidecar, count: int) -> list[dict[str, Any]]:
    rows = sc.rows("true", count, timeout=30)
    assert len(rows) >= count, f"{sc.workdir}: {len(rows)} rows, expected {count}"
    return rows


def ok_spend(rows: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(r["cost_usd"]) for r in rows if r["outcome"] == "ok"), Decimal(0))


def check_refusals(results: list[Any]) -> int:
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    for err in refused:
        assert err.status_code == 429, err
        assert err.response.headers["x-should-retry"] == "false"
        assert err.response.headers["x-meterline-budget"] == RULE
        assert err.response.json()["error"]["code"] == "budget_exceeded"
    return len(refused)


def api(sc: Sidecar, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"{sc.url}/_meterline/budgets{path}", method=method,
                                 data=orjson.dumps(body) if body is not None else None,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


@pytest.fixture(scope="module")
def cost(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Decimal:
    """What one call of the bursts costs (the fake's usage is fixed): limits are counted in calls."""
    probe = Sidecar(tmp_path_factory.mktemp("probe"), upstreams_for(fake)).start()
    try:
        return one_call_cost(probe)
    finally:
        probe.stop()


# --- the fleet's spend stays under one limit -------------------------------------------------------

@pytest.mark.timeout(180)
async def test_three_sidecars_share_one_limit_and_refusals_are_not_retried(tmp_path, fake, redis_url, cost):
    limit = cost * 90  # 300 calls, room for 90
    sidecars = start_fleet(tmp_path, fleet_config(fake, redis_url, limit), 3)
    try:
        results = await asyncio.gather(*(burst(sc, 100) for sc in sidecars))
        flat = [r for rs in results for r in rs]
        refused = check_refusals(flat)
        passed = [r for r in flat if not isinstance(r, Exception)]
        assert len(passed) + refused == 300
        spends = [ok_spend(ledger_rows(sc, 100)) for sc in sidecars]
        fleet = sum(spends, Decimal(0))
        assert fleet <= limit, (fleet, limit, spends)
        assert fleet >= limit / 2, (fleet, limit, spends)
        time.sleep(0.3)  # the last settlements
        settled = redis_spent(redis_url)
        assert fleet <= settled <= limit  # Redis counts micro-dollars rounded up, never less than the ledgers
        assert settled - fleet <= Decimal(len(passed)) / MICRO
        health = sidecars[0].health()
        assert health["fleet"]["redis"]["up"] is True and health["fleet"]["redis"]["policy"] == "local"
    finally:
        for sc in sidecars:
            sc.stop()


@pytest.mark.timeout(180)
async def test_two_workers_in_one_sidecar_lease_from_the_same_account(tmp_path, fake, redis_url, cost):
    limit = cost * 60
    (sc,) = start_fleet(tmp_path, fleet_config(fake, redis_url, limit), 1, workers=2)
    try:
        results = await asyncio.gather(*(burst(sc, 100) for _ in range(2)))
        flat = [r for rs in results for r in rs]
        refused = check_refusals(flat)
        assert refused and len(flat) - refused >= 1
        rows = ledger_rows(sc, 200)
        spend = ok_spend(rows)
        assert limit / 2 <= spend <= limit, (spend, limit)
        journals = sc.db.with_name(sc.db.name + ".journal")
        assert {p.name for p in journals.iterdir() if p.is_dir()} == {"w0", "w1"}
        time.sleep(0.3)
        assert spend <= redis_spent(redis_url) <= limit
    finally:
        sc.stop()


@pytest.mark.timeout(120)
async def test_calls_within_a_lease_make_no_round_trip(tmp_path, fake, redis_url, cost):
    """Sequential calls far from the limit: the first leases a slice, the rest are admitted locally."""
    (sc,) = start_fleet(tmp_path, fleet_config(fake, redis_url, cost * 100_000), 1)
    try:
        assert check_refusals(await burst(sc, 1)) == 0  # leases half of the allowance
        for _ in range(9):
            assert check_refusals(await burst(sc, 11)) == 0
        refills = sc.health()["fleet"]["redis"]["refills"]
        assert 1 <= refills <= 2, refills  # 100 calls; a round trip per call would be 100
        assert int(account_state(redis_url)[b"lu"]) > 0
        sc.stop()  # SIGTERM: the sidecar gives its lease back rather than let it expire
        state = account_state(redis_url)
        assert int(state[b"lu"]) == 0 and not any(k.startswith(b"lu:") for k in state), state
        assert Decimal(int(state[b"su"])) / MICRO >= cost * 100
    finally:
        sc.stop()


# --- failures ------------------------------------------------------------------------------------

async def slow_calls(sc: Sidecar, count: int) -> list[Any]:
    """Calls that take seconds each (the fake's `slow` scenario): their estimates stay reserved on
    the sidecar's lease."""
    c = openai.AsyncOpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-fleet", max_retries=0,
                           default_headers={"x-fake-scenario": "slow", "x-fake-chunks": "40",
                                            "x-fake-chunk-delay-ms": "250"})

    async def one() -> Any:
        try:
            return await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
        except (openai.APIError, ConnectionError) as e:
            return e

    try:
        return await asyncio.gather(*(one() for _ in range(count)))
    finally:
        await c.close()


def account_state(url: str) -> dict[bytes, bytes]:
    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter(f"meterline:acct:{RULE}*"):
            if not key.endswith(b":holders"):
                return r.hgetall(key)
        return {}
    finally:
        r.close()


@pytest.mark.timeout(180)
async def test_a_killed_sidecars_leases_expire_and_the_others_spend_that_allowance(tmp_path, fake, redis_url, cost):
    limit = cost * 40
    doomed, survivor = start_fleet(tmp_path, fleet_config(fake, redis_url, limit, lease_ttl_s=1.0), 2)
    try:
        inflight = asyncio.ensure_future(slow_calls(doomed, 20))
        deadline = time.monotonic() + 10
        while int(account_state(redis_url).get(b"lu", 0)) < limit * MICRO / 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        held = int(account_state(redis_url).get(b"lu", 0))
        assert held >= limit * MICRO / 2  # the first lease is half of what is left
        dead_pid = f":{doomed.forwarder_pid()}:".encode()
        assert any(dead_pid in k for k in account_state(redis_url) if k.startswith(b"lu:")), (dead_pid, account_state(redis_url))
        doomed.kill()  # SIGKILL mid-burst: no shutdown code gives its leases back
        await inflight
        # until its leases expire (fleet.lease_ttl_s) the survivor has only what the dead one did not
        # hold (at most half); the dead one never settled anything, so Redis's spend is the survivor's
        deadline = time.monotonic() + 20
        calls = 0
        while time.monotonic() < deadline and redis_spent(redis_url) <= limit * Decimal("0.6"):  # Redis rounds up
            check_refusals(await burst(survivor, 5))
            calls += 5
        rows = ledger_rows(survivor, calls)
        spent = ok_spend(rows)
        assert Decimal(0) < spent <= limit
        assert spent > limit / 2, (spent, limit)  # more than the dead sidecar ever left it: its lease came back
        time.sleep(0.3)
        state = account_state(redis_url)
        assert not any(dead_pid in k for k in state if k.startswith(b"lu:"))  # its lease was reaped
        assert Decimal(int(state[b"su"])) / MICRO <= limit
    finally:
        doomed.stop()
        survivor.stop()


@pytest.mark.timeout(180)
async def test_redis_stopped_and_started_each_policy_holds_and_spend_settles_afterwards(
        tmp_path, fake, redis_url, redis_server, cost):
    limit = cost * 12
    local = Sidecar(tmp_path / "local", fleet_config(fake, redis_url, limit)).start()
    closed = Sidecar(tmp_path / "closed", fleet_config(fake, redis_url, limit, on_redis_down="closed")).start()
    opened = Sidecar(tmp_path / "open", fleet_config(fake, redis_url, limit * 1000, on_redis_down="open")).start()
    sidecars = [local, closed, opened]
    try:
        for sc in sidecars:  # some spend before the outage
            assert check_refusals(await burst(sc, 1)) == 0
        status, _ = api(local, "POST", "", {"name": "watch", "window": "day", "limit_usd": "5", "action": "alert"})
        assert status == 201
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(r["rule"] == "watch" for r in api(closed, "GET", "")[1]["budgets"]):
            await asyncio.sleep(0.05)
        redis_server.stop()
        outage: list[list[Any]] = []
        for sc in sidecars:
            results = []
            for _ in range(20):
                results += await burst(sc, 1)
            outage.append(results)
        for sc, results in zip(sidecars, outage):
            errors = [r for r in results if isinstance(r, Exception)]
            assert all(isinstance(e, openai.RateLimitError) for e in errors), errors  # never a 5xx
            health = sc.health()
            assert health["status"] == "degraded"
            assert health["fleet"]["redis"]["up"] is False and health["fleet"]["redis"]["degraded_s"] > 0
        local_err = [r for r in outage[0] if isinstance(r, Exception)]
        closed_err = [r for r in outage[1] if isinstance(r, Exception)]
        open_err = [r for r in outage[2] if isinstance(r, Exception)]
        # local: this sidecar's own view refuses once its own count reaches the limit
        assert local_err and all("does not answer" not in e.message for e in local_err)
        # closed: what the lease holds is spent, then calls needing more of the fleet are refused
        assert closed_err and all("fleet.redis" in e.response.json()["error"]["message"] for e in closed_err)
        assert not open_err  # open: every call goes
        metrics = urllib.request.urlopen(f"{local.url}/_meterline/metrics", timeout=10).read().decode()
        assert 'meterline_fleet_redis_up{worker="w0"} 0' in metrics

        redis_server.start()  # empty: no persistence, like a restarted cache
        deadline = time.monotonic() + 10
        while not all(sc.health()["fleet"]["redis"]["up"] for sc in sidecars) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert all(sc.health()["status"] == "ok" for sc in sidecars)
        # every sidecar put its whole spend back, what it spent during the outage included
        expected = sum((ok_spend(ledger_rows(sc, 21)) for sc in sidecars), Decimal(0))
        deadline = time.monotonic() + 10
        while redis_spent(redis_url) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        settled = redis_spent(redis_url)
        assert expected <= settled <= expected + Decimal(63) / MICRO  # rounded up per call, at most 1 micro-dollar
        # the API rule outlived Redis's data: the sidecars put it back
        assert any(r["rule"] == "watch" for r in api(closed, "GET", "")[1]["budgets"])
        r = redis.Redis.from_url(redis_url)
        try:
            assert r.hexists("meterline:rules", "watch")
        finally:
            r.close()
        degraded = local.health()["fleet"]["redis"]["degraded_s"]
        assert degraded > 0 and local.health()["fleet"]["redis"]["outages"] == 1
    finally:
        if redis_server.proc is None:
            redis_server.start()
        for sc in sidecars:
            sc.stop()


# --- rules and top-ups through any sidecar ---------------------------------------------------------

@pytest.mark.timeout(120)
async def test_a_rule_added_through_one_sidecar_blocks_calls_on_another(tmp_path, fake, redis_url):
    a, b = start_fleet(tmp_path, fleet_config(fake, redis_url), 2)
    try:
        assert check_refusals(await burst(b, 1)) == 0
        status, doc = api(a, "POST", "", {"name": RULE, "window": "day", "limit_usd": "0", "action": "block"})
        assert status == 201, doc
        deadline = time.monotonic() + 5  # generous for a busy machine: it takes one or two sync rounds
        while time.monotonic() < deadline:
            (result,) = await burst(b, 1)
            if isinstance(result, openai.RateLimitError):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the rule added on sidecar a never blocked a call on sidecar b")
        check_refusals([result])
        # a top-up through b lets calls through on a
        status, doc = api(b, "POST", f"/{RULE}/topup", {"amount_usd": "1"})
        assert status == 200, doc
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            (result,) = await burst(a, 1)
            if not isinstance(result, Exception):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the top-up on sidecar b never reached sidecar a")
        # removed through b: gone on a
        status, _ = api(b, "DELETE", f"/{RULE}")
        assert status == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(r["rule"] == RULE for r in api(a, "GET", "")[1]["budgets"]):
            await asyncio.sleep(0.05)
        assert not any(r["rule"] == RULE for r in api(a, "GET", "")[1]["budgets"])
    finally:
        a.stop()
        b.stop()


def test_config_errors_name_the_fleet_key(monkeypatch):
    from sidecar.config import ConfigError, parse
    rule = [{"name": "cap", "limit_usd": 1}]
    with pytest.raises(ConfigError, match="set fleet.redis"):
        parse({"workers": 2, "budgets": rule})
    assert parse({"workers": 2, "budgets": rule, "fleet": {"redis": "redis://127.0.0.1:6379/0"}}).workers == 2
    with pytest.raises(ConfigError, match="'fleet.on_redis_down'"):
        parse({"fleet": {"on_redis_down": "maybe"}})
    with pytest.raises(ConfigError, match="'fleet.redis'"):
        parse({"fleet": {"redis": "http://cache:6379"}})
    monkeypatch.delenv("METERLINE_TEST_REDIS", raising=False)
    with pytest.raises(ConfigError, match="METERLINE_TEST_REDIS is not set"):
        parse({"fleet": {"redis": "${METERLINE_TEST_REDIS}"}})
    monkeypatch.setenv("METERLINE_TEST_REDIS", "redis://:pw@10.0.0.5:6380/2")
    assert parse({"fleet": {"redis": "${METERLINE_TEST_REDIS}"}}).fleet.redis == "redis://:pw@10.0.0.5:6380/2"
    with pytest.raises(ConfigError, match="'fleet.lease_ttl_s'"):
        parse({"fleet": {"lease_ttl_s": 0.01}})
    with pytest.raises(ConfigError, match="unknown config key 'fleet.nope'"):
        parse({"fleet": {"nope": 1}})


@pytest.mark.timeout(120)
async def test_a_lease_left_idle_goes_back_to_the_fleet(tmp_path, fake, redis_url, cost):
    """Sidecar a leases half the allowance for one call, then goes quiet; b is refused while a holds
    it and passes again once a gives it back (fleet.lease_idle_s): the early-refusal window."""
    limit = cost * 40
    a, b = start_fleet(tmp_path, fleet_config(fake, redis_url, limit, lease_idle_s=2), 2)
    try:
        assert check_refusals(await burst(a, 1)) == 0
        t_idle = time.monotonic()
        refused_at = passed_again = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            (result,) = await burst(b, 1)
            check_refusals([result])
            if isinstance(result, Exception):
                refused_at = refused_at or time.monotonic()
            elif refused_at is not None:
                passed_again = time.monotonic()
                break
        assert refused_at is not None and passed_again is not None, (account_state(redis_url), api(b, "GET", ""))
        print(f"early refusal: b refused for {passed_again - refused_at:.3f} s, "
              f"{passed_again - t_idle:.3f} s after a's last call")
        while not isinstance((await burst(b, 1))[0], Exception):
            pass
        spent = ok_spend(ledger_rows(b, 1)) + ok_spend(ledger_rows(a, 1))
        assert limit / 2 < spent <= limit
    finally:
        a.stop()
        b.stop()


@pytest.mark.timeout(120)
async def test_each_threshold_alerts_once_for_the_whole_fleet(tmp_path, fake, redis_url, cost):
    config = fleet_config(fake, redis_url)
    config["budgets"] = [{"name": RULE, "window": "day", "limit_usd": str(cost * 10), "action": "alert",
                          "thresholds": ["0.3", "0.6"]}]
    sidecars = start_fleet(tmp_path, config, 2)
    try:
        for _ in range(4):  # both sidecars spend past both thresholds, together
            results = await asyncio.gather(*(burst(sc, 3) for sc in sidecars))
            assert not any(isinstance(r, Exception) for rs in results for r in rs)
        deadline = time.monotonic() + 10
        counts: list[int] = []
        while time.monotonic() < deadline:
            counts = [sc.sql("SELECT count(*) AS n FROM alerts")[0]["n"] for sc in sidecars]
            if sum(counts) >= 2:
                break
            await asyncio.sleep(0.1)
        time.sleep(0.5)  # a second alert of the same threshold would have arrived by now
        rows = [row for sc in sidecars for row in sc.sql("SELECT rule, threshold FROM alerts")]
        assert sorted(Decimal(str(r["threshold"])) for r in rows) == [Decimal("0.3"), Decimal("0.6")], rows
    finally:
        for sc in sidecars:
            sc.stop()
