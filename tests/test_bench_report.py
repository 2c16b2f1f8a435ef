"""The bench report's verdicts for the budgets-on-Redis and route rows (issues 14 and 15), from synthetic rounds."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# bench/ is not a package: load report.py by path (stdlib only), without putting bench/ on sys.path, where its
# module names (load, systems, procs) would shadow others for the rest of the session
_spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).resolve().parent.parent / "bench" / "report.py")
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

SYSTEMS = ("direct", "meterline", "meterline-redis", "meterline-route", "meterline-fallback")


def _run(system: str, rnd: int, c: int, rps: float, p50: float, fwd_ms: float, sinks_ms: float = 0.3) -> dict[str, Any]:
    return {"system": system, "round": rnd, "connections": c, "requests": int(rps), "ok_rps": rps,
            "p50_ms": p50, "p99_ms": p50 * 3, "errors": {"status": 0},
            "cpu_ms_per_call": fwd_ms + sinks_ms, "cpu_ms_per_call_roles": {"forwarder": fwd_ms, "sinks": sinks_ms,
                                                                            "supervisor": 0.0},
            "rss_mib": 200.0, "rss_mib_roles": {}, "processes": {"forwarder": 1}}


def _results(redis_rps: float, redis_p50: float, route_fwd_ms: float) -> dict[str, Any]:
    shape = {  # system -> (rps at 32, p50 at 1 ms, forwarder CPU ms per call)
        "direct": (20000.0, 0.05, 0.02), "meterline": (2000.0, 0.40, 0.250),
        "meterline-redis": (redis_rps, redis_p50, 0.260), "meterline-route": (1950.0, 0.41, route_fwd_ms),
        "meterline-fallback": (1500.0, 0.60, 0.400),
    }
    load = [_run(name, rnd, c, rps, p50 if c == 1 else 5.0, fwd)
            for rnd in (1, 2) for c in (1, 32, 128) for name, (rps, p50, fwd) in shape.items()]
    return {"systems": {name: {"status": "ok"} for name in SYSTEMS}, "load": load, "streams": [],
            "memory": {}, "lag": {}, "route_cpu": {"us_per_call": 6.5}, "plan": {}, "meta": {}}


def _targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["key"]: t for t in report.summarize(results)["targets"]}


def test_redis_and_route_targets_met() -> None:
    got = _targets(_results(redis_rps=1900.0, redis_p50=0.45, route_fwd_ms=0.260))
    assert got["redis_throughput"]["status"] == "met"  # 0.95x
    assert got["redis_p50"]["status"] == "met"  # +0.05 ms
    assert got["route_cpu"]["status"] == "met"  # +10 us in the forwarder
    assert abs(got["route_cpu"]["value"] - 10.0) < 1e-6
    assert "6.5 us" in got["route_cpu"]["measured"]  # the in-process isolate is shown next to it


def test_redis_and_route_targets_missed() -> None:
    got = _targets(_results(redis_rps=1700.0, redis_p50=0.55, route_fwd_ms=0.280))
    assert got["redis_throughput"]["status"] == "missed"  # 0.85x
    assert got["redis_p50"]["status"] == "missed"  # +0.15 ms
    assert got["route_cpu"]["status"] == "missed"  # +30 us


def test_rows_not_run_are_not_measured() -> None:
    results = _results(1900.0, 0.45, 0.260)
    for name in ("meterline-redis", "meterline-route"):
        results["systems"][name] = {"status": "skipped"}
    got = _targets(results)
    assert {got[k]["status"] for k in ("redis_throughput", "redis_p50", "route_cpu")} == {"not measured"}


def test_markdown_section_names_the_fallback_row() -> None:
    results = _results(1900.0, 0.45, 0.260)
    text = "\n".join(report.fleet_route_text(results, report.summarize(results)))
    assert "meterline-fallback" in text and "+150.0 us in the forwarder" in text
