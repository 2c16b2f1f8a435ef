"""Reconciliation runs handed to a running sidecar (`meterline serve` with an admin token): its rules, the parts, the checks."""
from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from jobs import reconcile, reconcile_store
from jobs.admin_api import ProviderReport
from tests.conftest import launch, upstreams_for
from tests.fakes import FakeProvider
from tests.sidecar_process import Sidecar

TOKEN = "tok-reconcile-7d1e"
DAY0 = datetime(2026, 11, 20, tzinfo=timezone.utc)
ROUTE = "/_meterline/reconciliations"


@pytest.fixture(scope="module")
def sidecar(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    process = launch(tmp_path_factory.mktemp("reconcile_store"), {**upstreams_for(fake), "admin_token": TOKEN})
    try:
        yield process
    finally:
        process.stop()


def post(sidecar: Sidecar, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    given = {"content-type": "application/json", "x-meterline-admin-token": TOKEN} if headers is None else headers
    req = urllib.request.Request(sidecar.url + ROUTE, data=body, method="POST", headers=given)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


def sql(sidecar: Sidecar, query: str) -> list[dict[str, Any]]:
    req = urllib.request.Request(sidecar.url + "/_meterline/sql", data=query.encode(), method="POST",
                                 headers={"x-meterline-admin-token": TOKEN})
    with urllib.request.urlopen(req, timeout=30) as r:
        doc = orjson.loads(r.read())
    return [dict(zip(doc["columns"], row)) for row in doc["rows"]]


def stored(sidecar: Sidecar, run_id: str) -> tuple[int, int]:
    try:
        runs = sql(sidecar, f"SELECT count(*) AS n FROM reconciliations WHERE run_id = '{run_id}'")[0]["n"]
        rows = sql(sidecar, f"SELECT count(*) AS n FROM reconciliation_rows WHERE run_id = '{run_id}'")[0]["n"]
    except urllib.error.HTTPError as e:  # no table yet: nothing stored
        assert e.code == 400, e.read()
        return 0, 0
    return runs, rows


def a_run(hours: int = 48) -> reconcile.Reconciliation:
    """Hourly rows for two models over `hours`, the ledger a little short on one: enough rows for several parts."""
    report, ledger = ProviderReport(), reconcile.LedgerSide()
    for i in range(hours):
        at = DAY0 + timedelta(hours=i)
        for model, usd in (("gpt-4o-mini-2024-07-18", Decimal("0.000123456789")), ("gpt-4o-2024-08-06", Decimal("0.01"))):
            report.add_usage((at, model), {"requests": 3, "uncached_input": 900, "cache_read": 100, "output": 50})
            report.add_cost((reconcile._day(at), model), usd)
            short = 1 if model == "gpt-4o-2024-08-06" and i == 5 else 0
            ledger.usage[(at, model)] = {"requests": 3 - short, "uncached_input": 900, "cache_read": 100,
                                         "output": 50, "usd": usd, "unpriced": 0}
    until = DAY0 + timedelta(hours=hours)
    return reconcile.compare("openai", report, ledger, DAY0, until, "1h", Decimal("0.005"),
                             {"base_url": "http://fake", "key_fingerprints": []})


def test_a_run_in_parts_is_stored_whole_when_its_last_part_arrives(sidecar: Sidecar) -> None:
    run = a_run()
    bodies = reconcile.parts(run, max_bytes=4000)
    assert len(bodies) >= 4 and all(len(b) < 4000 + 1000 for b in bodies)
    for i, body in enumerate(bodies[:-1]):
        status, answer = post(sidecar, body)
        assert (status, answer) == (202, {"run_id": run.run_id, "received": i + 1, "parts": len(bodies)})
        assert stored(sidecar, run.run_id) == (0, 0)  # nothing shows before the last part
    status, answer = post(sidecar, bodies[-1])
    assert (status, answer) == (201, {"run_id": run.run_id, "stored": True, "rows": len(run.rows)})
    assert stored(sidecar, run.run_id) == (1, len(run.rows))
    head = sql(sidecar, f"SELECT status, rows_over, ledger_usd, provider_usd, tolerance, scope->>'base_url' AS base "
                        f"FROM reconciliations WHERE run_id = '{run.run_id}'")[0]
    assert head == {"status": "drift", "rows_over": 2, "ledger_usd": f"{run.ledger_usd:.12f}",
                    "provider_usd": f"{run.provider_usd:.12f}", "tolerance": "0.005000000000", "base": "http://fake"}
    over = sql(sidecar, f"SELECT width, bucket, model, ledger_requests, provider_requests, ledger_usd, cause "
                        f"FROM reconciliation_rows WHERE run_id = '{run.run_id}' AND cause IS NOT NULL ORDER BY width")
    assert [(r["width"], r["model"], r["ledger_requests"], r["provider_requests"], r["cause"]) for r in over] == [
        ("1d", "gpt-4o-2024-08-06", 71, 72, "missing_calls"), ("1h", "gpt-4o-2024-08-06", 2, 3, "missing_calls")]
    assert Decimal(over[0]["ledger_usd"]) == Decimal("0.24")  # 24 hourly cents, exact

    # the same run again is refused, not stored twice
    for body in bodies:
        status, answer = post(sidecar, body)
    assert status == 400 and answer["error"] == f"run {run.run_id} is stored already"
    assert stored(sidecar, run.run_id) == (1, len(run.rows))


def test_the_cli_hands_a_large_run_over_in_parts(sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import cli_reconcile
    from sidecar.cli import _Client

    monkeypatch.setattr(reconcile_store, "PART_BYTES", 5000)
    run = a_run(72)
    said = cli_reconcile._store_via_sidecar(_Client(sidecar.url, TOKEN), run)
    count = len(reconcile.parts(run))
    assert count >= 5 and said == (f"stored through the sidecar at {sidecar.url} (tables reconciliations, "
                                   f"reconciliation_rows; {count} parts)")
    assert stored(sidecar, run.run_id) == (1, len(run.rows))
    # with the wrong token it says why it was not stored, in one line
    again = a_run(2)
    said = cli_reconcile._store_via_sidecar(_Client(sidecar.url, "wrong"), again)
    assert said.startswith("not stored: missing or wrong admin token") and "\n" not in said
    assert stored(sidecar, again.run_id) == (0, 0)


def test_a_part_out_of_order_drops_the_upload(sidecar: Sidecar) -> None:
    run = a_run(24)
    bodies = reconcile.parts(run, max_bytes=3000)
    assert post(sidecar, bodies[0])[0] == 202
    status, answer = post(sidecar, bodies[2])
    assert status == 400 and "part 2" in answer["error"] and "part 1 was due" in answer["error"]
    status, answer = post(sidecar, bodies[-1])  # the upload is gone: its last part alone does not store it
    assert status == 400 and "part 0 was due" in answer["error"] and stored(sidecar, run.run_id) == (0, 0)
    for body in bodies:  # sent again from the start, it is stored
        status, answer = post(sidecar, body)
    assert status == 201 and stored(sidecar, run.run_id) == (1, len(run.rows))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["rows"][0].__setitem__(d["columns"].index("ledger_usd"), 0.1),
     "rows[0].ledger_usd: expected a decimal number as a string"),
    (lambda d: d["columns"].__setitem__(0, "drop_table"), "columns: expected distinct column names"),
    (lambda d: d["run"].__setitem__("status", "fine"), "run.status: expected ok or drift"),
    (lambda d: d["run"].__setitem__("ran_at", "2026-11-20T00:00:00"), "run.ran_at: expected an RFC 3339 time"),
    (lambda d: d.__setitem__("run_id", "x'; DROP TABLE calls; --"), "run_id: expected 1 to 64 letters"),
    (lambda d: d["rows"][0].__setitem__(d["columns"].index("ledger_requests"), "3"),
     "rows[0].ledger_requests: expected a whole number"),
])
def test_a_part_with_a_bad_value_is_refused_naming_it(sidecar: Sidecar, change: Any, message: str) -> None:
    run = a_run(2)
    (body,) = reconcile.parts(run)
    doc = orjson.loads(body)
    change(doc)
    status, answer = post(sidecar, orjson.dumps(doc))
    assert status == 400 and answer["error"].startswith(message), answer
    assert stored(sidecar, run.run_id) == (0, 0)


