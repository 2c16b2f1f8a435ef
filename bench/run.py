"""The benchmark harness's one entry point: runs every measurement in one interleaved run and writes bench/results/<date>.{md,json,png}.

    .venv/bin/python bench/run.py [--quick] [--no-peers] [--rounds N] [--c1-seconds S] ...

See bench/README.md for what it measures and how.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ledger_lag  # noqa: E402
import load  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import stream_client  # noqa: E402
import systems as sysmod  # noqa: E402
from procs import (ForeignCpu, StartFailed, TreeSample, child_pids, pss_mib, rss_split_mib,  # noqa: E402
                   sample_tree)
from systems import System  # noqa: E402

BENCH = Path(__file__).resolve().parent


@dataclass
class Plan:
    """Every knob of a run; --quick picks short values, and each can be set on its own."""

    mode: str
    rounds: int
    c1_s: float
    c32_s: float
    c128_s: float
    warmup_s: float
    streams: int
    memory_calls: int
    rest_s: float
    lag_rate: float
    lag_s: float
    lag_probe_every: int
    wrk_threads: int
    peers: bool
    chart: bool
    delay_ms: float
    body_bytes: int
    chunks: int
    chunk_interval_ms: float
    systems: tuple[str, ...]  # which systems besides direct run (--systems); peers also need --no-peers off


# Five rounds of five streams: on a 2-core VM a single round's throughput ratio swings by a third,
# and three rounds' medians still did (0.68x to 0.98x from run to run).
FULL = dict(rounds=5, c1_s=4, c32_s=6, c128_s=6, warmup_s=2, streams=5, memory_calls=100_000, rest_s=60,
            lag_rate=1000, lag_s=20)
QUICK = dict(rounds=2, c1_s=1, c32_s=2, c128_s=2, warmup_s=1, streams=1, memory_calls=5_000, rest_s=5,
             lag_rate=1000, lag_s=5)


# every system the harness can start besides direct (the fake itself), in start order
SYSTEMS = ("bare", "meterline", "meterline-w2", "meterline-redis", "meterline-route", "meterline-fallback",
           "litellm", "portkey")


def _systems(text: str | None) -> tuple[str, ...]:
    if not text:
        return SYSTEMS
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "direct")
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"bench: --systems: unknown {', '.join(unknown)} (known: direct, {', '.join(SYSTEMS)})")
    return tuple(n for n in SYSTEMS if n in names)


def parse_args(argv: list[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (seconds per load, few calls)")
    p.add_argument("--no-peers", action="store_true", help="skip LiteLLM and Portkey")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG (and the matplotlib install)")
    p.add_argument("--systems", help="comma-separated systems to run besides direct (default: all of "
                   + ", ".join(SYSTEMS) + "); e.g. bare,meterline,meterline-redis for the fleet budgets rows")
    p.add_argument("--rounds", type=int)
    p.add_argument("--c1-seconds", type=float, dest="c1_s")
    p.add_argument("--c32-seconds", type=float, dest="c32_s")
    p.add_argument("--c128-seconds", type=float, dest="c128_s")
    p.add_argument("--warmup-seconds", type=float, dest="warmup_s")
    p.add_argument("--streams", type=int, help="streamed calls per system per round")
    p.add_argument("--memory-calls", type=int, dest="memory_calls")
    p.add_argument("--rest-seconds", type=float, dest="rest_s")
    p.add_argument("--lag-rate", type=float, dest="lag_rate", help="calls/s of background load for ledger lag")
    p.add_argument("--lag-seconds", type=float, dest="lag_s")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk -t for every run (default 1: 2 cores)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="the fake's delay before answering")
    p.add_argument("--body-bytes", type=int, default=600, help="the fake's JSON message length")
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--chunk-interval-ms", type=float, default=20.0)
    p.add_argument("--out", default=str(BENCH / "results"), help="directory for the .md/.json/.png")
    p.add_argument("--keep-tmp", action="store_true", help="keep the scratch directory (ledgers, logs)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    knobs = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    plan = Plan(mode="quick" if args.quick else "full", lag_probe_every=50, wrk_threads=args.wrk_threads,
                peers=not args.no_peers, chart=not args.no_chart, delay_ms=args.delay_ms,
                body_bytes=args.body_bytes, chunks=args.chunks, chunk_interval_ms=args.chunk_interval_ms,
                systems=_systems(args.systems), **knobs)
    return plan, args


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def http_json(url: str, body: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _flushed(health: dict[str, Any]) -> bool:
    """The sinks process has read every journal (backlog 0), holds no call it saw start but not end,
    and has written what it read (pending 0)."""
    sinks = health.get("sinks") or {}
    return health["ledger"].get("pending") == 0 and not sinks.get("backlog_bytes") and not sinks.get("open_calls")


def _wait_health(system: System, done: Any, timeout_s: float) -> tuple[dict[str, Any], bool]:
    """Polls healthz every 0.1 s until `done(health)` holds on two polls in a row (the sinks process
    reads the journals every 50 ms: one poll can fall between a line's write and its read), bounded."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while True:
        health = http_json(f"{sysmod.meterline_base(system)}/_meterline/healthz")
        streak = streak + 1 if done(health) else 0
        if streak >= 2:
            return health, True
        if time.monotonic() > deadline:
            return health, False
        time.sleep(0.1)


def wait_ledger_flushed(system: System, timeout_s: float = 60.0) -> dict[str, Any]:
    """Polls healthz until the journals are read and nothing is pending in the ledger writer (bounded)."""
    return _wait_health(system, _flushed, timeout_s)[0]


def _quiet(health: dict[str, Any]) -> bool:
    return _flushed(health) and not (health.get("telemetry") or {}).get("spans_queued")


def wait_quiet(system: System, timeout_s: float = 60.0) -> bool:
    """Polls healthz until neither the journals, the ledger writer nor the span exporter has anything
    queued (bounded); False if that did not happen in time."""
    return _wait_health(system, _quiet, timeout_s)[1]


def tree_sample(system: System) -> TreeSample:
    """CPU and RSS of the system's whole process tree; for meterline split into supervisor, forwarder(s)
    and sinks process (the sinks pid from healthz), plus the servers only it uses (meterline-redis's
    redis-server, as role "redis")."""
    return sample_tree(system.service.pid, sysmod.sinks_pid(system), system.companions())


def bench_pids(systems: list[System]) -> list[int]:
    """The roots of every server process the benchmark started for `systems` (for ForeignCpu)."""
    return [s.service.pid for s in systems] + [pid for s in systems for pid in s.companions().values()]


def duckdb_memory_mib(system: System) -> float:
    """What DuckDB's own buffer manager holds (duckdb_memory()), asked through the SQL endpoint."""
    try:
        doc = http_json(f"{sysmod.meterline_base(system)}/_meterline/sql",
                        b"SELECT sum(memory_usage_bytes) / 1048576.0 FROM duckdb_memory()")
        return float(doc["rows"][0][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return float("nan")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": f"Python {platform.python_version()}",
            "wrk": (wrk[0].split(" Copyright")[0] if wrk else "wrk ?")}


# --- phases ----------------------------------------------------------------------------------------


def start_systems(plan: Plan, work: Path, results: dict[str, Any]) -> tuple[System, list[System]]:
    fake = sysmod.start_fake(work, plan.delay_ms, plan.body_bytes, plan.chunks, plan.chunk_interval_ms)
    started = [fake]
    results["systems"]["direct"] = {"status": "ok", "describe": "the fake provider itself, bench/fake_upstream.py"}
    starters = [
        ("bare", lambda: sysmod.start_bare(work, fake), "aiohttp, no metering, bench/bare_forwarder.py"),
        ("meterline", lambda: sysmod.start_meterline(work / "main", fake), "`meterline serve`, fresh ledger"),
        ("meterline-w2", lambda: sysmod.start_meterline(work / "w2", fake, "meterline-w2", workers=2),
         "`meterline serve --workers 2`, fresh ledger, no budget rules: refused with more than one worker"),
        ("meterline-redis", lambda: sysmod.start_meterline_redis(work / "redis", fake),
         "meterline with its two budget rules shared through `fleet.redis` on a redis-server of the bench's own "
         f"(redis-server {_redis_version()}), fresh ledger"),
        ("meterline-route", lambda: sysmod.start_meterline_route(work / "route", fake),
         f"meterline called with `model: {sysmod.ROUTE}`, a route of one target (the fake's {sysmod.MODEL})"),
        ("meterline-fallback", lambda: sysmod.start_meterline_fallback(work / "fallback", fake),
         f"meterline called with `model: {sysmod.FALLBACK_ROUTE}`: every call's first try gets a 503 (the fake's "
         "`/fail/503` path), the second goes to the fake's gpt-4o-mini"),
    ]
    starters = [s for s in starters if s[0] in plan.systems]
    if plan.peers:
        for install, name, start in ((peers.install_litellm, "litellm", sysmod.start_litellm),
                                     (peers.install_portkey, "portkey", sysmod.start_portkey)):
            if name not in plan.systems:
                results["peers"][name] = "skipped (--systems)"
                continue
            log(f"installing {name} in bench/.envs/{name} (reused when already there)")
            got = install()
            if got.ok:
                results["peers"][name] = f"installed {got.version}"
                starters.append((name, (lambda s=start, g=got: s(work, fake, g.detail, g.version)),
                                 f"{name} {got.version}, one worker" if name == "litellm"
                                 else f"@portkey-ai/gateway {got.version} on node {_node_version()}"))
            else:
                results["peers"][name] = f"not installable: {got.detail}"
                results["systems"][name] = {"status": f"not installable: {got.detail}"}
    else:
        results["peers"] = {"litellm": "skipped (--no-peers)", "portkey": "skipped (--no-peers)"}
    for name, start, describe in starters:
        log(f"starting {name}")
        try:
            system = start()
        except StartFailed as e:
            results["systems"][name] = {"status": f"did not start: {e}"}
            continue
        problem = sysmod.verify(system, plan.chunks)
        if problem:
            results["systems"][name] = {"status": f"failed verification: {problem}", "describe": describe}
            system.stop()
            continue
        results["systems"][name] = {"status": "ok", "describe": describe}
        started.append(system)
    problem = sysmod.verify(fake, plan.chunks)
    if problem:
        raise RuntimeError(f"the fake provider does not answer as it should: {problem}")
    return fake, started


def _redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.split(" v=", 1)[1].split()[0] if " v=" in out else out.strip()[:40]
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _node_version() -> str:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def interleaved_rounds(plan: Plan, systems: list[System], body_file: Path, results: dict[str, Any]) -> None:
    for system in systems:
        log(f"warm-up {system.name}")
        try:
            load.run_wrk(system, body_file, 32, plan.warmup_s, plan.wrk_threads)
        except load.WrkFailed as e:
            log(f"warm-up of {system.name} failed: {e}")
    loads = ((1, plan.c1_s), (32, plan.c32_s), (128, plan.c128_s))
    for rnd in range(plan.rounds):
        order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
        log(f"round {rnd + 1}/{plan.rounds}: order {', '.join(s.name for s in order)}")
        foreign = ForeignCpu(bench_pids(systems))
        for connections, seconds in loads:
            for system in order:
                before = tree_sample(system)
                try:
                    res = load.run_wrk(system, body_file, connections, seconds, plan.wrk_threads)
                except load.WrkFailed as e:
                    results["errors"].append(f"round {rnd + 1} {system.name} c{connections}: {e}")
                    continue
                quiet = True
                if sysmod.is_meterline(system):
                    # the sinks process writes these calls' rows and exports their spans up to a second
                    # after the calls: wait for it, so that CPU counts for these calls and does not
                    # land on the next system's run
                    quiet = wait_quiet(system, 30.0)
                    if not quiet:
                        results["notes"].append(f"round {rnd + 1} {system.name} c{connections}: the sinks process "
                                                "had not caught up 30 s after the run; its CPU per call is short")
                after = tree_sample(system)
                # CPU per call of the whole process tree (all processes and threads): steadier than req/s
                # when others load the machine; for meterline also per role
                n = max(1, res.requests)
                cpu = after.cpu_since(before)
                roles = {role: v * 1000 / n for role, v in cpu.items() if role != "total"}
                results["load"].append({"round": rnd + 1, **res.to_dict(), "cpu_ms_per_call": cpu["total"] * 1000 / n,
                                        "cpu_ms_per_call_roles": roles, "rss_mib": after.rss_mib["total"],
                                        "rss_mib_roles": {r: v for r, v in after.rss_mib.items() if r != "total"},
                                        "processes": {r: len(p) for r, p in after.pids.items()}, "quiet": quiet})
                split = (f" (fwd {roles.get('forwarder', 0):.3f} sinks {roles.get('sinks', 0):.3f})"
                         if "sinks" in roles else "")
                log(f"  {system.name:12s} c{connections:<3d} {res.ok_rps:8.0f} req/s  p50 {res.p50_ms:7.3f} ms  "
                    f"p99 {res.p99_ms:7.3f} ms  cpu {cpu['total'] * 1000 / n:6.3f} ms/call{split}  "
                    f"errors {sum(res.errors.values())}")
                load.settle()
        for system in order:
            if sysmod.is_meterline(system):
                # streams measure a quiet system: the loads just before leave up to a second of
                # ledger and span backlog on meterline's other threads, which other systems do not have
                wait_quiet(system)
                load.settle()
            stats = stream_client.measure_sync(system, plan.streams)
            results["streams"].append({"round": rnd + 1, **stats.to_dict()})
            log(f"  {system.name:12s} stream  TTFC {stats.ttfc_ms_median:7.3f} ms  chunk delay "
                f"{stats.chunk_delay_us_median:7.1f} us  chunks {stats.chunks_per_stream:.0f}  "
                f"errors {len(stats.errors)}")
        cores = foreign.cores()
        results["foreign_cpu"].append({"phase": f"round {rnd + 1}", "cores": round(cores, 3)})
        log(f"  other processes on the machine used {cores:.2f} cores during round {rnd + 1}")


def forwarder_anomalies(system: System, forwarders: int, tries: int = 40) -> dict[str, Any]:
    """Each forwarder's anomaly counts, by pid: healthz is answered by whichever forwarder the kernel
    gives the connection (SO_REUSEPORT), so it is asked on fresh connections until every one answered."""
    seen: dict[str, Any] = {}
    for _ in range(tries):
        health = http_json(f"{sysmod.meterline_base(system)}/_meterline/healthz")
        seen[str(health["forwarder"]["pid"])] = health["anomalies"]
        if len(seen) >= forwarders:
            break
    return seen


def ledger_check(meterline: System, results: dict[str, Any], key: str = "ledger_check") -> None:
    """Did meterline meter what it forwarded? Rows, costs and anomalies after the rounds, in results[key]."""
    health, _ = _wait_health(meterline, _quiet, 60.0)  # rows written and their spans exported
    doc = http_json(f"{sysmod.meterline_base(meterline)}/_meterline/sql",
                    b"SELECT count(*), count(cost_usd), count(*) FILTER (WHERE outcome = 'ok'), "
                    b"sum(input_tokens), sum(cost_usd)::VARCHAR, count(*) FILTER (WHERE stream), "
                    b"median(overhead_ms), quantile_cont(overhead_ms, 0.99) FROM calls")
    rows, priced, ok, tokens, cost, streamed, overhead_p50, overhead_p99 = doc["rows"][0]
    # JSON may carry big integers and decimals as strings
    rows, priced, ok, tokens, streamed = (int(float(v or 0)) for v in (rows, priced, ok, tokens, streamed))
    overhead_p50, overhead_p99 = (float(v) if v is not None else float("nan") for v in (overhead_p50, overhead_p99))
    sent = sum(r["requests"] for r in results["load"] if r["system"] == meterline.name)
    streams = sum(s["streams"] + 1 for s in results["streams"] if s["system"] == meterline.name)
    warmup_note = "plus the warm-up and verification calls"
    forwarders = len(tree_sample(meterline).pids.get("forwarder", [])) or 1
    by_forwarder = forwarder_anomalies(meterline, forwarders)
    anomalies = ("; ".join(f"forwarder {pid}: {a or 'none'}" for pid, a in by_forwarder.items())
                 if forwarders > 1 else (health["anomalies"] or "none"))
    text = (f"After the rounds {meterline.name}'s ledger held {rows:,} rows ({ok:,} outcome ok, {priced:,} priced, "
            f"{streamed:,} streamed; {tokens:,} input tokens, ${cost or '0'}) for {sent:,} wrk responses and "
            f"{streams} streams counted by the clients ({warmup_note}; calls cut off when a wrk run ends are "
            f"recorded as cancelled). overhead_ms as meterline records it: median {overhead_p50:.3f} ms, "
            f"p99 {overhead_p99:.3f} ms. Healthz: written {health['ledger']['written']:,}, pending "
            f"{health['ledger']['pending']}, write failures {health['ledger']['write_failures']}, anomalies "
            f"{anomalies}. {_span_text(health['telemetry'] or {})}")
    extra: dict[str, Any] = {}
    if meterline.attempts:
        extra = route_check(meterline)
        text += " " + extra["route_text"]
    if meterline.redis is not None:
        fleet = (health.get("fleet") or {}).get("redis")
        extra = {"fleet_redis": fleet}
        text += f" Fleet budgets on Redis (healthz fleet.redis): {json.dumps(fleet, default=str)[:400]}."
    results[key] = {"rows": rows, "priced": priced, "ok": ok, "streamed": streamed, "wrk_responses": sent,
                    "overhead_ms_p50": overhead_p50, "overhead_ms_p99": overhead_p99,
                    "anomalies_by_forwarder": by_forwarder, "health": health, **extra, "text": text}
    log(text)


def route_check(system: System) -> dict[str, Any]:
    """Did every call of a route row go as planned? Calls through the route, those with the expected number
    of tries, and the attempts table's rows by outcome (a fallback row's first tries are 503s)."""
    doc = http_json(f"{sysmod.meterline_base(system)}/_meterline/sql",
                    (f"SELECT count(*) FILTER (WHERE route = '{system.model}'), "
                     f"count(*) FILTER (WHERE route = '{system.model}' AND attempts = {system.attempts}), "
                     "(SELECT count(*) FROM attempts), "
                     "(SELECT count(*) FROM attempts WHERE status_code = 503) FROM calls").encode())
    routed, planned, tries, failed = (int(float(v or 0)) for v in doc["rows"][0])
    text = (f"Route `{system.model}`: {routed:,} calls through it, {planned:,} of them with {system.attempts} "
            f"attempt{'s' if system.attempts > 1 else ''}; the attempts table holds {tries:,} tries, {failed:,} of "
            "them answered 503.")
    return {"routed": routed, "planned_attempts": planned, "attempt_rows": tries, "attempts_503": failed,
            "route_text": text}


def route_cpu_in_process(results: dict[str, Any], calls: int = 20_000) -> None:
    """bench/route_cpu.py's isolate (a one-target route's own code, in one process, no I/O), as a reference
    for the route row's whole-process number."""
    done = subprocess.run([sys.executable, "-m", "bench.route_cpu", "--calls", str(calls)], cwd=BENCH.parent,
                          env={**os.environ, "PYTHONPATH": str(BENCH.parent)}, capture_output=True, text=True,
                          timeout=300)
    found = re.search(r"adds ([0-9.]+) us", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"bench/route_cpu.py: exit {done.returncode}: {(done.stderr or done.stdout)[-300:]}")
    results["route_cpu"] = {"us_per_call": float(found.group(1)), "calls": calls}
    log(f"route CPU in-process: {found.group(1)} us per call ({calls:,} calls)")


def _span_text(telemetry: dict[str, Any]) -> str:
    # spans are shed, not queued without bound, when the exporter falls behind: a run must show it
    if not telemetry:
        return "Spans: no telemetry in healthz (the sinks process did not answer)."
    return (f"Spans: exported {telemetry['spans_exported']:,}, still queued {telemetry['spans_queued']:,}, dropped "
            f"{telemetry['spans_dropped']:,} ({telemetry['spans_dropped_queue_full']:,} with the queue full, "
            f"{telemetry['spans_dropped_export']:,} in failed exports).")


class RssSampler:
    """Samples the RSS of a process tree (meterline's supervisor, forwarder(s) and sinks process) once a
    second into a timeline, on a thread, until stopped."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.root = system.service.pid
        self.sinks = sysmod.sinks_pid(system)
        self.start = time.monotonic()
        self.timeline: list[tuple[float, float]] = []  # (s, whole tree MiB)
        self.roles: list[tuple[float, dict[str, float]]] = []  # (s, {role: MiB})
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(1.0)

    def tree(self) -> TreeSample:
        if self.sinks is not None and self.sinks not in child_pids(self.root):  # restarted: ask again
            self.sinks = sysmod.sinks_pid(self.system)
        return sample_tree(self.root, self.sinks)

    def sample(self) -> TreeSample:
        got = self.tree()
        t = round(time.monotonic() - self.start, 2)
        self.timeline.append((t, round(got.rss_mib["total"] or float("nan"), 2)))
        self.roles.append((t, {r: round(v, 2) for r, v in got.rss_mib.items() if r != "total"}))
        return got

    def point(self, memory: dict[str, Any], name: str) -> float:
        """Samples now and notes the tree's RSS, its anonymous / file-backed split, its PSS (shared pages
        counted once) and the RSS of each role under `name`."""
        got = self.sample()
        pids = [p for ps in got.pids.values() for p in ps]
        splits = [rss_split_mib(p) for p in pids]
        mib = memory[f"{name}_mib"] = got.rss_mib["total"] or float("nan")
        memory[f"{name}_anon_mib"] = sum(a for a, _ in splits)
        memory[f"{name}_file_mib"] = sum(f for _, f in splits)
        memory[f"{name}_pss_mib"] = sum(pss_mib(p) for p in pids)
        memory[f"{name}_roles_mib"] = {r: v for r, v in got.rss_mib.items() if r != "total"}
        return mib

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)


def memory_and_lag(plan: Plan, fake: System, work: Path, body_file: Path, results: dict[str, Any]) -> None:
    meterline = sysmod.start_meterline(work / "memory", fake)
    try:
        time.sleep(2)
        pid = meterline.service.pid
        memory: dict[str, Any] = {"calls": 0}
        foreign = ForeignCpu([pid, fake.service.pid])
        with RssSampler(meterline) as rss:
            rss.point(memory, "idle")
            warm = min(1000, plan.memory_calls)
            bound = max(60.0, plan.memory_calls / 200)  # time bound: at least 200 calls/s or it stops
            first = load.run_wrk(meterline, body_file, 32, bound, plan.wrk_threads, max_requests=warm)
            memory["warm_calls"] = first.requests
            rss.point(memory, "warm")
            rest_calls = plan.memory_calls - first.requests
            second = load.run_wrk(meterline, body_file, 32, bound, plan.wrk_threads, max_requests=rest_calls) \
                if rest_calls > 0 else first
            memory["calls"] = first.requests + (second.requests if second is not first else 0)
            memory["rps"] = second.ok_rps
            rss.point(memory, "after")
            health = wait_ledger_flushed(meterline)
            rss.point(memory, "flushed")
            memory["duckdb_mib"] = duckdb_memory_mib(meterline)
            memory["ledger_written"] = health["ledger"]["written"]
            log(f"memory: idle {memory['idle_mib']:.1f} MiB, after {memory['calls']:,} calls "
                f"{memory['after_mib']:.1f} MiB; resting {plan.rest_s:g} s")
            time.sleep(plan.rest_s)
            rss.point(memory, "rested")
        results["foreign_cpu"].append({"phase": "memory", "cores": round(foreign.cores(), 3)})
        memory["growth_mib"] = memory["after_mib"] - memory["idle_mib"]
        memory["timeline"] = rss.timeline
        memory["timeline_roles"] = rss.roles
        results["memory"] = memory
        log(f"memory: rested {memory['rested_mib']:.1f} MiB; growth {memory['growth_mib']:+.1f} MiB")
        log(f"ledger lag: {plan.lag_rate:g} calls/s for {plan.lag_s:g} s")
        foreign = ForeignCpu([pid, fake.service.pid])
        lag = ledger_lag.run_sync(meterline, sysmod.meterline_base(meterline), plan.lag_rate, plan.lag_s,
                                  probe_every=plan.lag_probe_every)
        results["lag"] = lag.to_dict()
        results["foreign_cpu"].append({"phase": "ledger lag", "cores": round(foreign.cores(), 3)})
        log(f"ledger lag: p50 {lag.lag_ms_p50:.0f} ms p99 {lag.lag_ms_p99:.0f} ms max {lag.lag_ms_max:.0f} ms "
            f"at {lag.achieved_rate:.0f} calls/s ({lag.probes_seen}/{lag.probes} probes seen)")
    finally:
        meterline.service.stop()


# --- output --------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN becomes null in the JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_outputs(plan: Plan, results: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = report.summarize(results)
    results["summary"] = summary
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(_clean(results), indent=1, default=str) + "\n")
    chart: Path | None = None
    if plan.chart:
        got = peers.install_matplotlib()
        if got.ok:
            png = out_dir / f"{stamp}.png"
            done = subprocess.run([got.detail, str(BENCH / "chart.py"), str(json_path), str(png)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                chart = png
            else:
                results["notes"].append(f"chart failed: {done.stderr.strip()[-300:]}")
        else:
            results["notes"].append(f"no chart: matplotlib not installable: {got.detail}")
    md_path = out_dir / f"{stamp}.md"
    md_path.write_text(report.markdown(results, summary, chart.name if chart else None))
    json_path.write_text(json.dumps(_clean(results), indent=1, default=str) + "\n")
    return md_path, chart


# the results key of each added system's metering check
CHECKED = {"meterline-redis": "ledger_check_redis", "meterline-route": "ledger_check_route",
           "meterline-fallback": "ledger_check_fallback"}


class _NothingToMeasure(Exception):
    pass


def phase(name: str, results: dict[str, Any], run: Any) -> None:
    """Runs one phase; a failure is recorded and the run goes on to write what it has."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - reported in the results, never lost with the rest
        results["errors"].append(f"{name} failed: {type(e).__name__}: {e}")
        log(f"{name} failed: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    plan, args = parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    started = datetime.now()
    stamp = started.strftime("%Y-%m-%d-%H%M%S") + ("-quick" if plan.mode == "quick" else "")
    work = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
    results: dict[str, Any] = {
        "meta": {"started": started.strftime("%Y-%m-%d %H:%M:%S"), "mode": plan.mode,
                 "command": " ".join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
                 **machine()},
        "plan": asdict(plan), "systems": {}, "peers": {}, "load": [], "streams": [], "memory": {}, "lag": {},
        "ledger_check": {}, "ledger_check_w2": {}, **{key: {} for key in CHECKED.values()},
        "route_cpu": {}, "errors": [], "notes": [], "foreign_cpu": [],
    }
    body_file = work / "body.json"
    body_file.write_bytes(sysmod.request_body())
    running: list[System] = []
    try:
        try:
            fake, running = start_systems(plan, work, results)
        except Exception as e:  # noqa: BLE001 - nothing to measure without the fake; still write the report
            results["errors"].append(f"start-up failed: {type(e).__name__}: {e}")
            raise _NothingToMeasure from e
        log("systems: " + ", ".join(s.name for s in running))
        meterline = next((s for s in running if s.name == "meterline"), None)
        w2 = next((s for s in running if s.name == "meterline-w2"), None)
        if any(s.attempts for s in running):
            phase("route CPU in-process", results, lambda: route_cpu_in_process(results))
        phase("interleaved rounds", results, lambda: interleaved_rounds(plan, running, body_file, results))
        if meterline is not None:
            phase("ledger check", results, lambda: ledger_check(meterline, results))
        if w2 is not None:
            phase("ledger check (2 workers)", results, lambda: ledger_check(w2, results, "ledger_check_w2"))
        for other in running:
            if other.name in CHECKED:
                phase(f"ledger check ({other.name})", results,
                      lambda o=other: ledger_check(o, results, CHECKED[o.name]))
        for system in running:
            if system is not fake:
                system.stop()  # the memory and lag phases get the machine to themselves
        if meterline is not None:
            phase("memory and ledger lag", results, lambda: memory_and_lag(plan, fake, work, body_file, results))
    except _NothingToMeasure:
        log("start-up failed: " + results["errors"][-1])
    except KeyboardInterrupt:
        results["errors"].append("interrupted")
        log("interrupted: writing what was measured")
    finally:
        for system in running:
            system.stop()
        if args.keep_tmp:
            log(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for error in results["errors"]:
        results["notes"].append(f"error: {error}")
    results["meta"]["wall_s"] = time.monotonic() - t0
    md_path, chart = write_outputs(plan, results, Path(args.out), stamp)
    summary = results["summary"]
    print(report.results_table(summary))
    print()
    print(report.process_table(summary))
    print()
    print(report.targets_table(summary))
    print(f"\nwrote {md_path}" + (f" and {chart.name}" if chart else "") + f" ({results['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
