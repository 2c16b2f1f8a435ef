"""Leases of fleet budget accounts: admit locally against allowance leased from Redis, settle in batches off the request path.

Each forwarder is one holder. For every block account a call touches it holds a lease, a slice of
the account's remaining allowance granted atomically by fleet/redis_scripts.py SYNC. A call whose
estimate fits the lease is admitted with no round trip; one that does not awaits a refill (one
round trip). A background loop, every `fleet.sync_ms`, reports each account's cumulative spend,
renews the leases (a holder that stops, e.g. a killed pod, loses them after `fleet.lease_ttl_s`)
and gives back what was not used for `fleet.lease_idle_s`. Amounts are integers: micro-dollars
(rounded up, so the fleet's count is never below the ledger's exact sum), tokens, requests.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ledger.budgets import FOREVER, Account, Tally

from . import redis_scripts

log = logging.getLogger("meterline.fleet")
MICRO = Decimal(1_000_000)
PREFIX = "meterline:"
SLICE_DIVISOR = 2  # a grant is what is left / (this * live holders): slices shrink as the limit nears
WINDOW_GRACE_S = 86_400  # an account's keys outlive its window by this, then Redis drops them
# any error of Redis's (unreachable, timed out, out of memory, read-only replica...) degrades budgets, never a call
REDIS_ERRORS = (redis_errors.RedisError, OSError)
REFILL_TRIES = 3  # refills a waiting call asks for before it is refused (others may take what it was granted)


def micro(usd: Decimal | None) -> int:
    """Micro-dollars, rounded up: spend and estimates are never counted below what they are."""
    if not usd:
        return 0
    return math.ceil(usd * MICRO)


def limit_micro(usd: Decimal | None) -> int:
    """A limit in micro-dollars, rounded down (-1: no limit)."""
    return -1 if usd is None else math.floor(usd * MICRO)


def as_ints(t: Tally) -> tuple[int, int, int]:
    return (micro(t.usd), t.tokens, t.requests)


def account_key(rule: str, window: str, key: str, start: datetime) -> str:
    """The window's kind is in the key too: a rule replaced with another window never shares an account."""
    return f"{PREFIX}acct:{rule}\x1f{window}\x1f{key}\x1f{int(start.timestamp())}"


@dataclass(slots=True)
class Lease:
    """This holder's view of one fleet account (one rule, split key and window)."""

    acct: Account  # the in-memory account (ledger/budgets.py) that shows the fleet's numbers
    hkey: str
    expire_at: int  # unix seconds; 0: never (a `total` window)
    block: bool
    lease: list[int] = field(default_factory=lambda: [0, 0, 0])  # allowance held, actual spend taken off
    reserved: list[int] = field(default_factory=lambda: [0, 0, 0])  # estimates of calls in flight
    cum: list[int] = field(default_factory=lambda: [0, 0, 0])  # this holder's settled spend in the window
    sent_cum: list[int] = field(default_factory=lambda: [0, 0, 0])  # cum that Redis has acknowledged
    last_grant: list[int] = field(default_factory=lambda: [0, 0, 0])
    last_use: float = 0.0
    last_sync: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one SYNC of an account at a time

    def limits(self) -> tuple[int, int, int]:
        r = self.acct.rule
        return (limit_micro(self.acct.limit_usd), -1 if r.limit_tokens is None else r.limit_tokens,
                -1 if r.limit_requests is None else r.limit_requests)

    def missing(self, est: tuple[int, int, int]) -> list[int] | None:
        """What the lease lacks for this estimate, per dimension (None: it fits)."""
        lim = self.limits()
        short = [max(0, self.reserved[d] + est[d] - self.lease[d]) if lim[d] >= 0 else 0 for d in range(3)]
        return short if any(short) else None


Taken = tuple[Lease, tuple[int, int, int]]  # a lease and what one call reserved on it (usd micro, tokens, requests)


@dataclass(slots=True)
class RedisState:
    """What healthz and metrics show of the connection to Redis."""

    up: bool = True
    policy: str = "local"
    degraded_s: float = 0.0  # time spent unreachable, finished outages
    down_since: float | None = None  # monotonic
    outages: int = 0
    last_error: str = ""
    refills: int = 0  # calls that waited for a round trip (their lease lacked room); the others had none

    def degraded_total(self) -> float:
        now = time.monotonic()
        return self.degraded_s + (now - self.down_since if self.down_since is not None else 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"up": self.up, "degraded_s": round(self.degraded_total(), 3), "policy": self.policy,
                "outages": self.outages, "refills": self.refills,
                **({"error": self.last_error} if not self.up else {})}


