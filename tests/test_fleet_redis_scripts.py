"""The fleet budget Lua scripts against a real redis-server: leases never let settled + leased pass a limit, settlement is idempotent, dead holders' leases go back."""
from __future__ import annotations

import random
import threading
import time

import pytest
import redis

from fleet import redis_scripts

LIMIT = 1_000_000  # micro-dollars: $1
H, Z = "meterline:acct:t\x1ftotal\x1f\x1f0", "meterline:acct:t\x1ftotal\x1f\x1f0:holders"


@pytest.fixture
def r(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def sync(r: redis.Redis, holder: str, cum: int = 0, keep: int = 0, need: int = 0, want: bool = False,
         limit: int = LIMIT, ttl_ms: int = 30_000) -> dict[str, int]:
    args = [holder, ttl_ms, 0, 1 if want else 0, 2]
    args += [cum, keep, need, limit]  # usd
    args += [0, 0, 0, -1, 0, 0, 0, -1]  # tokens and requests unlimited
    res = r.eval(redis_scripts.SYNC, 2, H, Z, *args)
    return {"granted": res[0], "spent": res[3], "leased": res[6], "mine": res[9], "refused": res[12]}


def account(r: redis.Redis) -> tuple[int, int]:
    h = r.hgetall(H)
    return int(h.get(b"su", 0)), int(h.get(b"lu", 0))


def test_slices_shrink_as_the_limit_nears_and_a_call_too_big_is_refused(r):
    a = sync(r, "a", need=10, want=True)
    assert a["granted"] == LIMIT // 2  # one holder: half of what is left
    b = sync(r, "b", need=10, want=True)
    assert b["granted"] == (LIMIT - LIMIT // 2) // 4  # two holders now: a quarter of the rest
    left = LIMIT - a["granted"] - b["granted"]
    big = sync(r, "c", need=left + 1, want=True)
    assert big["refused"] == 1 and big["granted"] == 0
    exact = sync(r, "c", need=left, want=True)
    assert exact["granted"] == left and exact["refused"] == 0
    assert account(r) == (0, LIMIT)
    assert sync(r, "d", need=1, want=True)["refused"] == 1  # everything is leased out


def test_settlement_counts_cumulative_spend_once_and_returns_what_is_not_kept(r):
    g = sync(r, "a", need=100, want=True)["granted"]
    first = sync(r, "a", cum=300, keep=g - 300)
    again = sync(r, "a", cum=300, keep=g - 300)  # a retry after a timeout: nothing counts twice
    assert first["spent"] == again["spent"] == 300
    assert again["mine"] == g - 300
    back = sync(r, "a", cum=300, keep=0)  # gives the rest back
    assert back["mine"] == 0 and account(r) == (300, 0)
    assert r.zscore(Z, "a") is None  # no lease, no live holder entry


def test_a_dead_holders_lease_expires_and_its_spend_stays(r):
    g = sync(r, "dead", cum=50, keep=0, need=100, want=True, ttl_ms=100)["granted"]
    assert account(r) == (50, g)
    time.sleep(0.2)
    other = sync(r, "alive", need=10, want=True)
    assert other["spent"] == 50
    assert other["leased"] == other["granted"]  # the dead holder's lease was reaped first
    assert other["granted"] == (LIMIT - 50) // 2


def test_an_account_lost_with_redis_is_rebuilt_from_the_holders_cumulative_spend(r):
    sync(r, "a", cum=0, keep=0, need=10, want=True)
    sync(r, "a", cum=700, keep=0)
    r.flushall()  # Redis restarted without persistence
    back = sync(r, "a", cum=900, keep=5000)  # the lease it thinks it keeps is gone: mine says so
    assert back["spent"] == 900 and back["mine"] == 0


def test_large_amounts_stay_exact(r):
    big = 9_000_000_000_000_000  # $9 billion in micro-dollars: past Lua's %.14g text
    got = sync(r, "a", need=big, want=True, limit=big)
    assert got["granted"] == big
    assert sync(r, "a", cum=big - 1, keep=1)["spent"] == big - 1


def test_concurrent_holders_never_lease_past_the_limit(r, redis_url):
    """Four holders lease, spend within their leases, and give back, at random, all at once: at
    every step settled + leased <= limit, and at the end the settled spend is the sum of theirs."""
    errors: list[str] = []
    totals: dict[str, int] = {}

    def holder(name: str, seed: int) -> None:
        rng = random.Random(seed)
        c = redis.Redis.from_url(redis_url)
        lease = cum = 0
        try:
            for _ in range(150):
                op = rng.random()
                if op < 0.4:
                    need = rng.randint(1, 40_000)
                    got = sync(c, name, cum=cum, keep=lease, need=need, want=True)
                    lease += got["granted"]
                    if got["mine"] != lease:
                        errors.append(f"{name}: Redis holds {got['mine']}, holder believes {lease}")
                elif op < 0.85 and lease > 0:
                    spend = rng.randint(0, lease)
                    lease -= spend
                    cum += spend
                    sync(c, name, cum=cum, keep=lease)
                else:
                    lease = 0
                    sync(c, name, cum=cum, keep=0)
                spent, leased = account(c)
                if spent + leased > LIMIT:
                    errors.append(f"settled {spent} + leased {leased} > {LIMIT}")
            totals[name] = cum
        finally:
            c.close()

    threads = [threading.Thread(target=holder, args=(f"h{i}", i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    spent, _ = account(r)
    assert spent == sum(totals.values()) <= LIMIT
