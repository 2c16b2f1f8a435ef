"""Turns one run's raw results into summary numbers, target verdicts, and the Markdown report."""
from __future__ import annotations

import math
import statistics
from typing import Any

ORDER = ("direct", "bare", "meterline", "meterline-w2", "meterline-redis", "meterline-route", "meterline-fallback",
         "litellm", "portkey")
ROLES = ("forwarder", "sinks", "supervisor")  # meterline's processes (bench/procs.py tree_roles)
EXTRA_ROLES = ("redis",)  # servers a system alone uses, counted in its CPU (meterline-redis's redis-server)

# (key, description, limit text)
TARGETS = (
    ("throughput_32", "throughput at 32 connections, meterline (one worker) / bare forwarder", ">= 1.00x"),
    ("throughput_w2", "throughput at 32 connections, meterline --workers 2 / meterline (one worker)", ">= 1.00x"),
    ("added_p99_1", "p99 at 1 connection, meterline minus bare forwarder", "<= 1 ms"),
    ("added_p50_1", "p50 at 1 connection, meterline minus bare forwarder", "<= 0.30 ms"),
    ("added_ttfc", "added time to first chunk, meterline minus direct", "< 1 ms"),
    ("chunk_overhead", "per-chunk overhead, meterline minus direct (median one-way delay)", "< 50 us"),
    ("rss_growth", "RSS growth over the memory phase's calls (idle -> after the calls)", "< 20 MB"),
    ("ledger_lag", "ledger lag p99 (call end -> row readable via /_meterline/sql)", "< 1 s"),
    ("redis_throughput", "throughput at 32 connections, budgets on a local Redis / local budgets "
                         "(meterline-redis / meterline; issue 14)", ">= 0.90x"),
    ("redis_p50", "p50 at 1 connection, budgets on a local Redis minus local budgets (issue 14)", "<= +0.10 ms"),
    ("route_cpu", "CPU per call a one-target route adds to the direct path: forwarder, meterline-route minus "
                  "meterline at 32 connections (issue 15)", "< 20 us"),
)


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _load(results: dict[str, Any], system: str, connections: int) -> list[dict[str, Any]]:
    return [r for r in results["load"] if r["system"] == system and r["connections"] == connections]


def _paired(results: dict[str, Any], system: str, base: str, connections: int, key: str) -> float:
    """Median over rounds of (system - base) for one wrk number, each round compared with itself."""
    return _median(_paired_rounds(results, system, base, connections, lambda r: r[key]))


def _role_cpu(role: str) -> Any:
    """A load run's CPU ms per call of one of its roles (total when role is "total")."""
    if role == "total":
        return lambda r: r.get("cpu_ms_per_call", float("nan"))
    return lambda r: r.get("cpu_ms_per_call_roles", {}).get(role, float("nan"))


def _paired_rounds(results: dict[str, Any], system: str, base: str, connections: int, get: Any) -> list[float]:
    """Per round, get(system's run) - get(base's run), each round compared with itself."""
    diffs = []
    for run in _load(results, system, connections):
        same = [b for b in _load(results, base, connections) if b["round"] == run["round"]]
        if same:
            diffs.append(get(run) - get(same[0]))
    return diffs


def _round_ratios(results: dict[str, Any], system: str, base: str, connections: int) -> list[float]:
    """Per round, system req/s over base req/s (each round compared with itself)."""
    ratios = []
    for run in _load(results, system, connections):
        same = [b for b in _load(results, base, connections) if b["round"] == run["round"]]
        if same and same[0]["ok_rps"]:
            ratios.append(run["ok_rps"] / same[0]["ok_rps"])
    return ratios


def _streams(results: dict[str, Any], system: str) -> list[dict[str, Any]]:
    return [s for s in results["streams"] if s["system"] == system and s["streams"] > 0]


