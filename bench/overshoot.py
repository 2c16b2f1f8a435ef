"""Budget overshoot without max_tokens: concurrent calls at a block rule, against the real sidecar and the fake provider.

Two cases. A catalogue model (gpt-4o-mini): with no max_tokens the guard reserves what the
context window leaves, so output cannot overshoot. A self-hosted model with a config price and no
known context window: the guard reserves `default_max_output_tokens`, and a response longer than
that overshoots; the fake makes 4 output tokens a chunk, so `x-fake-chunks` sets the length.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from tests.fakes import FakeProvider  # noqa: E402
from tests.sidecar_process import Sidecar  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write as much as you can."}]


def run(fake: FakeProvider, workdir: Path, route: str, model: str, limit: Decimal, chunks: int, calls: int,
        extra: dict) -> dict:
    config = {"upstreams": {"openai": {"base_url": fake.base_url},
                            "local": {"base_url": fake.base_url, "adapter": "openai", "provider": "vllm"}},
              "budgets": [{"name": "cap", "window": "day", "limit_usd": str(limit)}], **extra}
    sc = Sidecar(workdir, config).start()
    try:
        client = openai.OpenAI(base_url=f"{sc.url}/{route}/v1", api_key="k", max_retries=0)

        def one(_: int) -> bool:
            try:
                # streamed and paced, so the calls overlap as a burst of real traffic would
                for _ in client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                                        extra_headers={"x-fake-chunks": str(chunks),
                                                                       "x-fake-chunk-delay-ms": "0.1"}):
                    pass
                return True
            except openai.RateLimitError:
                return False

        with ThreadPoolExecutor(32) as pool:
            passed = sum(pool.map(one, range(calls)))
        rows = sc.rows("outcome = 'ok'", passed)
        spent = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
        return {"model": model, "limit": limit, "passed": passed, "refused": calls - passed, "spent": spent,
                "overshoot": max(spent - limit, Decimal(0)),
                "output_tokens": rows[0]["output_tokens"] if rows else None}
    finally:
        sc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=64)
    args = parser.parse_args()
    fake = FakeProvider(chunk_delay_ms=0).start_in_thread()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [
                run(fake, Path(tmp) / "a", "openai", "gpt-4o-mini", Decimal("0.25"), 2000, args.calls, {}),
                run(fake, Path(tmp) / "b", "local", "llama-3.1-8b-instruct", Decimal("0.02"), 10_000, args.calls,
                    {"prices": [{"provider": "vllm", "model": "llama*", "input_per_mtok": 0.1,
                                 "output_per_mtok": 0.2}]}),
            ]
    finally:
        fake.stop_thread()
    print("| model | limit | calls passed | refused | output tokens/call | settled spend | overshoot |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        pct = r["overshoot"] / r["limit"] * 100
        print(f"| {r['model']} | ${r['limit']} | {r['passed']} | {r['refused']} | {r['output_tokens']} | "
              f"${r['spent']:.6f} | ${r['overshoot']:.6f} ({pct:.1f}%) |")


if __name__ == "__main__":
    main()
