"""The budget guard on the request path: admit or refuse a call before it leaves, settle it after, note alerts.

The guard lives in the forwarder; what it keeps in the ledger (rules added through the API, top-ups,
the spend of current windows) it reads and writes through the sinks process (`link`). Alerts and the
utilization gauge ride on the call's journal line (CallExtras), and the sinks process delivers them.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from collections.abc import Callable
from typing import Any

from ledger import budget_store
from ledger.budgets import Budgets, CallAttrs, Crossing, CrossingNote, Refusal, Reservation, Rule, Tally
from ledger.pricing import FIRST_CALL_OUTPUT, MIN_LIKELY_OUTPUT, RECENT_CALLS, Pricer, RecentOutput
from ledger.records import OK, CallExtras, CallInfo, CallRecord
from jobs.settings import JobsConfig
from sinks import rpc
from sinks.link import Link

from .job_book import Held, JobBook

NO_RESERVATION = Reservation([])
log = logging.getLogger("meterline.budgets")
RECENT_HISTORY = timedelta(days=7)  # how far back a restart looks for each model's recent answers


class Guard:
    def __init__(self, rules: list[Rule], pricer: Pricer, link: Link, flush: Callable[[], None],
                 jobs_config: JobsConfig | None = None) -> None:
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

    # --- the request path ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Any rules at all: without them a call needs no admission (nor the attributes for it)."""
        return bool(self.budgets.rules)

    def admit(self, info: CallInfo, attrs: CallAttrs, at: datetime) -> Reservation | Refusal:
        """Reserves what the call will cost: up to its max tokens when it gives them (a hard bound),
        else what this model answered this app lately (bounded by the context window), else a
        first-call default. Every step is a dict lookup."""
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
        if isinstance(decision, Refusal):
            self.refused += 1
            if assumed:
                decision.bounded = assumed[1] == "max_tokens"
                decision.basis = self._basis(info, attrs, *assumed)
            if decision.account.refused == 1:  # once per account and window: the log is not flooded
                log.warning("refused a call: %s (further refusals of this account in this window are counted, "
                            "not logged)", decision.message.removeprefix("meterline: "))
        return decision

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
        for c in crossings:
            extras.events.append(("meterline.budget.threshold", c.at, {
                "meterline.budget.name": c.account.rule.name, "meterline.budget.key": c.account.key,
                "meterline.budget.threshold": float(c.threshold),
                "meterline.budget.utilization": float(c.utilization)}))
            extras.alerts.append(CrossingNote.of(c).to_json())  # the sinks process logs and delivers it
            self.alerts_fired += 1

    # --- async jobs (jobs/, sidecar/jobs_hook.py) ------------------------------------------------

    def admit_job(self, info: CallInfo, attrs: CallAttrs, at: datetime, usd: Decimal | None) -> Reservation | Refusal:
        """Reserves a job's estimate (its units asked times their price) until the job settles. A job
        with no estimate (no price, or a batch whose requests are in a file) reserves only its request."""
        if not self.budgets.rules:
            return NO_RESERVATION
        decision = self.budgets.admit(attrs, at, lambda rules: Tally(usd or Decimal(0), 0, 1))
        if isinstance(decision, Refusal):
            self.refused += 1
            decision.bounded = True
            model = info.request_model or "an unnamed model"
            decision.basis = f"the estimate of this {model} job from the units it asks for"
            if decision.account.refused == 1:
                log.warning("refused a job: %s", decision.message.removeprefix("meterline: "))
        return decision

    def settle_job(self, reservation: Reservation, usd: Decimal | None, at: datetime, call_id: str | None,
                   extras: CallExtras | None) -> None:
        """The job reached its terminal state: its reservation becomes what it cost. Alerts ride on
        the call that saw it end (`extras`); settled from the ledger (no call), they are logged."""
        if not reservation.holds:
            return
        crossings = self.budgets.settle(reservation, Tally(usd or Decimal(0), 0, 1), at)
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
        return Reservation(holds, attrs=attrs)

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
        self.config_rules.pop(name, None)
        return self.budgets.remove(name)

    async def topup(self, name: str, key: str, amount: Decimal) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        await self.link.db("save_topup", name, key, amount, now)
        self.budgets.topup(name, key, amount)
        return self.status(name)

    def status(self, only: str | None = None) -> list[dict[str, Any]]:
        now = datetime.now(timezone.utc)
        self.budgets.prune(now)
        return [s for s in self.budgets.status(now) if only in (None, s["rule"])]