def _paired_stream(results: dict[str, Any], system: str, key: str) -> float:
    diffs = []
    for run in _streams(results, system):
        same = [d for d in _streams(results, "direct") if d["round"] == run["round"]]
        if same:
            diffs.append(run[key] - same[0][key])
    return _median(diffs)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    systems = [s for s in ORDER if results["systems"].get(s, {}).get("status") == "ok"]
    rows: dict[str, dict[str, float]] = {}
    for name in systems:
        row: dict[str, float] = {}
        for c in (1, 32, 128):
            runs = _load(results, name, c)
            row[f"rps_{c}"] = _median([r["ok_rps"] for r in runs])
            row[f"p50_{c}"] = _median([r["p50_ms"] for r in runs])
            row[f"p99_{c}"] = _median([r["p99_ms"] for r in runs])
            row[f"errors_{c}"] = sum(sum(r["errors"].values()) for r in runs)
        for c in (1, 32, 128):
            runs = _load(results, name, c)
            row[f"cpu_ms_{c}"] = _median([r.get("cpu_ms_per_call", float("nan")) for r in runs])
            for role in ROLES + EXTRA_ROLES:  # meterline's processes; absent (NaN) for one-process systems
                row[f"cpu_{role}_ms_{c}"] = _median([r.get("cpu_ms_per_call_roles", {}).get(role, float("nan"))
                                                     for r in runs])
        last = [r for r in results["load"] if r["system"] == name][-1:] or [{}]
        row["rss_mib"] = last[0].get("rss_mib", float("nan"))  # the whole tree after its last load run
        for role in ROLES:
            row[f"rss_{role}_mib"] = last[0].get("rss_mib_roles", {}).get(role, float("nan"))
        row["forwarders"] = last[0].get("processes", {}).get("forwarder", 0)
        row["added_p50_1"] = _paired(results, name, "direct", 1, "p50_ms")
        row["added_p99_1"] = _paired(results, name, "direct", 1, "p99_ms")
        row["ttfc_ms"] = _median([s["ttfc_ms_median"] for s in _streams(results, name)])
        row["added_ttfc_ms"] = _paired_stream(results, name, "ttfc_ms_median")
        row["chunk_delay_us"] = _median([s["chunk_delay_us_median"] for s in _streams(results, name)])
        row["added_chunk_us"] = _paired_stream(results, name, "chunk_delay_us_median")
        row["stream_errors"] = sum(len(s["errors"]) for s in results["streams"] if s["system"] == name)
        rows[name] = row
    bare = rows.get("bare", {})
    for row in rows.values():
        row["rps_32_vs_bare"] = row["rps_32"] / bare["rps_32"] if bare.get("rps_32") else float("nan")
        row["rps_128_vs_bare"] = row["rps_128"] / bare["rps_128"] if bare.get("rps_128") else float("nan")
    one = rows.get("meterline", {})
    if "meterline-w2" in rows:
        rows["meterline-w2"]["rps_32_vs_meterline"] = (rows["meterline-w2"]["rps_32"] / one["rps_32"]
                                                       if one.get("rps_32") else float("nan"))
    return {"systems": systems, "rows": rows, "targets": _targets(results, rows)}


def _verdict(value: float, ok: bool) -> str:
    if value is None or math.isnan(value):
        return "not measured"
    return "met" if ok else "missed"


def _ratio(results: dict[str, Any], rows: dict[str, dict[str, float]], system: str, base: str,
           limit: float) -> tuple[float, str, bool]:
    """Throughput at 32 connections, system over base. Met only if both hold: the ratio of the medians,
    and the median of each round's own ratio (on a noisy machine the two can differ widely; the lower
    one decides)."""
    nan = float("nan")
    if system not in rows or base not in rows:
        return nan, "not run", False
    medians = rows[system]["rps_32"] / rows[base]["rps_32"] if rows[base].get("rps_32") else nan
    rounds = _round_ratios(results, system, base, 32)
    paired = _median(rounds) if rounds else nan
    value = min(medians, paired)
    text = f"{medians:.2f}x, per round {', '.join(f'{r:.2f}x' for r in rounds)} (median {paired:.2f}x)"
    return value, text, value >= limit