def test_the_admin_token_and_the_sites_rules_hold(sidecar: Sidecar) -> None:
    run = a_run(2)
    (body,) = reconcile.parts(run)
    status, answer = post(sidecar, body, {"content-type": "application/json"})
    assert status == 401
    status, answer = post(sidecar, body, {"content-type": "application/json", "x-meterline-admin-token": "wrong"})
    assert status == 401
    # a page elsewhere, even with the token (a browser holding it), and a body not typed as JSON
    status, answer = post(sidecar, body, {"content-type": "application/json", "x-meterline-admin-token": TOKEN,
                                          "origin": "https://evil.example"})
    assert status == 403 and "another site" in answer["error"]
    status, answer = post(sidecar, body, {"content-type": "text/plain", "x-meterline-admin-token": TOKEN})
    assert status == 415
    assert stored(sidecar, run.run_id) == (0, 0)
    assert post(sidecar, body)[0] == 201


def test_a_ledger_with_the_first_shape_of_the_table_gains_the_new_columns(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "old.duckdb"))
    first = ", ".join(f"{side}_{m} {'DECIMAL(38, 12)' if m == 'usd' else 'BIGINT'}"
                      for m in ("requests", "uncached_input", "cache_read", "cache_write", "output", "usd")
                      for side in ("ledger", "provider"))
    con.execute(f"CREATE TABLE reconciliation_rows (run_id VARCHAR, bucket TIMESTAMPTZ, width VARCHAR, model VARCHAR, "
                f"{first}, unpriced_calls BIGINT, max_drift DECIMAL(38, 12), cause VARCHAR)")
    run = a_run(2)
    reconcile.store(con, run)
    columns = [r[0] for r in con.execute("DESCRIBE reconciliation_rows").fetchall()]
    assert columns == [*reconcile_store.ROW_COLUMNS, *reconcile_store.INSTANCE]
    assert con.execute("SELECT count(*) FROM reconciliation_rows").fetchone() == (len(run.rows),)
    con.close()
