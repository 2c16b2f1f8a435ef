"""Measures streamed calls: time to first chunk, and each chunk's one-way delay from the fake's write to the client's read.

The fake writes `t<CLOCK_MONOTONIC ns>` as each chunk's content; this client (on the same machine,
same clock) notes when each chunk arrives, so a chunk's delay through a system is its arrival time
minus its stamp, and the system's per-chunk overhead is that delay minus the same through no system.
"""
from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

import aiohttp

from systems import System

_STAMP = re.compile(rb'"content":\s*"t(\d+)"')


@dataclass
class StreamSample:
    ttfc_ms: float  # request sent -> first content chunk read
    total_ms: float  # request sent -> [DONE] read
    chunks: int
    chunk_delay_us: list[float]  # per content chunk: read time - the fake's write time
    done: bool


@dataclass
class StreamStats:
    system: str
    streams: int
    ttfc_ms_median: float
    total_ms_median: float
    chunk_delay_us_median: float
    chunk_delay_us_p99: float
    chunks_per_stream: float
    complete: int
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


async def one_stream(session: aiohttp.ClientSession, system: System, body: bytes, timeout_s: float) -> StreamSample:
    headers = system.all_headers({"Content-Type": "application/json", "Accept": "text/event-stream"})
    delays: list[float] = []
    first: float | None = None
    done = False
    tail = b""
    start = time.monotonic_ns()
    async with session.post(system.url, data=body, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for data in resp.content.iter_any():
            now = time.monotonic_ns()
            buf = tail + data
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                tail = buf
                continue
            events, tail = buf[:cut], buf[cut + 2:]
            for stamp in _STAMP.findall(events):
                if first is None:
                    first = now
                delays.append((now - int(stamp)) / 1000)
            if b"data: [DONE]" in events:
                done = True
    end = time.monotonic_ns()
    return StreamSample(
        ttfc_ms=((first or end) - start) / 1e6, total_ms=(end - start) / 1e6, chunks=len(delays),
        chunk_delay_us=delays, done=done,
    )


async def measure(system: System, streams: int, timeout_s: float = 60.0) -> StreamStats:
    """`streams` streamed calls, one after another, on one kept-alive connection (after a warm-up call)."""
    assert system.url.startswith("http://127.0.0.1:"), "streams go to loopback only"
    body = system.body(stream=True)
    samples: list[StreamSample] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        for i in range(streams + 1):
            try:
                sample = await one_stream(session, system, body, timeout_s)
            except Exception as e:  # noqa: BLE001 - reported with the results
                errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            if i > 0:  # the first call opens the connection and warms the path
                samples.append(sample)
    delays = [d for s in samples for d in s.chunk_delay_us]
    nan = float("nan")
    return StreamStats(
        system=system.name, streams=len(samples),
        ttfc_ms_median=statistics.median(s.ttfc_ms for s in samples) if samples else nan,
        total_ms_median=statistics.median(s.total_ms for s in samples) if samples else nan,
        chunk_delay_us_median=statistics.median(delays) if delays else nan,
        chunk_delay_us_p99=_percentile(delays, 99) if delays else nan,
        chunks_per_stream=statistics.mean(s.chunks for s in samples) if samples else nan,
        complete=sum(1 for s in samples if s.done), errors=errors,
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def measure_sync(system: System, streams: int) -> StreamStats:
    return asyncio.run(measure(system, streams))