class Leases:
    """This forwarder's leases on every fleet account, and the loop that settles and renews them."""

    def __init__(self, url: str, instance: str, policy: str, ttl_s: float, idle_s: float, sync_ms: int) -> None:
        # no retries inside the client (its default retries with backoff would hold a waiting call for
        # seconds): a failed round is sent again next round (settlement is idempotent; a grant whose
        # answer was lost is taken back by the next SYNC, which says what the holder keeps)
        self.client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                              retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                              health_check_interval=0)
        self.holder = f"{instance}:{os.getpid()}:{os.urandom(4).hex()}"
        self.ttl_ms = int(ttl_s * 1000)
        self.idle_s = idle_s
        self.every_s = sync_ms / 1000
        self.state = RedisState(policy=policy)
        self.leases: dict[tuple[str, str, datetime], Lease] = {}
        self._sync = self.client.register_script(redis_scripts.SYNC)
        self._claim = self.client.register_script(redis_scripts.CLAIM_ALERT)
        self.claims: list[tuple[str, int, str, Any]] = []  # (account key, expire_at, threshold, payload)
        self.on_alerts: Callable[[list[Any]], Awaitable[None]] | None = None  # deliver the claims won
        self.ticks: list[Callable[[], Awaitable[None]]] = []  # more work for each round (rule sync)
        self._task: asyncio.Task[None] | None = None

    # --- the request path (no awaits) ----------------------------------------------------------

    def lease_of(self, acct: Account) -> Lease:
        k = (acct.rule.name, acct.key, acct.start)
        lease = self.leases.get(k)
        if lease is None:
            expire = 0 if acct.end >= FOREVER else int(acct.end.timestamp()) + WINDOW_GRACE_S
            lease = self.leases[k] = Lease(acct, account_key(acct.rule.name, acct.rule.window, acct.key, acct.start),
                                           expire, acct.rule.action == "block")
        elif lease.acct is not acct:  # the rule was replaced: the same account, its new definition
            lease.acct = acct
        return lease

    def try_hold(self, holds: list[tuple[Account, Tally]]) -> list[Taken] | None:
        """Reserves every block account's estimate on its lease, or nothing (None: some lease is short)."""
        taken = []
        for acct, est in holds:
            lease = self.lease_of(acct)
            e = as_ints(est)
            if lease.block and lease.missing(e) is not None:
                return None
            taken.append((lease, e))
        self._reserve(taken)
        return taken

    def hold_anyway(self, holds: list[tuple[Account, Tally]]) -> list[Taken]:
        """Reserves past the leases (Redis down, policy local or open): settled when Redis is back."""
        taken = [(self.lease_of(acct), as_ints(est)) for acct, est in holds]
        self._reserve(taken)
        return taken

    def _reserve(self, taken: list[Taken]) -> None:
        now = time.monotonic()
        for lease, e in taken:
            lease.last_use = now
            for d in range(3):
                lease.reserved[d] += e[d]

    def settle(self, taken: list[Taken], actual: Tally) -> None:
        """The call ended: its estimate leaves the lease's reservations, its spend is taken off the
        lease and counted for the next sync."""
        a = as_ints(actual)
        now = time.monotonic()
        for lease, e in taken:
            lease.last_use = now
            for d in range(3):
                lease.reserved[d] -= e[d]
                lease.lease[d] -= a[d]
                lease.cum[d] += a[d]

    # --- round trips ---------------------------------------------------------------------------

    async def refill(self, holds: list[tuple[Account, Tally]]) -> tuple[list[Taken] | None, Account | None, int]:
        """Leases what the call lacks, then reserves it. Returns (reserved, None, 0), or (None, the
        account that has no room, dimension 0-2) when the fleet's allowance is spent or leased out.
        Raises a REDIS_ERRORS error when Redis does not answer."""
        self.state.refills += 1
        for _ in range(REFILL_TRIES):
            taken = self.try_hold(holds)
            if taken is not None:
                return taken, None, 0
            for acct, est in holds:
                lease = self.lease_of(acct)
                short = lease.missing(as_ints(est)) if lease.block else None
                if short is None:
                    continue
                async with lease.lock:
                    short = lease.missing(as_ints(est))  # a sync meanwhile may have brought enough
                    if short is None:
                        continue
                    refused = await self._run_sync([lease], want=[True], need=[short])
                if refused[0]:
                    return None, acct, refused[0] - 1
        taken = self.try_hold(holds)
        if taken is not None:
            return taken, None, 0
        for acct, est in holds:  # others took what this call was granted, every time: it is refused
            lease = self.lease_of(acct)
            short = lease.missing(as_ints(est)) if lease.block else None
            if short is not None:
                return None, acct, next(d for d in range(3) if short[d])
        return None, holds[0][0], 0

    async def _run_sync(self, leases: list[Lease], want: list[bool], need: list[list[int]]) -> list[int]:
        """One SYNC per lease, pipelined; the caller holds each lease's lock. Returns the dimension
        each refill was refused on (1-3; 0: not refused)."""
        pipe = self.client.pipeline(transaction=False)
        sent = []
        now = time.monotonic()
        for lease, w, n in zip(leases, want, need):
            give = [0, 0, 0]
            if not w and now - lease.last_use > self.idle_s:
                # unused for a while: what no call in flight holds goes back to the fleet
                give = [max(0, lease.lease[d] - max(0, lease.reserved[d])) for d in range(3)]
                for d in range(3):
                    lease.lease[d] -= give[d]
            keep = list(lease.lease)
            cum = list(lease.cum)
            lim = lease.limits()
            args: list[Any] = [self.holder, self.ttl_ms, lease.expire_at, 1 if w else 0, SLICE_DIVISOR]
            for d in range(3):
                args += [cum[d], keep[d], n[d], lim[d]]
            sent.append((keep, cum, give))
            await self._sync(keys=[lease.hkey, lease.hkey + ":holders"], args=args, client=pipe)
        try:
            results = await pipe.execute()
        except BaseException:  # includes cancellation: what was not acknowledged was not given back
            for lease, (keep, cum, give) in zip(leases, sent):
                for d in range(3):
                    lease.lease[d] += give[d]  # not given back after all
            raise
        refused = []
        for lease, (keep, cum, give), res in zip(leases, sent, results):
            granted, spent, leased, mine = res[0:3], res[3:6], res[6:9], res[9:12]
            for d in range(3):
                lease.lease[d] += granted[d]
                lost = max(0, keep[d]) + granted[d] - mine[d]
                if lost > 0:  # Redis no longer had it (the lease expired or the account was lost)
                    lease.lease[d] -= lost
                if granted[d]:
                    lease.last_grant[d] = granted[d]
            lease.sent_cum = cum
            lease.last_sync = now
            # the in-memory account shows the fleet's spend, plus what this holder spent since
            a = lease.acct
            a.spent = Tally(Decimal(spent[0] + lease.cum[0] - cum[0]) / MICRO,
                            spent[1] + lease.cum[1] - cum[1], spent[2] + lease.cum[2] - cum[2])
            refused.append(res[12])
        self.state_up()
        return refused

    def state_up(self) -> None:
        s = self.state
        if not s.up:
            assert s.down_since is not None
            s.degraded_s += time.monotonic() - s.down_since
            s.down_since = None
            s.up = True
            log.warning("Redis (fleet.redis) answers again after %.1f s: settling what was spent meanwhile",
                        s.degraded_s)

    def state_down(self, e: BaseException) -> None:
        s = self.state
        s.last_error = f"{type(e).__name__}: {e}"
        if s.up:
            s.up = False
            s.down_since = time.monotonic()
            s.outages += 1
            log.warning("Redis (fleet.redis) does not answer (%s): budgets follow fleet.on_redis_down=%s until it "
                        "does", s.last_error, s.policy)

    # --- the background loop -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="meterline-fleet-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:  # give every lease back: the others need not wait for them to expire
            for lease in self.leases.values():
                lease.last_use = 0.0
            await asyncio.wait_for(self.round(), 1.0)
        except (*REDIS_ERRORS, asyncio.TimeoutError):
            pass
        await self.client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.round()
                for tick in self.ticks:
                    await tick()
            except REDIS_ERRORS as e:
                self.state_down(e)
            except Exception:  # noqa: BLE001 - the loop must outlive a bug in one round
                log.exception("fleet budget sync failed")

    async def round(self) -> None:
        """Settles spend, renews, refills and returns leases: one pipelined round trip for all of them."""
        now = time.monotonic()
        due: list[Lease] = []
        wants: list[bool] = []
        for k, lease in list(self.leases.items()):
            if lease.lock.locked():
                continue  # a refill is talking to Redis about it
            dirty = lease.cum != lease.sent_cum
            idle = now - lease.last_use > self.idle_s
            holding = any(v > 0 for v in lease.lease)
            spare = any(lease.lease[d] > max(0, lease.reserved[d]) for d in range(3))  # held, in no call
            renew = holding and now - lease.last_sync > self.ttl_ms / 3000
            # a lease in use that runs low is topped up before a call has to wait for it
            low = lease.block and not idle and any(
                lim >= 0 and lease.lease[d] - lease.reserved[d] < lease.last_grant[d] // 4
                for d, lim in enumerate(lease.limits()))
            if dirty or renew or low or (idle and spare):
                await lease.lock.acquire()  # free: returns at once
                due.append(lease)
                wants.append(low)
            elif idle and not holding and not any(lease.reserved) and lease.acct.end.timestamp() < time.time():
                del self.leases[k]  # a window that ended, settled and given back
        if due:
            try:
                await self._run_sync(due, wants, [[0, 0, 0]] * len(due))
            finally:
                for lease in due:
                    lease.lock.release()
        if self.claims:
            await self._claim_alerts()

    async def _claim_alerts(self) -> None:
        claims, self.claims = self.claims, []
        pipe = self.client.pipeline(transaction=False)
        for hkey, expire_at, threshold, _ in claims:
            await self._claim(keys=[hkey], args=[threshold, expire_at], client=pipe)
        try:
            won = await pipe.execute()
        except REDIS_ERRORS:
            self.claims = claims + self.claims  # claimed when Redis answers
            raise
        mine = [payload for (_, _, _, payload), w in zip(claims, won) if w]
        if mine and self.on_alerts is not None:
            await self.on_alerts(mine)
