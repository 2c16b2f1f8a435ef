"""The guard's estimate of a call before it is sent, and how amounts read: in process, no sidecar."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from ledger.budgets import CallAttrs, Refusal, dollars, duration, exact, parse_rule
from ledger.pricing import FIRST_CALL_OUTPUT, MIN_LIKELY_OUTPUT, PriceRule, Pricer, RecentOutput
from ledger.records import CallInfo
from sidecar.guard import Guard

AT = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)


def guard(limit_tokens: int = 10**9, prices: list[PriceRule] | None = None, default_max: int = 32_768) -> Guard:
    rule = parse_rule({"name": "t", "window": "day", "limit_tokens": limit_tokens}, "t")
    return Guard([rule], Pricer(prices, default_max), link=None, flush=None)  # admit touches neither


def reserved(g: Guard, model: str = "gpt-4o-mini", max_tokens: int | None = None, app: str = "a",
             provider: str = "openai") -> int:
    info = CallInfo(provider, "chat", "/v1/chat/completions", model, max_output_tokens=max_tokens, input_estimate=10)
    decision = g.admit(info, CallAttrs(provider, model, "chat", app, "", "", {}), AT)
    assert not isinstance(decision, Refusal)
    (acct, est), = decision.holds
    acct.reserved.add(est, -1)
    return est.tokens - 10


def test_without_max_tokens_the_estimate_follows_recent_answers_within_bounds():
    g = guard()
    assert reserved(g) == FIRST_CALL_OUTPUT  # no history: not the 128k context window
    g.recent.record(("openai", "gpt-4o-mini", "a"), 3)
    assert reserved(g) == MIN_LIKELY_OUTPUT  # never below the floor
    g.recent.record(("openai", "gpt-4o-mini", "a"), 5000)
    assert reserved(g) == 5000
    assert reserved(g, app="b") == FIRST_CALL_OUTPUT  # history is per app
    assert reserved(g, max_tokens=100) == 100  # max_tokens is the hard bound, whatever was seen
    g.recent.record(("openai", "gpt-4o-mini", "a"), 500_000)
    assert reserved(g) == 128_000 - 10  # never more than the context window leaves


def test_unknown_window_caps_the_estimate_at_default_max_output_tokens():
    price = PriceRule(provider="vllm", model="llama*", input_per_mtok=Decimal("0.1"), output_per_mtok=Decimal("0.2"))
    g = guard(prices=[price], default_max=500)
    assert reserved(g, model="llama-3", provider="vllm") == 500  # the first-call default, capped
    g.recent.record(("vllm", "llama-3", "a"), 300)
    assert reserved(g, model="llama-3", provider="vllm") == 300


def test_recent_output_keeps_the_last_calls_and_a_bounded_number_of_keys():
    r = RecentOutput(size=3, max_keys=2)
    for n in (900, 10, 20, 30):
        r.record(("p", "m", "a"), n)
    assert r.likely(("p", "m", "a")) == 30  # 900 fell out of the last 3
    r.record(("p", "m", "b"), 1)
    r.record(("p", "m", "c"), 2)
    assert r.likely(("p", "m", "a")) is None and r.likely(("p", "m", "c")) == 2


def test_amounts_read_exactly():
    assert exact(Decimal("0.000500000000")) == "0.0005"
    assert exact(Decimal("1.00000E-7")) == "0.0000001"
    assert exact(Decimal("1E+2")) == "100" and exact(Decimal("0E-12")) == "0"
    assert dollars(Decimal("1234.50")) == "$1,234.5" and dollars(Decimal("0.0005")) == "$0.0005"
    assert duration(3 * 3600 + 12 * 60 + 5) == "3h 12m" and duration(45) == "45s" and duration(None) == "never"
