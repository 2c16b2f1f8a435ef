"""Budget admission cost: admit + settle of one call with 1, 100 and 10,000 rules (micro-benchmark, in process)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger.budgets import Budgets, CallAttrs, Refusal, Tally, parse_rule  # noqa: E402

CALL = CallAttrs(provider="openai", model="gpt-4o-mini", operation="chat", app="checkout", user="u1",
                 key="fp_1", tags={"team": "search", "feature": "summarize"})
EST = Tally(Decimal("0.0001"), 1000, 1)
ACTUAL = Tally(Decimal("0.00005"), 600, 1)


def rules(n: int) -> list:
    """One rule that matches the call (per user, by team tag) and n-1 that do not, spread over attributes."""
    out = [parse_rule({"name": "team-search", "match": {"tags": {"team": "search"}}, "per": "user",
                       "window": "day", "limit_usd": 1000}, "bench")]
    kinds = ("user", "app", "key", "tags", "model", "provider")
    for i in range(n - 1):
        kind = kinds[i % len(kinds)]
        match = {"tags": {"team": f"t{i}"}} if kind == "tags" else {kind: f"{kind}-{i}"}
        out.append(parse_rule({"name": f"r{i}", "match": match, "window": "month", "limit_usd": 10}, "bench"))
    return out


def measure(n: int, iterations: int) -> dict[str, float]:
    budgets = Budgets(rules(n))
    at = datetime.now(timezone.utc)
    samples = []
    for _ in range(iterations):
        t = time.perf_counter()
        res = budgets.admit(CALL, at, lambda _: EST)
        assert not isinstance(res, Refusal)
        budgets.settle(res, ACTUAL, at)
        samples.append(time.perf_counter() - t)
    samples.sort()
    return {"rules": n, "p50_us": samples[len(samples) // 2] * 1e6,
            "p99_us": samples[int(len(samples) * 0.99)] * 1e6, "mean_us": statistics.fmean(samples) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    print("| rules | admit+settle p50 | p99 | mean |")
    print("| ---: | ---: | ---: | ---: |")
    for n in (1, 100, 10_000):
        r = measure(n, args.iterations)
        print(f"| {r['rules']:,} | {r['p50_us']:.1f} us | {r['p99_us']:.1f} us | {r['mean_us']:.1f} us |")


if __name__ == "__main__":
    main()
