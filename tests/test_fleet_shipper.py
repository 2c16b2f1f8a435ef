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
    assert rows(postgres_url, "SELECT version FROM meterline_schema") == [(pgs.VERSION,)]
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
