"""The budget guard on the request path: admit or refuse a call before it leaves, settle it after, note alerts.

The guard lives in the forwarder; what it keeps in the ledger (rules added through the API, top-ups,
the spend of current windows) it reads and writes through the sinks process (`link`). Alerts and the
utilization gauge ride on the call's journal line (CallExtras), and the sinks process delivers them.

With `fleet.redis` the accounts are the fleet's, in Redis (fleet/redis_leases.py): a call is admitted
against this forwarder's lease of each account, with no round trip while the lease has room; when it
has not, `admit` answers `Pending` and the caller awaits `resolve` (one refill). Rules and top-ups
changed through the API go to Redis too and reach every sidecar; a threshold alerts once per fleet.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ledger import budget_store
from ledger.budgets import (DEFAULT_THRESHOLDS, Budgets, CallAttrs, Crossing, CrossingNote, Refusal, Reservation,
                            Rule, Tally)
from ledger.pricing import FIRST_CALL_OUTPUT, MIN_LIKELY_OUTPUT, RECENT_CALLS, Pricer, RecentOutput
from ledger.records import OK, CallExtras, CallInfo, CallRecord
from jobs.settings import JobsConfig
from sinks import rpc
from sinks.link import Link

from .job_book import Held, JobBook

if TYPE_CHECKING:
    from fleet.redis_leases import Leases
    from .config import FleetConfig

NO_RESERVATION = Reservation([])
log = logging.getLogger("meterline.budgets")
RECENT_HISTORY = timedelta(days=7)  # how far back a restart looks for each model's recent answers
LIMIT_KINDS = ("usd", "tokens", "requests")  # the Lua scripts' dimensions, in order


@dataclass(slots=True)
class Pending:
    """An admission that needs more of the fleet's allowance than this forwarder's lease holds:
    `await guard.resolve(pending)` gives the Reservation or the Refusal (one round trip to Redis)."""

    reservation: Reservation
    info: CallInfo
    attrs: CallAttrs
    at: datetime
    assumed: list[Any]


@dataclass(slots=True)
class RedisDownRefusal(Refusal):
    """Refused because Redis does not answer and `fleet.on_redis_down` is `closed`."""

    @property
    def message(self) -> str:
        return (f"meterline: {self.account.describe()}: the fleet's budget store (fleet.redis) does not answer and "
                "fleet.on_redis_down is closed, so calls that need more of the fleet's allowance than this sidecar "
                "holds are refused; the call was not sent. Retry when Redis is back.")


class Guard:
    def __init__(self, rules: list[Rule], pricer: Pricer, link: Link, flush: Callable[[], None],
                 jobs_config: JobsConfig | None = None, fleet: FleetConfig | None = None) -> None:
        self.config_rules = {r.name: r for r in rules}
        self.budgets = Budgets(rules)
        self.pricer = pricer
        self.link = link
        self.flush = flush  # writes the journal's waiting lines, before asking the sinks process to catch up
        self.alerts_fired = 0
        self.refused = 0
        self.recent = RecentOutput()  # what each (provider, model, app) answered lately: the estimate without max tokens
        # rules whose history is being read: calls settled meanwhile are counted live, not from the ledger
        self._rebuilding: dict[str, set[str]] = {}
        self.jobs = JobBook(jobs_config or JobsConfig())  # async jobs and the reservations they hold
        self.fleet_config = fleet
        self.leases: Leases | None = None
        self._shared_version = -1
        self.policy = "local"
        if fleet is not None and fleet.redis:
            from fleet.redis_leases import Leases  # redis loads only in a fleet
            self.leases = Leases(fleet.redis, fleet.instance, fleet.on_redis_down, fleet.lease_ttl_s,
                                 fleet.lease_idle_s, fleet.sync_ms)
            self.policy = fleet.on_redis_down

    async def start(self) -> None:
        """Adds the rules saved through the API and rebuilds every window's spend from the ledger."""
        saved = await self.link.db("api_rules")
        for rule in saved:
            if rule.name not in self.config_rules:  # the config file wins over an older API edit
                self.budgets.put(rule)
        now = datetime.now(timezone.utc)
        history = await self.link.db("history", self.budgets.window_starts(now))
        budget_store.apply(self.budgets, history)
        if self.budgets.rules:  # a restart keeps the estimates for calls without max tokens
            recent = await self.link.db("recent_outputs", now - RECENT_HISTORY, RECENT_CALLS)
            for key, tokens in recent:
                self.recent.record(key, tokens)
        await self._restore_jobs(now)
        if self.leases is not None:
            from fleet.redis_leases import REDIS_ERRORS
            self.leases.on_alerts = self._deliver_alerts
            self.leases.ticks.append(self._poll_shared)
            try:
                await self._poll_shared()
            except REDIS_ERRORS as e:  # calls go on under fleet.on_redis_down; the rules arrive when it answers
                self.leases.state_down(e)
            self.leases.start()

    async def stop(self) -> None:
        """Gives this forwarder's leases back to the fleet (at shutdown)."""
        if self.leases is not None:
            await self.leases.stop()

    # --- the request path ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Any rules at all: without them a call needs no admission (nor the attributes for it)."""
        return bool(self.budgets.rules)

    def admit(self, info: CallInfo, attrs: CallAttrs, at: datetime) -> Reservation | Refusal | Pending:
        """Reserves what the call will cost: up to its max tokens when it gives them (a hard bound),
        else what this model answered this app lately (bounded by the context window), else a
        first-call default. Every step is a dict lookup. In a fleet, `Pending` when this forwarder's
        lease lacks room: await `resolve` with it."""
        if not self.budgets.rules:
            return NO_RESERVATION
        assumed: list[Any] = []  # (output tokens, where they come from, usd): for the refusal's message

        def estimate(rules: list[Rule]) -> Tally:
            out = info.max_output_tokens
            source = "max_tokens"
            if out is None:
                ceiling = self.pricer.output_ceiling(info.provider, info.request_model, info.input_estimate, at)
                seen = self.recent.likely((info.provider, attrs.model, attrs.app))
                source = "first" if seen is None else "recent"
                out = min(FIRST_CALL_OUTPUT if seen is None else max(seen, MIN_LIKELY_OUTPUT), ceiling)
            usd = Decimal(0)
            if info.priced and any(r.limit_usd is not None for r in rules):
                cost, out = self.pricer.worst_case(info.provider, info.request_model, info.input_estimate, out, at)
                usd = cost or Decimal(0)  # an unpriced model can be held only by token and request limits
            assumed[:] = (out, source, usd)
            return Tally(usd, info.input_estimate + out if info.priced else 0, 1)

        decision = self.budgets.admit(attrs, at, estimate)
        leases = self.leases
        if leases is not None:
            if isinstance(decision, Refusal):
                if not leases.state.up and self.policy == "open":
                    return self._admit_anyway(attrs, at, decision.estimate)
                return self._refused(decision, info, attrs, assumed)
            if decision.holds:
                taken = leases.try_hold(decision.holds)
                if taken is not None:
                    decision.fleet = taken
                    return decision
                if not leases.state.up:
                    return self._redis_down(decision, at)
                return Pending(decision, info, attrs, at, list(assumed))
        return self._refused(decision, info, attrs, assumed) if isinstance(decision, Refusal) else decision

    def _refused(self, decision: Refusal, info: CallInfo, attrs: CallAttrs, assumed: list[Any]) -> Refusal:
        self.refused += 1
        if assumed:
            decision.bounded = assumed[1] == "max_tokens"
            decision.basis = self._basis(info, attrs, *assumed)
        if decision.account.refused == 1:  # once per account and window: the log is not flooded
            log.warning("refused a call: %s (further refusals of this account in this window are counted, "
                        "not logged)", decision.message.removeprefix("meterline: "))
        return decision

    async def admit_async(self, info: CallInfo, attrs: CallAttrs, at: datetime) -> Reservation | Refusal:
        """`admit`, then `resolve` when it answers Pending: for callers that may await (routes, jobs)."""
        decision = self.admit(info, attrs, at)
        return await self.resolve(decision) if isinstance(decision, Pending) else decision

    # --- the fleet's leases (fleet.redis) -------------------------------------------------------

    async def resolve(self, pending: Pending) -> Reservation | Refusal:
        """Refills the leases the call lacks (one round trip), then admits or refuses it."""
        from fleet.redis_leases import REDIS_ERRORS
        assert self.leases is not None
        reservation = pending.reservation
        try:
            taken, acct, dim = await self.leases.refill(reservation.holds)
        except REDIS_ERRORS as e:
            self.leases.state_down(e)
            return self._redis_down(reservation, pending.at)
        except BaseException:  # the app went away while it waited: the call holds nothing
            self._unreserve(reservation)
            raise
        if taken is not None:
            reservation.fleet = taken
            return reservation
        assert acct is not None
        self._unreserve(reservation)
        est = next(e for a, e in reservation.holds if a is acct)
        acct.refused += 1
        refusal = Refusal(acct, LIMIT_KINDS[dim], acct.seconds_to_reset(pending.at), estimate=est)
        return self._refused(refusal, pending.info, pending.attrs, pending.assumed)

    def _redis_down(self, reservation: Reservation, at: datetime) -> Reservation | Refusal:
        """Redis does not answer and the lease has no room: `local` and `open` admit (settled when
        Redis is back), `closed` refuses."""
        assert self.leases is not None
        if self.policy != "closed":
            reservation.fleet = self.leases.hold_anyway(reservation.holds)
            return reservation
        self._unreserve(reservation)
        acct, est = next((a, e) for a, e in reservation.holds if a.rule.action == "block")
        self.refused += 1
        return RedisDownRefusal(acct, "usd" if acct.limit_usd is not None else "tokens", 1, estimate=est)

    def _admit_anyway(self, attrs: CallAttrs, at: datetime, est: Tally) -> Reservation:
        """`open` while Redis is down: the call goes, counted on every matching account."""
        assert self.leases is not None
        holds = [(self.budgets.account(r, r.split_key(attrs), at), est) for r in self.budgets.matching(attrs)]
        for acct, e in holds:
            acct.reserved.add(e)
        reservation = Reservation(holds, attrs=attrs)
        reservation.fleet = self.leases.hold_anyway(holds)
        return reservation

    @staticmethod
    def _unreserve(reservation: Reservation) -> None:
        for acct, est in reservation.holds:
            acct.reserved.add(est, -1)

    async def _deliver_alerts(self, won: list[tuple[dict[str, Any], str]]) -> None:
        """Alerts whose threshold this forwarder claimed first in the fleet go to the sinks process."""
        self.alerts_fired += len(won)
        try:
            await self.link.call("alerts", won)
        except (rpc.Unavailable, rpc.Failed) as e:
            log.warning("could not hand %d fleet budget alerts to the sinks process: %s", len(won), e)

    async def _poll_shared(self) -> None:
        """Reads the fleet's API rules and top-ups when their version moved (every sync round)."""
        from fleet import redis_rules
        assert self.leases is not None
        client = self.leases.client
        if await redis_rules.version(client) == self._shared_version:
            return
        shared = await redis_rules.load(client, DEFAULT_THRESHOLDS)
        b = self.budgets
        if shared.version == 0:
            # a Redis with no budget state (the fleet's first sidecar, or Redis restarted without
            # persistence): this sidecar's API rules and top-ups go (back) in, rather than vanish
            mine = [r for r in b.rules.values() if r.source == "api" and r.name not in self.config_rules]
            await redis_rules.restore(client, mine, {k: v for k, v in b.topups.items() if k[0] in b.rules})
            shared = await redis_rules.load(client, DEFAULT_THRESHOLDS)
        self._shared_version = shared.version
        for name, rule in shared.rules.items():
            if name in self.config_rules:
                continue  # the config file wins over an API edit
            current = b.rules.get(name)
            if current is None or current.to_doc() != rule.to_doc():
                b.put(rule)
        for name in [n for n, r in b.rules.items() if r.source == "api" and n not in shared.rules]:
            b.remove(name)
        for (name, key), amount in shared.topups.items():
            if name in b.rules and b.topups.get((name, key)) != amount:
                b.topups[(name, key)] = amount
                for (rn, k, _), acct in b.accounts.items():
                    if rn == name and k == key:
                        acct.topup_usd = amount

    @staticmethod
    def _basis(info: CallInfo, attrs: CallAttrs, out: int, source: str, usd: Decimal) -> str:
        """How a refused call's reservation was made, in words (built only for refusals)."""
        model = info.request_model or "an unnamed model"
        prices = f" at {model} prices" if usd else ""
        inp = f"about {info.input_estimate:,} input tokens + " if info.input_estimate else ""
        if source == "max_tokens":
            return f"{inp}max_tokens {out}{prices}"
        app = f"app {attrs.app!r}" if attrs.app else "calls without an app"
        if source == "recent":
            return (f"{inp}{out:,} output tokens{prices}: no max_tokens given, so the most {model} produced "
                    f"for {app} in its last {RECENT_CALLS} calls")
        return (f"{inp}{out:,} output tokens{prices}: no max_tokens given and no recent calls of {model} "
                f"for {app}, so a first-call default")

    def settle(self, reservation: Reservation, record: CallRecord, extras: CallExtras) -> None:
        if record.outcome == OK and record.output_tokens is not None and self.budgets.rules:
            self.recent.record((record.provider, record.request_model or "", record.app or ""), record.output_tokens)
        if not reservation.holds:
            return
        actual = Tally(record.cost_usd or Decimal(0),
                       (record.input_tokens or 0) + (record.output_tokens or 0), 1)
        extras.attributes["meterline.budget.rules"] = ",".join(a.rule.name for a, _ in reservation.holds)
        crossings = self.budgets.settle(reservation, actual, record.started_at)
        if reservation.fleet is not None and self.leases is not None:
            self.leases.settle(reservation.fleet, actual)
        for acct in reservation.counted:  # counted live: a rebuild from the ledger leaves it out
            if acct.rule.name in self._rebuilding:
                self._rebuilding[acct.rule.name].add(record.call_id)
            extras.utilization.append((acct.rule.name, acct.key or None, str(acct.settled_utilization)))
        self._alert(crossings, record.call_id, extras)

    def refused_call(self, refusal: Refusal, call_id: str, extras: CallExtras) -> None:
        """Marks the refused call's span. A refusal is counted (status `refused`); it alerts only on
        thresholds that spend already reaches (see Budgets.admit), never at utilization 0."""
        extras.attributes["meterline.budget.name"] = refusal.account.rule.name
        extras.attributes["meterline.budget.blocked"] = True
        extras.attributes["meterline.budget.limit"] = refusal.limit
        if refusal.account.rule.per:
            extras.attributes["meterline.budget.key"] = refusal.account.key
        self._alert(refusal.crossings, call_id, extras)

    def _alert(self, crossings: list[Crossing], call_id: str, extras: CallExtras) -> None:
        if self.leases is not None:
            for c in crossings:  # in a fleet the first sidecar to claim a threshold alerts (redis_leases.round)
                lease = self.leases.lease_of(c.account)
                self.leases.claims.append((lease.hkey, lease.expire_at, str(c.threshold),
                                           (CrossingNote.of(c).to_json(), call_id)))
            return
        for c in crossings:
            extras.events.append(("meterline.budget.threshold", c.at, {
                "meterline.budget.name": c.account.rule.name, "meterline.budget.key": c.account.key,
                "meterline.budget.threshold": float(c.threshold),
                "meterline.budget.utilization": float(c.utilization)}))
            extras.alerts.append(CrossingNote.of(c).to_json())  # the sinks process logs and delivers it
            self.alerts_fired += 1

    # --- async jobs (jobs/, sidecar/jobs_hook.py) ------------------------------------------------

    def admit_job(self, info: CallInfo, attrs: CallAttrs, at: datetime,
                  usd: Decimal | None) -> Reservation | Refusal | Pending:
        """Reserves a job's estimate (its units asked times their price) until the job settles. A job
        with no estimate (no price, or a batch whose requests are in a file) reserves only its request.
        In a fleet the estimate is held on this forwarder's leases, as a call's is: `Pending` when
        they lack room (await `resolve`)."""
        if not self.budgets.rules:
            return NO_RESERVATION
        decision = self.budgets.admit(attrs, at, lambda rules: Tally(usd or Decimal(0), 0, 1))
        leases = self.leases
        if leases is not None:
            if isinstance(decision, Refusal) and not leases.state.up and self.policy == "open":
                return self._admit_anyway(attrs, at, decision.estimate)
            if not isinstance(decision, Refusal) and decision.holds:
                taken = leases.try_hold(decision.holds)
                if taken is not None:
                    decision.fleet = taken
                    return decision
                if not leases.state.up:
                    return self._redis_down(decision, at)
                return Pending(decision, info, attrs, at, [])
        if isinstance(decision, Refusal):
            self.refused += 1
            self.job_refused(decision, info)
            if decision.account.refused == 1:
                log.warning("refused a job: %s", decision.message.removeprefix("meterline: "))
        return decision

    @staticmethod
    def job_refused(decision: Refusal, info: CallInfo) -> Refusal:
        """Says how a refused job's reservation was made (here, or after the fleet's `resolve`, which
        counted and logged it)."""
        decision.bounded = True
        model = info.request_model or "an unnamed model"
        decision.basis = f"the estimate of this {model} job from the units it asks for"
        return decision

    def settle_job(self, reservation: Reservation, usd: Decimal | None, at: datetime, call_id: str | None,
                   extras: CallExtras | None) -> None:
        """The job reached its terminal state: its reservation becomes what it cost. Alerts ride on
        the call that saw it end (`extras`); settled from the ledger (no call), they are logged."""
        if not reservation.holds:
            return
        actual = Tally(usd or Decimal(0), 0, 1)
        crossings = self.budgets.settle(reservation, actual, at)
        if reservation.fleet is not None and self.leases is not None:
            self.leases.settle(reservation.fleet, actual)  # the fleet's accounts get the job's cost
        if extras is not None:
            for acct in reservation.counted:
                extras.utilization.append((acct.rule.name, acct.key or None, str(acct.settled_utilization)))
            self._alert(crossings, call_id or "", extras)
        else:
            for c in crossings:
                self.alerts_fired += 1
                log.warning("budget %s reached %s of its limit as a job settled", c.account.rule.name, c.threshold)

    def _hold(self, attrs: CallAttrs, at: datetime, usd: Decimal | None) -> Reservation:
        """A reservation made again after a restart, whatever the limits now say (the job runs already)."""
        est = Tally(usd or Decimal(0), 0, 1)
        holds = [(self.budgets.account(r, r.split_key(attrs), at), est) for r in self.budgets.matching(attrs)]
        for acct, e in holds:
            acct.reserved.add(e)
        reservation = Reservation(holds, attrs=attrs)
        if self.leases is not None and holds:
            # held on this forwarder's new leases again (the old ones went back, or expired, with the old
            # process): past their room if need be, as while Redis is down; settled as the job ends
            reservation.fleet = self.leases.hold_anyway(holds)
        return reservation

    async def _restore_jobs(self, now: datetime) -> None:
        """Unsettled jobs hold their reservations again; settled jobs' costs count in their windows
        (their calls cost 0 in `calls`, so the window rebuild from calls leaves them out)."""
        for doc in await self.link.db("unsettled_jobs"):
            attrs = CallAttrs(doc["provider"] or "", doc["request_model"] or doc["model"] or "",
                              doc["operation"] or "", doc["app"], doc["user_id"], doc["key"], doc["tags"])
            at = doc["submitted_at"] or now
            estimate = Decimal(doc["estimate_usd"]) if doc["estimate_usd"] is not None else None
            reservation = self._hold(attrs, at, estimate) if self.budgets.rules else NO_RESERVATION
            self.jobs.hold(Held(doc["job_id"], doc["upstream"], doc["provider"] or "", "",
                                doc["model"], doc["units_asked"], estimate, reservation, at,
                                doc["provider_job_id"], doc["output_file_id"]))
        if self.budgets.rules:
            for attrs, start, usd in await self.link.db("job_spend", self.budgets.window_starts(now)):
                self.budgets.restore(CallAttrs(**attrs), start, Tally(usd, 0, 0))

    async def sync_jobs(self) -> int:
        """Settles the reservations of jobs the ledger has settled meanwhile (the sinks process's own
        polls, or `unknown` after jobs.unknown_after_s). Returns how many."""
        held = self.jobs.by_job_id()
        if not held:
            return 0
        settled = await self.link.db("job_settlements", sorted(held))
        now = datetime.now(timezone.utc)
        for job_id, _state, cost in settled:
            h = held[job_id]
            self.jobs.drop(h)
            self.settle_job(h.reservation, cost, now, None, None)
        return len(settled)

    async def sync_jobs_forever(self) -> None:
        """Every jobs.sync_s, while jobs are held. A sinks process that is down is asked again later."""
        while True:
            await asyncio.sleep(self.jobs.config.sync_s)
            try:
                await self.sync_jobs()
            except (rpc.Unavailable, rpc.Failed) as e:
                log.debug("job settlements not read: %s", e)

    # --- the runtime API -----------------------------------------------------------------------

    async def put_rule(self, rule: Rule) -> None:
        """The rule holds from now on; its windows' earlier spend is read from the ledger. Calls that
        finish while it is read are counted live and left out of the read, so none counts twice."""
        now = datetime.now(timezone.utc)
        await self.link.db("save_rule", rule, now)
        await self._share("put_rule", rule)
        self.budgets.put(rule)
        live = self._rebuilding[rule.name] = set()
        try:
            self.flush()
            await self.link.sync()  # the calls journaled so far are in the ledger
            history = await self.link.db("history", self.budgets.window_starts(now, rule.name), live)
        finally:
            del self._rebuilding[rule.name]
        budget_store.apply(self.budgets, history, rule.name)

    async def remove_rule(self, name: str) -> bool:
        if name not in self.budgets.rules:
            return False
        await self.link.db("delete_rule", name)
        await self._share("remove_rule", name)
        self.config_rules.pop(name, None)
        return self.budgets.remove(name)

    async def topup(self, name: str, key: str, amount: Decimal) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        await self.link.db("save_topup", name, key, amount, now)
        await self._share("topup", name, key, amount)
        self.budgets.topup(name, key, amount)
        return self.status(name)

    async def _share(self, op: str, *args: Any) -> None:
        """An API change goes to the fleet's Redis; with Redis down it holds on this sidecar only."""
        if self.leases is None:
            return
        from fleet import redis_rules
        from fleet.redis_leases import REDIS_ERRORS
        try:
            await getattr(redis_rules, op)(self.leases.client, *args)
        except REDIS_ERRORS as e:
            self.leases.state_down(e)
            log.warning("budget change %s holds on this sidecar only: Redis (fleet.redis) does not answer", op)

    def status(self, only: str | None = None) -> list[dict[str, Any]]:
        now = datetime.now(timezone.utc)
        self.budgets.prune(now)
        return [s for s in self.budgets.status(now) if only in (None, s["rule"])]
