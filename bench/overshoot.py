"""Budget overshoot: bursts of calls at a block rule, against the real sidecar and the fake provider.

With max_tokens the guard reserves it (a hard bound): settled spend never passes the limit.
Without it the guard reserves what the model produced for the app lately (the largest of its
last 16 answers; 1,024 output tokens before any), so spend can pass the limit by what the
estimates of the calls admitted together missed. Each case says how long the answers are
(the fake sends 4 output tokens a chunk, so `x-fake-chunks` sets it) and how many calls run at
once; `bound` is that many calls times one call's miss (its cost less its reservation).

    python bench/overshoot.py [--calls 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from ledger.pricing import FIRST_CALL_OUTPUT, MIN_LIKELY_OUTPUT, PriceRule, Pricer  # noqa: E402
from tests.fakes import FakeProvider  # noqa: E402
from tests.sidecar_process import Sidecar  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write as much as you can."}]
LLAMA_PRICE = {"provider": "vllm", "model": "llama*", "input_per_mtok": 0.1, "output_per_mtok": 0.2}


@dataclass
class Case:
    name: str
    model: str
    route: str  # the sidecar's upstream: openai (catalogue prices) or local (a config price)
    limit: Decimal
    chunks: int  # answer length in the burst: 4 output tokens a chunk
    workers: int  # calls at once
    max_tokens: int | None = None
    warm_chunks: int | None = None  # a few sequential calls with answers this long before the burst


def cases() -> list[Case]:
    return [
        Case("max_tokens given", "gpt-4o-mini", "openai", Decimal("0.05"), 2000, 32, max_tokens=8000),
        Case("no max_tokens, steady answers, one at a time", "gpt-4o-mini", "openai", Decimal("0.05"), 2000, 1),
        Case("no max_tokens, steady answers, 32 at once after 4 calls", "gpt-4o-mini", "openai", Decimal("0.05"),
             2000, 32, warm_chunks=2000),
        Case("no max_tokens, first burst (no history), 32 at once", "gpt-4o-mini", "openai", Decimal("0.05"),
             2000, 32),
        Case("no max_tokens, answers grow 40x, 32 at once", "gpt-4o-mini", "openai", Decimal("0.05"), 2000, 32,
             warm_chunks=50),
        Case("self-hosted, no window known, 32 at once after 4 calls", "llama-3.1-8b-instruct", "local",
             Decimal("0.02"), 2000, 32, warm_chunks=2000),
    ]


def run(fake: FakeProvider, workdir: Path, case: Case, calls: int) -> dict:
    config = {"upstreams": {"openai": {"base_url": fake.base_url},
                            "local": {"base_url": fake.base_url, "adapter": "openai", "provider": "vllm"}},
              "prices": [LLAMA_PRICE],
              # only the burst counts against the rule; the warm-up (same model, same app) teaches the estimate
              "budgets": [{"name": "cap", "match": {"tags": {"phase": "burst"}}, "window": "day",
                           "limit_usd": str(case.limit)}]}
    sc = Sidecar(workdir, config).start()
    try:
        client = openai.OpenAI(base_url=f"{sc.url}/{case.route}/v1", api_key="k", max_retries=0)
        extra = {} if case.max_tokens is None else {"max_tokens": case.max_tokens}

        def one(chunks: int, phase: str) -> bool:
            try:
                # streamed and paced, so the calls overlap as a burst of real traffic would
                for _ in client.chat.completions.create(
                        model=case.model, messages=MESSAGES, stream=True, **extra,
                        extra_headers={"x-fake-chunks": str(chunks), "x-fake-chunk-delay-ms": "0.1",
                                       "x-meterline-app": "bench", "x-meterline-tags": f"phase={phase}"}):
                    pass
                return True
            except openai.RateLimitError:
                return False

        for _ in range(4 if case.warm_chunks else 0):
            one(case.warm_chunks, "warm")
        with ThreadPoolExecutor(case.workers) as pool:
            passed = sum(pool.map(lambda _: one(case.chunks, "burst"), range(calls)))
        rows = sc.rows("outcome = 'ok' AND tags['phase'] = 'burst'", passed)
        spent = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
        out = rows[0]["output_tokens"] if rows else 0
        return {"case": case, "passed": passed, "refused": calls - passed, "spent": spent,
                "overshoot": max(spent - case.limit, Decimal(0)), "output_tokens": out,
                "bound": case.workers * max(out - assumed_output(case), 0) * output_rate(case)}
    finally:
        sc.stop()


def assumed_output(case: Case) -> int:
    """The output tokens the guard reserves for a burst call (see sidecar/guard.py)."""
    if case.max_tokens is not None:
        return case.max_tokens
    if case.warm_chunks:
        return max(case.warm_chunks * 4, MIN_LIKELY_OUTPUT)
    return FIRST_CALL_OUTPUT


def output_rate(case: Case) -> Decimal:
    provider = "openai" if case.route == "openai" else "vllm"
    rates = Pricer([PriceRule(provider="vllm", model="llama*", input_per_mtok=Decimal("0.1"),
                              output_per_mtok=Decimal("0.2"))]).rates(provider, case.model, datetime.now(timezone.utc))
    assert rates is not None
    return rates.output_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=64, help="calls in each burst (default 64)")
    args = parser.parse_args()
    fake = FakeProvider(chunk_delay_ms=0).start_in_thread()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run(fake, Path(tmp) / str(i), c, args.calls) for i, c in enumerate(cases())]
    finally:
        fake.stop_thread()
    print(f"first-call default: {FIRST_CALL_OUTPUT} output tokens; {args.calls} calls a burst\n")
    print("| case | limit | at once | passed | refused | output tokens/call | settled spend | overshoot | bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        c = r["case"]
        pct = r["overshoot"] / c.limit * 100
        print(f"| {c.name} | ${c.limit} | {c.workers} | {r['passed']} | {r['refused']} | {r['output_tokens']} | "
              f"${r['spent']:.6f} | ${r['overshoot']:.6f} ({pct:.0f}%) | ${r['bound']:.6f} |")


if __name__ == "__main__":
    main()
