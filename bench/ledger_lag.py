"""Ledger lag: how long after a call ends its row can be read through /_meterline/sql, under paced background load.

A paced client sends calls at a fixed rate (bounded in count and time, at most `max_in_flight` at
once); every `probe_every`-th call carries `x-meterline-tags: probe=<n>`. When a probe's response
has been read, its end time is noted; a poller asks the sidecar's SQL endpoint every
`poll_interval_s` which outstanding probes it can see. A probe's lag is the time the answer that
first showed it arrived minus its end: an upper bound, coarse by up to one poll interval.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import aiohttp

from systems import System, request_body


@dataclass
class LagResult:
    target_rate: float
    achieved_rate: float
    calls: int
    failed: int
    probes: int
    probes_seen: int
    lag_ms_p50: float
    lag_ms_p99: float
    lag_ms_max: float
    poll_interval_ms: float
    health_last_lag_ms_max: float
    pending_max: int
    backlog_bytes_max: int = 0  # the sinks process's unread journal bytes (healthz sinks.backlog_bytes)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Probes:
    def __init__(self) -> None:
        self.ended: dict[int, float] = {}  # probe -> wall-clock end of its call
        self.lag: dict[int, float] = {}  # probe -> seconds until it was visible


async def run(system: System, admin_base: str, rate: float, duration_s: float, probe_every: int = 50,
              poll_interval_s: float = 0.02, max_in_flight: int = 64, settle_timeout_s: float = 10.0) -> LagResult:
    assert system.url.startswith("http://127.0.0.1:") and admin_base.startswith("http://127.0.0.1:")
    body = request_body()
    probes = _Probes()
    errors: list[str] = []
    counts = {"done": 0, "failed": 0}
    health = {"lag_max": 0.0, "pending_max": 0, "backlog_max": 0}
    since = (datetime.now(timezone.utc) - timedelta(seconds=5)).isoformat()
    sending_done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=max_in_flight, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call(n: int, slot: asyncio.Semaphore) -> None:
            probe = n % probe_every == 0
            tags = f"team=bench,probe={n}" if probe else "team=bench,feature=lag"
            headers = system.all_headers({"Content-Type": "application/json", "x-meterline-tags": tags})
            try:
                async with session.post(system.url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
                if ok:
                    counts["done"] += 1
                    if probe:
                        probes.ended[n] = time.time()
                else:
                    counts["failed"] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                counts["failed"] += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
            finally:
                slot.release()

        async def send() -> float:
            loop = asyncio.get_running_loop()
            slot = asyncio.Semaphore(max_in_flight)
            tasks: set[asyncio.Task[None]] = set()
            total = int(rate * duration_s)
            start = loop.time()
            for n in range(total):
                wait = start + n / rate - loop.time()
                if wait > 0.0005:
                    await asyncio.sleep(wait)
                if loop.time() - start > duration_s * 2:
                    break  # far behind the pace: stop rather than overrun the time bound
                await slot.acquire()
                task = asyncio.create_task(call(n, slot))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            elapsed = loop.time() - start
            sending_done.set()
            return elapsed

        async def poll() -> None:
            deadline = None
            while True:
                if sending_done.is_set():
                    deadline = deadline or time.monotonic() + settle_timeout_s
                    if len(probes.lag) >= len(probes.ended) or time.monotonic() > deadline:
                        return
                outstanding = [n for n in probes.ended if n not in probes.lag]
                if outstanding:
                    ids = ",".join(f"'{n}'" for n in outstanding[:500])
                    query = (f"SELECT tags['probe'] FROM calls WHERE started_at >= TIMESTAMPTZ '{since}' "
                             f"AND tags['probe'] IN ({ids})")
                    try:
                        async with session.post(f"{admin_base}/_meterline/sql", data=query.encode(),
                                                headers={"Content-Type": "text/plain"}) as resp:
                            doc = await resp.json(content_type=None)
                        now = time.time()
                        for (seen,) in doc.get("rows", []):
                            n = int(seen)
                            if n in probes.ended and n not in probes.lag:
                                probes.lag[n] = now - probes.ended[n]
                    except Exception as e:  # noqa: BLE001
                        if len(errors) < 5:
                            errors.append(f"poll: {type(e).__name__}: {e}"[:200])
                await asyncio.sleep(poll_interval_s)

        async def watch_health() -> None:
            while not sending_done.is_set():
                try:
                    async with session.get(f"{admin_base}/_meterline/healthz") as resp:
                        doc = await resp.json(content_type=None)
                    ledger = doc.get("ledger", {})
                    health["lag_max"] = max(health["lag_max"], float(ledger.get("last_lag_s", 0)))
                    health["pending_max"] = max(health["pending_max"], int(ledger.get("pending", 0)))
                    backlog = int((doc.get("sinks") or {}).get("backlog_bytes") or 0)
                    health["backlog_max"] = max(health["backlog_max"], backlog)
                except Exception:  # noqa: BLE001 - health is a side channel here
                    pass
                await asyncio.sleep(0.25)

        elapsed, _, _ = await asyncio.gather(send(), poll(), watch_health())

    lags_ms = sorted(v * 1000 for v in probes.lag.values())
    nan = float("nan")
    return LagResult(
        target_rate=rate, achieved_rate=counts["done"] / elapsed if elapsed else 0.0,
        calls=counts["done"], failed=counts["failed"], probes=len(probes.ended), probes_seen=len(lags_ms),
        lag_ms_p50=statistics.median(lags_ms) if lags_ms else nan,
        lag_ms_p99=lags_ms[min(len(lags_ms) - 1, int(len(lags_ms) * 0.99))] if lags_ms else nan,
        lag_ms_max=lags_ms[-1] if lags_ms else nan, poll_interval_ms=poll_interval_s * 1000,
        health_last_lag_ms_max=health["lag_max"] * 1000, pending_max=health["pending_max"],
        backlog_bytes_max=health["backlog_max"], errors=errors,
    )


def run_sync(system: System, admin_base: str, rate: float, duration_s: float, **kwargs: float) -> LagResult:
    try:
        import uvloop

        return uvloop.run(run(system, admin_base, rate, duration_s, **kwargs))
    except ImportError:
        return asyncio.run(run(system, admin_base, rate, duration_s, **kwargs))