def cpu_text(row: dict[str, float], c: int = 32) -> str:
    """CPU per call at c connections: the total, and for meterline its processes' shares."""
    total = f"{_f(row.get(f'cpu_ms_{c}', float('nan')), 3)} ms"
    if math.isnan(row.get(f"cpu_sinks_ms_{c}", float("nan"))):
        return total
    redis = row.get(f"cpu_redis_ms_{c}", float("nan"))
    return (total + f" (forwarder{'s' if row.get('forwarders', 1) > 1 else ''} "
            f"{_f(row[f'cpu_forwarder_ms_{c}'], 3)}, sinks {_f(row[f'cpu_sinks_ms_{c}'], 3)}, "
            f"supervisor {_f(row[f'cpu_supervisor_ms_{c}'], 3)}"
            + ("" if math.isnan(redis) else f", redis-server {_f(redis, 3)}") + ")")


def _targets(results: dict[str, Any], rows: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    ml = rows.get("meterline", {})
    w2 = rows.get("meterline-w2", {})
    nan = float("nan")
    bare = rows.get("bare", {})
    thr, thr_text, thr_ok = _ratio(results, rows, "meterline", "bare", 1.0)
    thr2, thr2_text, thr2_ok = _ratio(results, rows, "meterline-w2", "meterline", 1.0)
    over_bare = _paired(results, "meterline", "bare", 1, "p50_ms") if "bare" in rows else nan
    p99_over_bare = _paired(results, "meterline", "bare", 1, "p99_ms") if "bare" in rows else nan
    ttfc = ml.get("added_ttfc_ms", nan)
    chunk = ml.get("added_chunk_us", nan)
    memory = results.get("memory") or {}
    growth = memory.get("growth_mib", nan)
    lag = results.get("lag") or {}
    lag_p99 = lag.get("lag_ms_p99", nan)
    measured = {
        "throughput_32": (thr, f"{thr_text}; CPU per call {cpu_text(ml)} vs {cpu_text(bare)}", thr_ok),
        "throughput_w2": (thr2, f"{thr2_text}; CPU per call {cpu_text(w2)}", thr2_ok),
        "added_p99_1": (p99_over_bare, f"{p99_over_bare:+.3f} ms (p99 {ml.get('p99_1', nan):.3f} ms vs "
                                       f"{bare.get('p99_1', nan):.3f} ms)", p99_over_bare <= 1.0),
        "added_p50_1": (over_bare, f"{over_bare:+.3f} ms", over_bare <= 0.3),
        "added_ttfc": (ttfc, f"{ttfc:+.3f} ms (bare forwarder: {bare.get('added_ttfc_ms', nan):+.3f} ms; "
                             f"2 workers: {w2.get('added_ttfc_ms', nan):+.3f} ms)", ttfc < 1.0),
        "chunk_overhead": (chunk, f"{chunk:+.1f} us (bare forwarder: {bare.get('added_chunk_us', nan):+.1f} us)",
                           chunk < 50),
        "rss_growth": (growth, f"{growth:+.1f} MiB over {memory.get('calls', 0):,} calls "
                               f"({memory.get('after_mib', nan) - memory.get('warm_mib', nan):+.1f} MiB after the "
                               f"first {memory.get('warm_calls', 0):,})", growth < 20 * 1e6 / 2**20),
        "ledger_lag": (lag_p99, f"{lag_p99:.0f} ms p99 (max {lag.get('lag_ms_max', nan):.0f} ms) at "
                                f"{lag.get('achieved_rate', nan):.0f} calls/s"
                                + (" (the sidecar could not keep the 1,000 calls/s pace)"
                                   if lag.get("achieved_rate", 0) < 0.9 * lag.get("target_rate", 0) else ""),
                       lag_p99 < 1000),
    }
    measured.update(_fleet_and_route_targets(results, rows))
    out = []
    for key, what, limit in TARGETS:
        value, text, ok = measured[key]
        out.append({"key": key, "target": what, "limit": limit, "measured": text, "value": value,
                    "status": _verdict(value, ok)})
    return out


def _fleet_and_route_targets(results: dict[str, Any],
                              rows: dict[str, dict[str, float]]) -> dict[str, tuple[float, str, bool]]:
    """Issue 14's budgets-on-Redis targets and issue 15's route target, each judged against meterline
    (local budgets, the direct path) in the same rounds."""
    nan = float("nan")
    ml = rows.get("meterline", {})
    rd = rows.get("meterline-redis", {})
    out: dict[str, tuple[float, str, bool]] = {}
    thr, thr_text, thr_ok = _ratio(results, rows, "meterline-redis", "meterline", 0.9)
    out["redis_throughput"] = (thr, f"{thr_text}; CPU per call {cpu_text(rd)} vs {cpu_text(ml)}", thr_ok)
    p50 = _paired(results, "meterline-redis", "meterline", 1, "p50_ms") if rd and ml else nan
    out["redis_p50"] = (p50, f"{p50:+.3f} ms (p50 {rd.get('p50_1', nan):.3f} ms vs {ml.get('p50_1', nan):.3f} ms; "
                             f"p99 {rd.get('p99_1', nan):.3f} ms vs {ml.get('p99_1', nan):.3f} ms)", p50 <= 0.1)
    route = route_cpu_us(results, rows, "meterline-route")
    inproc = (results.get("route_cpu") or {}).get("us_per_call", nan)
    out["route_cpu"] = (route["forwarder"],
                        f"{_f(route['forwarder'], 1, True)} us, per round "
                        f"{', '.join(_f(d, 1, True) for d in route['rounds']) or '-'}; whole process tree "
                        f"{_f(route['total'], 1, True)} us (the sinks process also writes each call's attempt row); "
                        f"in-process isolate (bench/route_cpu.py) {_f(inproc, 1)} us",
                        route["forwarder"] < 20)
    return out


def route_cpu_us(results: dict[str, Any], rows: dict[str, dict[str, float]], system: str) -> dict[str, Any]:
    """What `system` (a route row) costs in CPU per call over meterline's direct path at 32 connections, in
    microseconds, paired per round: the forwarder(s) (where the route's code runs) and the whole tree."""
    if system not in rows or "meterline" not in rows:
        return {"forwarder": float("nan"), "total": float("nan"), "rounds": []}
    fwd = [d * 1000 for d in _paired_rounds(results, system, "meterline", 32, _role_cpu("forwarder"))]
    total = [d * 1000 for d in _paired_rounds(results, system, "meterline", 32, _role_cpu("total"))]
    return {"forwarder": _median(fwd), "total": _median(total), "rounds": fwd}


def fleet_route_text(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The Markdown section on the budgets-on-Redis and route rows (issues 14 and 15)."""
    rows = summary["rows"]
    if not any(n in rows for n in ("meterline-redis", "meterline-route", "meterline-fallback")):
        return []
    nan = float("nan")
    ml = rows.get("meterline", {})
    out = ["## Budgets on Redis, routes and fallbacks", ""]
    if "meterline-redis" in rows:
        rd = rows["meterline-redis"]
        out += [f"- **meterline-redis** (its two budget rules on a local redis-server, `fleet.redis`) against "
                f"**meterline** (the same rules kept in the process): {_f(rd['rps_32'], 0)} against "
                f"{_f(ml.get('rps_32', nan), 0)} req/s at 32 connections; p50 at 1 connection "
                f"{_f(_paired(results, 'meterline-redis', 'meterline', 1, 'p50_ms'), 3, True)} ms, p99 "
                f"{_f(_paired(results, 'meterline-redis', 'meterline', 1, 'p99_ms'), 3, True)} ms (paired per round). "
                f"CPU per call at 32 connections: {cpu_text(rd)}, the redis-server's included."]
    for name, what in (("meterline-route", "a one-target route"), ("meterline-fallback",
                                                                        "a route that falls back once: first try 503")):
        if name not in rows:
            continue
        r = rows[name]
        cpu = route_cpu_us(results, rows, name)
        check = (results.get(f"ledger_check_{name.split('-', 1)[1]}") or {})
        out += [f"- **{name}** ({what}) over meterline's direct path: CPU per call at 32 connections "
                f"{_f(cpu['forwarder'], 1, True)} us in the forwarder, {_f(cpu['total'], 1, True)} us in the whole "
                f"tree; p50 at 1 connection {_f(_paired(results, name, 'meterline', 1, 'p50_ms'), 3, True)} ms; "
                f"{_f(r['rps_32'], 0)} req/s at 32 connections ({_f(r['rps_32'] / ml['rps_32'] if ml.get('rps_32') else nan)}x "
                f"meterline). " + check.get("route_text", "")]
    out += ["", "Each is paired with meterline in the same round (same budget rules, same telemetry): the "
            "route rows send the route's name as `model`, meterline-redis keeps its accounts in Redis. "
            "The fallback row has no target of its own (issue 15 asks for the row); its first try is read whole, "
            "metered and priced before the second starts.", ""]
    return out


def _f(value: float, digits: int = 2, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}"


def results_table(summary: dict[str, Any]) -> str:
    head = ("| system | req/s @32 | vs bare | CPU ms/call @32 | p99 @32 ms | req/s @128 | p99 @128 ms | p50 @1 ms | "
            "added p50 @1 ms | added p99 @1 ms | added TTFC ms | added per-chunk us | errors |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name in summary["systems"]:
        r = summary["rows"][name]
        direct = name == "direct"
        errors = int(r["errors_1"] + r["errors_32"] + r["errors_128"] + r["stream_errors"])
        lines.append(
            f"| {name} | {_f(r['rps_32'], 0)} | {_f(r['rps_32_vs_bare'])}x | {_f(r['cpu_ms_32'], 3)} | {_f(r['p99_32'])} | "
            f"{_f(r['rps_128'], 0)} | {_f(r['p99_128'])} | {_f(r['p50_1'], 3)} | "
            f"{'-' if direct else _f(r['added_p50_1'], 3, True)} | {'-' if direct else _f(r['added_p99_1'], 3, True)} | "
            f"{'-' if direct else _f(r['added_ttfc_ms'], 3, True)} | {'-' if direct else _f(r['added_chunk_us'], 1, True)} | "
            f"{errors} |")
    return "\n".join(lines)


def process_table(summary: dict[str, Any]) -> str:
    """meterline's processes: CPU per call at each load and RSS after the rounds, per role and in total."""
    head = ("| system | load | CPU ms/call total | forwarder(s) | sinks | supervisor | RSS MiB total | forwarder(s) | "
            "sinks | supervisor |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name in summary["systems"]:
        r = summary["rows"][name]
        if math.isnan(r.get("cpu_sinks_ms_32", float("nan"))):
            continue
        for i, c in enumerate((1, 32, 128)):
            rss = (f"{_f(r['rss_mib'], 1)} | {_f(r['rss_forwarder_mib'], 1)} | {_f(r['rss_sinks_mib'], 1)} | "
                   f"{_f(r['rss_supervisor_mib'], 1)}") if i == 0 else "| | |"
            lines.append(f"| {name if i == 0 else ''} | c{c} | {_f(r[f'cpu_ms_{c}'], 3)} | "
                         f"{_f(r[f'cpu_forwarder_ms_{c}'], 3)} | {_f(r[f'cpu_sinks_ms_{c}'], 3)} | "
                         f"{_f(r[f'cpu_supervisor_ms_{c}'], 3)} | {rss} |")
    return "\n".join(lines)


def targets_table(summary: dict[str, Any]) -> str:
    lines = ["| target | limit | measured | status |", "| --- | --- | --- | --- |"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {t['limit']} | {t['measured']} | **{t['status']}** |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], summary: dict[str, Any], chart_name: str | None) -> str:
    meta, plan = results["meta"], results["plan"]
    out = [f"# meterline benchmark, {meta['started']}", ""]
    out += [f"Mode: **{meta['mode']}**. Command: `{meta['command']}`. Wall time: {meta.get('wall_s', 0):.0f} s.", ""]
    if meta["mode"] == "quick":
        out += ["Quick mode: short runs, few calls and a short rest; the numbers show the harness works, not "
                "how fast meterline is. The memory phase made "
                f"{results.get('memory', {}).get('calls', 0):,} calls (not 100,000) and rested "
                f"{plan['rest_s']:g} s (not 60 s).", ""]
    out += ["## Results", "", results_table(summary), ""]
    out += [
        f"Medians over {plan['rounds']} interleaved rounds (in each round every system runs each load in turn, "
        "the order rotating from round to round). Requests per second count responses without errors. "
        "\"added\" is the system minus direct calls to the fake in the same round; \"vs bare\" is the ratio to "
        "the bare aiohttp forwarder (no metering), the floor for a Python forwarder. \"CPU ms/call\" is the CPU time "
        "the system's whole process tree (every process and thread) spent per call at 32 connections, from "
        "/proc/PID/stat: less sensitive than req/s to other load on the machine (for direct, it is the fake's). "
        "For meterline it is taken once the sinks process has written the run's rows and exported its spans, so "
        "the work it does after the calls counts for them. meterline-w2 is `meterline serve --workers 2` "
        "without the budget rules (refused with more than one worker). Streams: "
        f"{plan['streams']} per system per round, {plan['chunks']} chunks {plan['chunk_interval_ms']:g} ms apart; "
        "per-chunk overhead is the median one-way delay of a chunk (fake's write to client's read) minus the "
        "same with no system in between.", ""]
    out += ["## meterline's processes", "", process_table(summary), "",
            "The supervisor forks the sinks process (journal tail, DuckDB writer, telemetry, alerts, SQL) and the "
            "forwarder(s) (front, upstream client, budgets, journal); children are found through "
            "/proc/PID/task/*/children and the sinks pid from healthz. CPU per call is the median over rounds, "
            "per load; RSS (VmRSS) is after each system's last load run. Summed RSS counts pages the forked "
            "children share with the supervisor once per process (the memory phase also gives PSS).", ""]
    out += ["## Targets (meterline)", "", targets_table(summary), ""]
    out += fleet_route_text(results, summary)
    memory = results.get("memory") or {}
    if memory:
        def row(label: str, name: str) -> str:
            roles = memory.get(f"{name}_roles_mib") or {}
            return (f"| {label} | {_f(memory.get(f'{name}_mib', float('nan')), 1)} | "
                    f"{_f(memory.get(f'{name}_pss_mib', float('nan')), 1)} | "
                    f"{_f(memory.get(f'{name}_anon_mib', float('nan')), 1)} | "
                    f"{_f(memory.get(f'{name}_file_mib', float('nan')), 1)} | "
                    + " | ".join(_f(roles.get(r, float("nan")), 1) for r in ROLES) + " |")

        out += ["## Memory (meterline's process tree, VmRSS)", "",
                "| point | RSS MiB | PSS | anonymous | file-backed | forwarder | sinks | supervisor |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
                row("idle (started, no calls)", "idle"),
                row(f"after the first {memory.get('warm_calls', 0):,} calls", "warm"),
                row(f"after {memory.get('calls', 0):,} calls", "after"),
                row("ledger flushed (journals read, pending 0)", "flushed"),
                row(f"after {plan['rest_s']:g} s at rest", "rested"), "",
                "RSS, anonymous and file-backed are summed over the supervisor, the forwarder and the sinks process "
                "(the growth target reads that sum); PSS counts pages they share once. "
                "Anonymous is the heap and native allocators (DuckDB's buffer manager, in the sinks process, held "
                f"{_f(memory.get('duckdb_mib', float('nan')), 1)} MiB once the ledger was flushed, by "
                "duckdb_memory()); file-backed is mostly shared libraries' code, resident once first run.", "",
                f"The calls ran at 32 connections ({_f(memory.get('rps', float('nan')), 0)} req/s) on a fresh "
                "ledger, in a meterline started for this phase.", ""]
    lag = results.get("lag") or {}
    if lag:
        out += ["## Ledger lag", "",
                f"Paced client at {lag['target_rate']:g} calls/s for {plan['lag_s']:g} s (achieved "
                f"{lag['achieved_rate']:.0f} calls/s, {lag['calls']:,} calls, {lag['failed']} failed); one call in "
                f"{plan['lag_probe_every']} tagged `probe=<n>`; SQL polled every {lag['poll_interval_ms']:g} ms. "
                f"Probes seen {lag['probes_seen']}/{lag['probes']}: lag p50 {_f(lag['lag_ms_p50'], 0)} ms, p99 "
                f"{_f(lag['lag_ms_p99'], 0)} ms, max {_f(lag['lag_ms_max'], 0)} ms (upper bounds: they include "
                f"the poll interval and the SQL round trip). Healthz `last_lag_s` peaked at "
                f"{_f(lag['health_last_lag_ms_max'], 0)} ms, `pending` at {lag['pending_max']}, the sinks process's "
                f"unread journal (`sinks.backlog_bytes`) at {lag.get('backlog_bytes_max', 0):,} bytes.", ""]
        if lag.get("errors"):
            out += ["Errors: " + "; ".join(lag["errors"]), ""]
    checks = [c for c in (results.get("ledger_check"), results.get("ledger_check_w2"),
                          results.get("ledger_check_redis"), results.get("ledger_check_route"),
                          results.get("ledger_check_fallback")) if c]
    if checks:
        out += ["## Metering check", ""]
        for check in checks:
            out += [check.get("text", ""), ""]
    out += ["## Systems and peers", ""]
    for name in ORDER:
        info = results["systems"].get(name)
        if info:
            out.append(f"- **{name}**: {info['status']}" + (f" ({info['describe']})" if info.get("describe") else ""))
    for name, status in results.get("peers", {}).items():
        out.append(f"- install of {name}: {status}")
    out += ["", "## Setup", ""]
    out += [f"- machine: {meta['cpu']}, {meta['cores']} cores; {meta['python']}; {meta['wrk']}",
            f"- wrk: `-t{plan['wrk_threads']}` for every system and load (2 cores: the load generator shares them "
            "with the system under test and the fake, so absolute numbers are low and the ratios are what count); "
            f"durations {plan['c1_s']:g} s at 1 connection, {plan['c32_s']:g} s at 32, {plan['c128_s']:g} s at 128, "
            f"after a {plan['warmup_s']:g} s warm-up per system",
            f"- fake provider: own process, uvloop, JSON body {plan['body_bytes']} bytes of content, "
            f"delay {plan['delay_ms']:g} ms; SSE {plan['chunks']} chunks {plan['chunk_interval_ms']:g} ms apart",
            "- every request: the same JSON chat body (`gpt-4o-mini`), `Authorization`, `x-meterline-tags`, "
            "`x-meterline-app` (the peers receive and forward these too)"]
    foreign = results.get("foreign_cpu") or []
    if foreign:
        disturbed = [f["phase"] for f in foreign if f["cores"] > 0.25]
        out.append("- other processes on the machine (not this benchmark; e.g. other people's test runs) used "
                   + ", ".join(f"{f['cores']:.2f} cores in {f['phase']}" for f in foreign)
                   + (f" -- **disturbed (over 0.25 of 2 cores taken by others): {', '.join(disturbed)}**"
                      if disturbed else ""))
    for note in results.get("notes", []):
        out.append(f"- {note}")
    if chart_name:
        out += ["", f"![chart]({chart_name})"]
    return "\n".join(out) + "\n"
