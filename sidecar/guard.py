"""The budget guard on the request path: admit or refuse a call before it leaves, settle it after, raise alerts."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from decimal import Decimal
from collections.abc import Callable
from typing import Any

from exporters.alerts import AlertDispatcher
from ledger import budget_store
from ledger.budgets import Budgets, CallAttrs, Crossing, Refusal, Reservation, Rule, Tally
from ledger.pricing import Pricer
from ledger.records import CallExtras, CallInfo, CallRecord
from ledger.writer import LedgerWriter

NO_RESERVATION = Reservation([])


class Guard:
    def __init__(self, rules: list[Rule], pricer: Pricer, writer: LedgerWriter, alerts: AlertDispatcher,
                 on_utilization: Callable[[str, str | None, Decimal], None] | None = None) -> None:
        self.config_rules = {r.name: r for r in rules}
        self.budgets = Budgets(rules)
        self.pricer = pricer
        self.writer = writer
        self.alerts = alerts
        self.refused = 0
        self.on_utilization = on_utilization  # feeds the meterline.budget.utilization gauge
        # rules whose history is being read: calls settled meanwhile are counted live, not from the ledger
        self._rebuilding: dict[str, set[str]] = {}

    async def start(self) -> None:
        """Adds the rules saved through the API and rebuilds every window's spend from the ledger."""
        loop = asyncio.get_running_loop()
        saved = await loop.run_in_executor(None, self._db, budget_store.api_rules)
        for rule in saved:
            if rule.name not in self.config_rules:  # the config file wins over an older API edit
                self.budgets.put(rule)
        now = datetime.now(timezone.utc)
        history = await loop.run_in_executor(None, self._db, budget_store.history, self.budgets.window_starts(now))
        budget_store.apply(self.budgets, history)

    def _db(self, fn: Any, *args: Any) -> Any:
        cur = self.writer.cursor()
        try:
            return fn(cur, *args)
        finally:
            cur.close()

    # --- the request path ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Any rules at all: without them a call needs no admission (nor the attributes for it)."""
        return bool(self.budgets.rules)

    def admit(self, info: CallInfo, attrs: CallAttrs, at: datetime) -> Reservation | Refusal:
        if not self.budgets.rules:
            return NO_RESERVATION

        def estimate(rules: list[Rule]) -> Tally:
            usd = Decimal(0)
            need_usd = any(r.limit_usd is not None for r in rules)
            if need_usd and info.priced:
                worst, max_out = self.pricer.worst_case(info.provider, info.request_model, info.input_estimate,
                                                        info.max_output_tokens, at)
                usd = worst or Decimal(0)  # an unpriced model can be held only by token and request limits
            else:
                max_out = info.max_output_tokens if info.max_output_tokens is not None else \
                    self.pricer.default_max_output
            tokens = info.input_estimate + max_out if info.priced else 0
            return Tally(usd, tokens, 1)

        decision = self.budgets.admit(attrs, at, estimate)
        if isinstance(decision, Refusal):
            self.refused += 1
        return decision

    def settle(self, reservation: Reservation, record: CallRecord, extras: CallExtras) -> None:
        if not reservation.holds:
            return
        actual = Tally(record.cost_usd or Decimal(0),
                       (record.input_tokens or 0) + (record.output_tokens or 0), 1)
        extras.attributes["meterline.budget.rules"] = ",".join(a.rule.name for a, _ in reservation.holds)
        crossings = self.budgets.settle(reservation, actual, record.started_at)
        for acct, _ in reservation.holds:
            if acct.rule.name in self._rebuilding:
                self._rebuilding[acct.rule.name].add(record.call_id)
            if self.on_utilization is not None:
                self.on_utilization(acct.rule.name, acct.key or None, acct.settled_utilization)
        self._alert(crossings, record.call_id, extras)

    def refused_call(self, refusal: Refusal, call_id: str, extras: CallExtras) -> None:
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
            self.alerts.fire(c, call_id)

    # --- the runtime API -----------------------------------------------------------------------

    async def put_rule(self, rule: Rule) -> None:
        """The rule holds from now on; its windows' earlier spend is read from the ledger. Calls that
        finish while it is read are counted live and left out of the read, so none counts twice."""
        loop = asyncio.get_running_loop()
        now = datetime.now(timezone.utc)
        await loop.run_in_executor(None, self._db, budget_store.save_rule, rule, now)
        submitted = self.writer.submitted
        self.budgets.put(rule)
        live = self._rebuilding[rule.name] = set()
        try:
            await loop.run_in_executor(None, self.writer.wait_written, submitted, 10.0)
            history = await loop.run_in_executor(None, self._db, budget_store.history,
                                                 self.budgets.window_starts(now, rule.name), live)
        finally:
            del self._rebuilding[rule.name]
        budget_store.apply(self.budgets, history, rule.name)

    async def remove_rule(self, name: str) -> bool:
        if name not in self.budgets.rules:
            return False
        await asyncio.get_running_loop().run_in_executor(None, self._db, budget_store.delete_rule, name)
        self.config_rules.pop(name, None)
        return self.budgets.remove(name)

    async def topup(self, name: str, key: str, amount: Decimal) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        await asyncio.get_running_loop().run_in_executor(None, self._db, budget_store.save_topup, name, key,
                                                         amount, now)
        self.budgets.topup(name, key, amount)
        return self.status(name)

    def status(self, only: str | None = None) -> list[dict[str, Any]]:
        now = datetime.now(timezone.utc)
        self.budgets.prune(now)
        return [s for s in self.budgets.status(now) if only in (None, s["rule"])]
