"""The order in which a call tries a route's targets: rules first, then fallback, weighted, cheapest or fastest."""
from __future__ import annotations

import bisect
import itertools
import random
from datetime import datetime
from decimal import Decimal
from typing import Any

from ledger.records import CallInfo

from .circuit import Breaker
from .config import Route, Rule, Target

TTFT_DECAY = 0.2  # weight of the newest time to first token in a target's moving average
_ASSUMED_OUTPUT = 1024  # output tokens assumed by `cheapest` when the request gives no max tokens


class RouteState:
    """A route's runtime state in this forwarder: its circuits, its targets' recent TTFT, the weighted picker."""

    __slots__ = ("route", "providers", "breakers", "ttft", "cumulative", "total", "rng")

    def __init__(self, route: Route, providers: dict[str, str], rng: random.Random | None = None) -> None:
        self.route = route
        self.providers = providers  # upstream name -> genai-prices provider id
        self.breakers = {t.key: Breaker(route.circuit) for t in route.targets}
        self.ttft: dict[str, float] = {}  # seconds, a decaying average per target key
        weights = [t.weight for t in route.targets]
        self.cumulative = list(itertools.accumulate(weights))
        self.total = self.cumulative[-1]
        self.rng = rng or random.Random()

    def observe_ttft(self, key: str, seconds: float) -> None:
        old = self.ttft.get(key)
        self.ttft[key] = seconds if old is None else old + TTFT_DECAY * (seconds - old)

    def plan(self, info: CallInfo, app: str | None, user: str | None, tags: dict[str, str],
             pricer: Any, at: datetime) -> tuple[list[Target], str | None]:
        """The targets in the order to try, and the arm (the weighted pick, else the rule's target)."""
        route = self.route
        targets = route.targets
        strategy = route.strategy
        arm = None
        if strategy == "fallback":
            order = list(targets)
        elif strategy == "weighted":
            first = self.pick_weighted()
            arm = first.key
            order = [first, *(t for t in targets if t is not first)]
        elif strategy == "cheapest":
            order = sorted(targets, key=lambda t: _price_key(t, self.providers[t.upstream], info, pricer, at))
        else:
            order = self._fastest()
        if route.rules:
            rule = first_rule(route.rules, info, app, user, tags)
            if rule is not None:
                chosen = targets[rule.use]
                order.remove(chosen)
                order.insert(0, chosen)
                arm = chosen.key
        return order, arm

    def pick_weighted(self) -> Target:
        """One target, each with probability weight / total weight."""
        i = bisect.bisect_right(self.cumulative, self.rng.random() * self.total)
        return self.route.targets[min(i, len(self.route.targets) - 1)]

    def _fastest(self) -> list[Target]:
        """Power of two choices over the decaying TTFT averages (a target not yet measured counts
        as fastest, so every target gets measured); the rest by average, as fallbacks."""
        targets = list(self.route.targets)
        if len(targets) == 1:
            return targets
        a, b = self.rng.sample(targets, 2)
        ttft = self.ttft
        first = a if ttft.get(a.key, 0.0) <= ttft.get(b.key, 0.0) else b
        rest = sorted((t for t in targets if t is not first), key=lambda t: ttft.get(t.key, 0.0))
        return [first, *rest]

    def status(self) -> list[dict[str, Any]]:
        return [{"target": t.key, "weight": t.weight, **self.breakers[t.key].status(),
                 "ttft_ms": round(self.ttft[t.key] * 1000, 1) if t.key in self.ttft else None}
                for t in self.route.targets]


def first_rule(rules: tuple[Rule, ...], info: CallInfo, app: str | None, user: str | None,
               tags: dict[str, str]) -> Rule | None:
    """The first rule whose conditions all hold for this request."""
    tokens = info.input_estimate
    out = info.max_output_tokens
    for r in rules:
        if r.input_tokens_below is not None and not tokens < r.input_tokens_below:
            continue
        if r.input_tokens_at_least is not None and not tokens >= r.input_tokens_at_least:
            continue
        if r.max_tokens_below is not None and not (out is not None and out < r.max_tokens_below):
            continue
        if r.max_tokens_at_least is not None and not (out is not None and out >= r.max_tokens_at_least):
            continue
        if r.stream is not None and r.stream != info.stream:
            continue
        if r.app is not None and r.app != app:
            continue
        if r.user is not None and r.user != user:
            continue
        if r.tags and any(tags.get(k) != v for k, v in r.tags):
            continue
        return r
    return None


def _price_key(target: Target, provider: str, info: CallInfo, pricer: Any, at: datetime) -> tuple[int, Decimal]:
    """A target's estimated cost for this request (its input estimate, its max tokens or 1024 out);
    an unpriced target sorts after every priced one."""
    cost, _ = pricer.worst_case(provider, target.model, info.input_estimate,
                                info.max_output_tokens or _ASSUMED_OUTPUT, at)
    return (1, Decimal(0)) if cost is None else (0, cost)

