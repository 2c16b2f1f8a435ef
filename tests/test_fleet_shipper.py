"""The fleet ledger's shipper and schema on a real PostgreSQL, driven directly (no sidecar process):
values cross exactly, partitions appear for any month, a batch shipped again (a crash between the
Postgres commit and the cursor's move) is not doubled, and a URL's password shows nowhere."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleet import postgres_schema as pgs
from fleet.postgres_shipper import Shipper, ShipperSettings
from fleet.urls import redact, scrub
from ledger.writer import LedgerWriter
from sidecar import config as config_mod
from tests.fleet_servers import PG_PASSWORD
from tests.test_journal import record


@pytest.fixture
def writer(tmp_path: Path) -> Any:
    w = LedgerWriter(tmp_path / "ledger.duckdb")
    w.instance = "unit-1"
    w.open()
    yield w
    w.stop()


def write(w: LedgerWriter, *records: Any) -> None:
    assert w.catch_up([(r, None, None) for r in records]) == len(records)


def rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as con:
        cur = con.execute(query)
        return cur.fetchall() if cur.description else []


def shipper(w: LedgerWriter, url: str) -> Shipper:
    s = Shipper(ShipperSettings(url, batch_rows=3), w.cursor)
    s.open()
    return s


def test_values_cross_exactly_into_monthly_partitions(writer: LedgerWriter, postgres_url: str) -> None:
    old = datetime(2020, 2, 29, 23, 59, 59, 999999, tzinfo=timezone.utc)
    write(writer, record("a"), record("b", started_at=old, ended_at=None, cost_usd=None, input_cost_usd=None,
                                        output_cost_usd=None, tags={}, units=None, instance="older"),
          record("c", cost_usd=Decimal("12345678901234567890.123456789012"), tags={"k": "v", "ü": "é'\""}))
    s = shipper(writer, postgres_url)
    assert s.backlog_rows == 3 and s.lag_s > 0
    assert s.ship_pending() == 3
    s._measure()
    assert s.backlog_rows == 0 and s.up and s.last_error is None
    got = {r[0]: r[1:] for r in rows(postgres_url, "SELECT call_id, started_at, ended_at, cost_usd, tags, units, "
                                                   "instance, stream, duration_ms FROM calls")}
    a = record("a")
    assert got["a"] == (a.started_at, a.ended_at, a.cost_usd, a.tags, a.units, "unit-1", True, 877.5)
    assert got["b"][:6] == (old, None, None, {}, None, "older")
    assert got["c"][2] == Decimal("12345678901234567890.123456789012") and got["c"][3] == {"k": "v", "ü": "é'\""}
    parts = {r[0] for r in rows(postgres_url, "SELECT inhrelid::regclass::text FROM pg_inherits "
                                              "WHERE inhparent = 'calls'::regclass")}
    assert {"calls_y2020m02", "calls_y2026m11"} <= parts
    s.stop()


def test_a_batch_shipped_again_is_not_doubled(writer: LedgerWriter, postgres_url: str, postgres_server: Any) -> None:
    write(writer, *[record(f"r{i}") for i in range(7)])
    s = shipper(writer, postgres_url)
    assert s.ship_pending() == 7
    # killed after Postgres committed, before the cursor moved: everything is sent again
    cur = writer.cursor()
    cur.execute("DELETE FROM fleet_cursor")
    cur.close()
    assert s.ship_pending() == 7
    assert rows(postgres_url, "SELECT count(*), count(DISTINCT call_id) FROM calls") == [(7, 7)]
    # another fleet ledger (a new URL) has a cursor of its own and gets every row
    other = postgres_server.create_database()
    s2 = shipper(writer, other)
    assert s2.ship_pending() == 7 and rows(other, "SELECT count(*) FROM calls") == [(7,)]
    cur = writer.cursor()
    targets = cur.execute("SELECT target FROM fleet_cursor").fetchall()
    cur.close()
    assert len(targets) == 2 and not any(PG_PASSWORD in t for (t,) in targets)
    s.stop()
    s2.stop()


def test_schema_is_versioned_and_gains_missing_columns(writer: LedgerWriter, postgres_url: str) -> None:
    write(writer, record("m1"))
    s = shipper(writer, postgres_url)
    s.ship_pending()
    s.stop()
    # a fleet ledger made before a column existed: meterline adds it when it connects
    rows(postgres_url, "DROP VIEW spend_daily, spend_by_model, spend_by_tag")
    rows(postgres_url, "ALTER TABLE calls DROP COLUMN service_tier")
    write(writer, record("m2"))
    s = shipper(writer, postgres_url)
    assert s.ship_pending() == 1
    assert rows(postgres_url, "SELECT call_id, service_tier FROM calls ORDER BY 1") == [("m1", None), ("m2", "default")]
    assert rows(postgres_url, "SELECT max(version) FROM meterline_schema") == [(pgs.VERSION,)]
    assert rows(postgres_url, "SELECT calls FROM spend_by_model") == [(2,)]
    s.stop()


def test_a_failing_fleet_ledger_is_reported_without_its_password(writer: LedgerWriter, postgres_url: str) -> None:
    write(writer, record("p1"))
    wrong = postgres_url.replace(PG_PASSWORD, "wr0ng-" + PG_PASSWORD)
    s = Shipper(ShipperSettings(wrong, connect_timeout_s=2), writer.cursor)
    s.open()
    with pytest.raises(psycopg.OperationalError) as caught:
        s.ship_pending()
    s._failed(caught.value)
    health = repr(s.health())
    assert not s.up and "password authentication failed" in s.last_error
    assert PG_PASSWORD not in health and "wr0ng" not in health and s.backlog_rows == 1


def test_urls_are_shown_without_their_secrets() -> None:
    url = "postgresql://me:p%40ss:w0rd@db.internal:5432/ledger?sslmode=require&password=other"
    shown = redact(url)
    assert shown == "postgresql://me:***@db.internal:5432/ledger?sslmode=require&password=***"
    assert scrub(f"failed for {url} with p@ss:w0rd and other", url) == f"failed for {shown} with *** and ***"
    assert redact("redis://redis:6379/0") == "redis://redis:6379/0"
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse({"fleet": {"postgres": "mysql://me:hunter2@db/ledger"}})
    assert "fleet.postgres" in str(e.value) and "hunter2" not in str(e.value)
    with pytest.raises(config_mod.ConfigError, match="fleet.postgres.*NOT_SET_ANYWHERE"):
        config_mod.parse({"fleet": {"postgres": "${NOT_SET_ANYWHERE}"}})
    with pytest.raises(config_mod.ConfigError, match="unknown config key 'fleet.nope'"):
        config_mod.parse({"fleet": {"nope": 1}})
    cfg = config_mod.parse({})
    assert cfg.fleet.postgres is None and cfg.fleet.instance  # the host name
    assert dataclasses.fields(config_mod.FleetConfig)


# --- every table that carries rows (issue 14's follow-up) --------------------------------------------

def _job(event: str, state: str, at_s: int, **more: Any) -> Any:
    from jobs.model import JobEvent

    return JobEvent(event, "job-1", "veo", "op-1", state, datetime(2026, 11, 26, 3, 0, at_s, tzinfo=timezone.utc),
                    provider="gemini", model="veo-3", **more)


def _apply(w: LedgerWriter, *events: Any) -> None:
    from jobs import store as job_store

    cur = w.cursor()
    try:
        job_store.apply_job_events(cur, list(events), None, w.instance)
    finally:
        cur.close()


def test_every_table_ships_once_with_its_instance(writer: LedgerWriter, postgres_url: str,
                                                  postgres_server: Any) -> None:
    from jobs import reconcile_store
    from ledger import budget_store
    from ledger.budgets import CrossingNote
    from ledger.records import Attempt, CallExtras

    at = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
    tries = [Attempt("routed", 1, "openai", "openai", "gpt-4o-mini", at, status_code=429, outcome="error"),
             Attempt("routed", 2, "backup", "openai", "gpt-4o", at, status_code=200, cost_usd=Decimal("0.000123"))]
    assert writer.catch_up([(record("routed"), None, CallExtras(attempts=tries))]) == 1
    _apply(writer, _job("submit", "submitted", 1, call_id="routed", estimate_usd=Decimal("0.50"),
                        units_asked={"seconds": 8}))
    cur = writer.cursor()
    note = CrossingNote("r", None, "", "day", at, Decimal("0.8"), Decimal("0.81234567"), at, Decimal("8.1"),
                        Decimal("10"), 0, None, 1, None, "alert", "")
    budget_store.save_alert(cur, note, "routed", writer.instance)
    budget_store.save_topup(cur, "r", "", Decimal("2.5"), at, writer.instance)
    reconcile_store.create(cur)
    reconcile_store.insert(cur, {"run_id": "run-1", "ran_at": at, "provider": "openai", "since": at, "until": at,
                                 "status": "ok", "ledger_usd": Decimal("1.000000000001")},
                           [{"bucket": at, "width": "1h", "model": "gpt-4o", "ledger_usd": Decimal("1.000000000001")}],
                           writer.instance)
    cur.close()
    s = shipper(writer, postgres_url)
    assert s.backlog_rows == 8
    assert s.ship_pending() == 8
    _apply(writer, _job("poll", "running", 2))
    # Postgres stops with a change waiting: it waits in the ledger, and arrives once Postgres is back
    postgres_server.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            s._close()
            s.ship_pending()
        _apply(writer, _job("settle", "succeeded", 3, cost_usd=Decimal("0.400000000001"), cost_source="provider",
                            units_made={"seconds": 8}))
    finally:
        postgres_server.start()
    s._measure()
    assert s.backlog_rows == 1  # one row of jobs, changed twice
    assert s.ship_pending() == 1
    # killed after Postgres committed, before the cursors moved: every table is sent again
    cur = writer.cursor()
    cur.execute("DELETE FROM fleet_cursor")
    cur.close()
    assert s.ship_pending() == 8
    one = {t.name: rows(postgres_url, f'SELECT count(*), count(DISTINCT instance), min(instance) FROM "{t.name}"')[0]
           for t in pgs.SHIPPED}
    assert one == {"calls": (1, 1, "unit-1"), "attempts": (2, 1, "unit-1"), "jobs": (1, 1, "unit-1"),
                   "alerts": (1, 1, "unit-1"), "budget_topups": (1, 1, "unit-1"),
                   "reconciliations": (1, 1, "unit-1"), "reconciliation_rows": (1, 1, "unit-1")}
    assert rows(postgres_url, "SELECT attempt, upstream, status_code, cost_usd FROM attempts ORDER BY 1") == [
        (1, "openai", 429, None), (2, "backup", 200, Decimal("0.000123"))]
    assert rows(postgres_url, "SELECT state, cost_usd, cost_source, units_made, estimate_usd, settled_at IS NOT NULL "
                              "FROM jobs") == [("succeeded", Decimal("0.400000000001"), "provider", {"seconds": 8},
                                                Decimal("0.5"), True)]
    assert rows(postgres_url, "SELECT utilization, limit_usd FROM alerts") == [(Decimal("0.812346"), Decimal("10"))]
    assert rows(postgres_url, "SELECT amount_usd FROM budget_topups") == [(Decimal("2.5"),)]
    assert rows(postgres_url, "SELECT r.ledger_usd, w.ledger_usd FROM reconciliations r "
                              "JOIN reconciliation_rows w USING (run_id)") == [(Decimal("1.000000000001"),) * 2]
    # an older copy of a job's row never overwrites a newer one (only a higher change_seq does)
    rows(postgres_url, "UPDATE jobs SET change_seq = change_seq + 100, state = 'newer'")
    cur = writer.cursor()
    cur.execute("DELETE FROM fleet_cursor WHERE tbl = 'jobs'")
    cur.close()
    assert s.ship_pending() == 1
    assert rows(postgres_url, "SELECT state FROM jobs") == [("newer",)]
    s.stop()


def test_a_version_1_fleet_ledger_gains_the_other_tables(writer: LedgerWriter, postgres_url: str) -> None:
    s = shipper(writer, postgres_url)
    s.ship_pending()
    s.stop()
    rows(postgres_url, "DROP TABLE attempts, jobs, alerts, budget_topups, reconciliations, reconciliation_rows")
    rows(postgres_url, "DELETE FROM meterline_schema WHERE version > 1")
    _apply(writer, _job("submit", "submitted", 1))
    s = shipper(writer, postgres_url)
    assert s.ship_pending() == 1
    assert rows(postgres_url, "SELECT job_id, instance FROM jobs") == [("job-1", "unit-1")]
    assert rows(postgres_url, "SELECT max(version) FROM meterline_schema") == [(pgs.VERSION,)]
    s.stop()


def test_an_older_ledger_gains_instance_ids_and_change_order(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE jobs (job_id VARCHAR PRIMARY KEY, call_id VARCHAR, upstream VARCHAR, provider VARCHAR, "
                "model VARCHAR, provider_job_id VARCHAR, state VARCHAR, submitted_at TIMESTAMPTZ, updated_at TIMESTAMPTZ, "
                "settled_at TIMESTAMPTZ, units_asked JSON, units_made JSON, estimate_usd DECIMAL(38, 12), "
                "cost_usd DECIMAL(38, 12), cost_source VARCHAR, output_file_id VARCHAR, polls INTEGER DEFAULT 0)")
    con.execute("INSERT INTO jobs (job_id, state) VALUES ('a', 'running'), ('b', 'running')")
    con.execute("CREATE TABLE alerts (fired_at TIMESTAMPTZ NOT NULL, rule VARCHAR NOT NULL, split_key VARCHAR, "
                "window_start TIMESTAMPTZ NOT NULL, threshold DECIMAL(6, 3) NOT NULL, utilization DECIMAL(18, 6) NOT NULL, "
                "spent_usd DECIMAL(38, 12), limit_usd DECIMAL(38, 12), action VARCHAR, call_id VARCHAR)")
    con.execute("INSERT INTO alerts VALUES (now(), 'r', NULL, now(), 0.5, 0.5, 1, 2, 'alert', NULL)")
    con.close()
    w = LedgerWriter(path)
    w.open()
    cur = w.cursor()
    assert cur.execute("SELECT job_id, change_seq FROM jobs ORDER BY 1").fetchall() == [("a", 1), ("b", 2)]
    assert cur.execute("SELECT count(alert_id), count(instance) FROM alerts").fetchall() == [(1, 0)]
    cur.close()
    w.stop()
