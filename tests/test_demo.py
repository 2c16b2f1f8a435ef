"""`meterline demo`: a fake provider and a short burst of traffic land in a ledger of their own."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest

from ledger import sql
from tests.sidecar_process import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _demo(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sidecar.cli", "demo", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`meterline demo --duration 8 --exit`, run once in a directory of its own (the default ledger name)."""
    workdir = tmp_path_factory.mktemp("demo")
    (workdir / "meterline.yaml").write_text("listen: nonsense\n")  # the demo does not read the user's config
    port = free_port()
    proc = _demo("--duration", "8", "--exit", "--port", str(port), "--seed", "3", "--fast", cwd=workdir)
    out, _ = proc.communicate(timeout=90)
    (workdir / "meterline.yaml").unlink()  # `meterline sql` does read it
    con = sql.open_file(workdir / "meterline-demo.duckdb")
    try:
        yield {"rc": proc.returncode, "out": out, "port": port, "workdir": workdir, "con": con}
    finally:
        con.close()


def _rows(run: dict[str, Any], query: str) -> list[dict[str, Any]]:
    result = sql.run(run["con"], query)
    return [dict(zip(result.columns, row)) for row in result.rows]


def test_demo_finishes_and_says_where_to_look(demo_run: dict[str, Any]) -> None:
    out = demo_run["out"]
    assert demo_run["rc"] == 0, out
    assert f"Dashboard: http://127.0.0.1:{demo_run['port']}/_meterline/" in out
    queries = re.findall(r'^  meterline sql "(.+)" --db (\S+)$', out, re.M)
    assert len(queries) == 3, out
    assert "Traceback" not in out
    # the queries it suggests run as printed
    for query, db in queries:
        done = subprocess.run([sys.executable, "-m", "sidecar.cli", "sql", query, "--db", db],
                              cwd=demo_run["workdir"], env=ENV, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "row" in done.stdout


def test_demo_traffic_is_varied_and_priced(demo_run: dict[str, Any]) -> None:
    calls = _rows(demo_run, "SELECT * FROM calls")
    assert len(calls) >= 15
    assert {"openai", "anthropic", "google"} <= {r["provider"] for r in calls}
    assert len({r["app"] for r in calls}) >= 4
    assert len({r["user_id"] for r in calls}) >= 3
    assert len({(r["tags"] or {}).get("team") for r in calls}) >= 4
    assert {True, False} <= {r["stream"] for r in calls}
    ok = [r for r in calls if r["outcome"] == "ok"]
    assert len(ok) >= 10
    assert all(r["cost_usd"] is not None and r["price_source"].startswith("genai-prices") for r in ok), \
        [r for r in ok if r["cost_usd"] is None]
    assert all(r["anomaly"] is None for r in calls)
    for provider in ("openai", "anthropic", "google"):
        spend = sum(Decimal(r["cost_usd"]) for r in ok if r["provider"] == provider)
        assert spend > 0, provider
    assert sum(r["cache_read_tokens"] or 0 for r in ok) > 0
    assert sum(r["reasoning_tokens"] or 0 for r in ok) > 0
    assert all(r["trace_id"] and r["duration_ms"] is not None for r in calls)


def test_demo_budget_refuses_and_alerts(demo_run: dict[str, Any]) -> None:
    blocked = _rows(demo_run, "SELECT * FROM calls WHERE outcome = 'blocked'")
    assert blocked, "the demo's blocking budget refused nothing"
    assert all(r["status_code"] == 429 and r["user_id"] == "intern-7" and r["cost_usd"] is None for r in blocked)
    alerts = _rows(demo_run, "SELECT rule, threshold, action FROM alerts")
    # alerts follow settled spend, not refusals: with max_tokens the intern's spend stays under the
    # limit, so its rule alerts at 50% (the first call costs about half of it) and never at 100%
    assert any(a["rule"] == "playground-intern" and a["threshold"] == Decimal("0.5") and a["action"] == "block"
               for a in alerts), alerts
    assert not any(a["rule"] == "playground-intern" and a["threshold"] == 1 for a in alerts), alerts
    assert "blocked by a budget" in demo_run["out"]


def test_demo_serves_the_dashboard_until_interrupted(tmp_path: Path) -> None:
    port = free_port()
    proc = _demo("--duration", "2", "--port", str(port), "--db", str(tmp_path / "d.duckdb"), "--fast", cwd=tmp_path)
    try:
        lines = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the demo exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("Serving until Ctrl-C"):
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_meterline/", timeout=10) as r:
            assert r.status == 200 and b"static/app.js" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_meterline/budgets", timeout=10) as r:
            assert b"playground-intern" in r.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_says_so_when_the_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "sidecar.cli", "demo", "--exit", "--duration", "1",
                               "--port", str(port), "--db", str(tmp_path / "d.duckdb")],
                              cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stdout + done.stderr
