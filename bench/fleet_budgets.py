"""Budgets on a local Redis (`fleet.redis`) against local budgets: one sidecar each, same run, interleaved rounds.

Both sidecars run the same two block rules (bench/systems.py start_meterline) against the bench's
fake provider; one of them shares its accounts through a redis-server started here. The client
is aiohttp with keep-alive (wrk is not needed): at 1 connection it gives the latency a call adds,
at 16 the throughput. Prints a markdown table and writes bench/results/fleet-budgets-<stamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from tempfile import mkdtemp

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import systems as sysmod  # noqa: E402
from tests.fleet_servers import RedisServer  # noqa: E402


async def drive(url: str, headers: dict[str, str], body: bytes, connections: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            nonlocal failed
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        failed += 1
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "failed": failed, "rps": len(latencies) / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    work = Path(mkdtemp(prefix="meterline-bench-fleet-"))
    redis_server = RedisServer()
    redis_server.start()
    fake = sysmod.start_fake(work, 0.0, 1000, 5, 0.0)
    started = [fake]
    try:
        local = sysmod.start_meterline(work / "local", fake, "local-budgets")
        started.append(local)
        shared = sysmod.start_meterline(work / "redis", fake, "redis-budgets", fleet_redis=redis_server.url)
        started.append(shared)
        body = sysmod.request_body()
        runs: dict[str, dict[str, list[dict[str, float]]]] = {s.name: {"1": [], "n": []} for s in (local, shared)}
        for system in (local, shared):  # warm-up: price catalogue, first leases
            asyncio.run(drive(system.url, system.all_headers(), body, 4, 1.0))
        for _ in range(args.rounds):
            for system in (local, shared):
                runs[system.name]["1"].append(asyncio.run(drive(system.url, system.all_headers(), body, 1,
                                                                args.seconds)))
                runs[system.name]["n"].append(asyncio.run(drive(system.url, system.all_headers(), body,
                                                                args.connections, args.seconds)))
        summary = {}
        for name, r in runs.items():
            summary[name] = {
                "p50_ms_1conn": statistics.median(x["p50_ms"] for x in r["1"]),
                "rps_1conn": statistics.median(x["rps"] for x in r["1"]),
                f"rps_{args.connections}conn": statistics.median(x["rps"] for x in r["n"]),
                f"p50_ms_{args.connections}conn": statistics.median(x["p50_ms"] for x in r["n"]),
                "failed": sum(x["failed"] for x in r["1"] + r["n"]),
            }
        a, b = summary[local.name], summary[shared.name]
        print(f"| budgets | p50 @1 conn | rps @1 conn | rps @{args.connections} conns | p50 @{args.connections} | failed |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, s in summary.items():
            print(f"| {name} | {s['p50_ms_1conn']:.3f} ms | {s['rps_1conn']:.0f} | "
                  f"{s[f'rps_{args.connections}conn']:.0f} | {s[f'p50_ms_{args.connections}conn']:.2f} ms | {s['failed']} |")
        ratio = b[f"rps_{args.connections}conn"] / a[f"rps_{args.connections}conn"]
        delta = b["p50_ms_1conn"] - a["p50_ms_1conn"]
        print(f"\nredis/local throughput at {args.connections} connections: {ratio:.2f}x; "
              f"p50 at 1 connection: {delta:+.3f} ms (target: >= 0.9x, <= +0.1 ms)")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = BENCH / "results" / f"fleet-budgets-{stamp}.json"
        out.write_text(json.dumps({"summary": summary, "runs": runs, "rounds": args.rounds,
                                   "seconds": args.seconds, "ratio": ratio, "p50_delta_ms": delta}, indent=2))
        print(f"wrote {out.relative_to(BENCH.parent)}")
    finally:
        for system in reversed(started):
            system.service.stop()
        redis_server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
