"""The fleet ledger's Postgres schema: the shipped tables (declared once, from the DuckDB columns), monthly
partitions, the spend views, and `meterline_schema`, the version table that migrations advance.

Every sidecar of a fleet runs `migrate` when it connects; an advisory lock makes them take turns, so
two starting at once neither fail nor apply a step twice. A column the DuckDB ledger gains later
(a new CallRecord field) is added here too, by the same comparison `ledger/schema.py` makes.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from jobs import reconcile_store as rs
from ledger import attempt_rows, budget_store
from ledger import schema as duck

# one lock id for every meterline schema change (pg_advisory_xact_lock takes a bigint)
LOCK_ID = 0x6D657465726C6E  # "meterln"
VERSION = 2  # what this code's MIGRATIONS bring a database to


@dataclass(frozen=True, slots=True)
class ShippedTable:
    """A DuckDB ledger table whose rows go to Postgres. `key` makes a row unique fleet-wide (for a
    partitioned table it holds the partition column, as Postgres requires of its keys).

    An append-only table (`cursor` "rowid": its rows never change after insert, and one writer thread
    appends them, so rowids grow in commit order) is inserted ON CONFLICT DO NOTHING. A table whose rows
    change (jobs) names a column that grows with every change, in commit order, as `cursor`: its rows
    are upserted, ON CONFLICT DO UPDATE only when the shipped row is newer by that column."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (name, DuckDB type), in the DuckDB table's order
    key: tuple[str, ...]
    partition_by: str | None = None  # a TIMESTAMPTZ column: the table is partitioned by its month (calls only)
    cursor: str = "rowid"  # "rowid", or the change column of a table whose rows change
    at: str | None = None  # a TIMESTAMPTZ column telling how old a row waiting to ship is (lag)

    @property
    def upsert(self) -> bool:
        return self.cursor != "rowid"


def _cols(pairs: Any) -> tuple[tuple[str, str], ...]:
    return tuple((name, sql) for name, sql, *_ in pairs)


def _shipped() -> tuple[ShippedTable, ...]:
    return (
        ShippedTable("calls", _cols(duck.COLUMNS), ("call_id", "started_at"), "started_at", at="started_at"),
        ShippedTable("attempts", _cols(attempt_rows.COLUMNS), ("call_id", "attempt"), at="started_at"),
        ShippedTable("jobs", _cols(duck.JOB_COLUMNS), ("job_id",), cursor="change_seq", at="updated_at"),
        ShippedTable("alerts", _cols(budget_store.ALERT_COLUMNS), ("alert_id",), at="fired_at"),
        ShippedTable("budget_topups", _cols(budget_store.TOPUP_COLUMNS), ("topup_id",), at="topped_at"),
        ShippedTable("reconciliations", _cols({**rs.RUN_COLUMNS, **rs.INSTANCE}.items()), ("run_id",), at="ran_at"),
        ShippedTable("reconciliation_rows", _cols({**rs.ROW_COLUMNS, **rs.INSTANCE}.items()),
                     ("run_id", "bucket", "width", "model")),
    )


# Which tables are shipped, and by what key (docs/fleet.md lists them). Another ledger table that
# carries rows adds a line here and a MIGRATIONS step creating it.
SHIPPED: tuple[ShippedTable, ...] = _shipped()
BY_NAME = {t.name: t for t in SHIPPED}


def pg_type(duckdb_type: str) -> str:
    """The Postgres type for a DuckDB column type: money stays NUMERIC, maps and JSON become jsonb."""
    t = duckdb_type.upper()
    if t.startswith("DECIMAL"):
        return t.replace("DECIMAL", "NUMERIC")
    if t.startswith("MAP") or t == "JSON":
        return "jsonb"
    return {"VARCHAR": "text", "TIMESTAMPTZ": "timestamptz", "DOUBLE": "double precision", "BOOLEAN": "boolean",
            "INTEGER": "integer", "BIGINT": "bigint"}[t]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create_table(table: ShippedTable) -> str:
    cols = ",\n  ".join(f"{_q(n)} {pg_type(t)}" for n, t in table.columns)
    partition = f" PARTITION BY RANGE ({_q(table.partition_by)})" if table.partition_by else ""
    return (f"CREATE TABLE IF NOT EXISTS {_q(table.name)} (\n  {cols},\n  PRIMARY KEY ({', '.join(map(_q, table.key))})"
            f"\n){partition}")


# The same views as the DuckDB ledger (ledger/schema.py VIEWS), in Postgres's dialect
VIEWS = {
    "spend_daily": """
        SELECT CAST(started_at AT TIME ZONE 'UTC' AS date) AS day, app, provider,
               count(*) AS calls,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(cost_usd) AS cost_usd,
               count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked') AS unpriced_calls
        FROM calls GROUP BY 1, 2, 3""",
    "spend_by_model": """
        SELECT provider, coalesce(response_model, request_model) AS model, count(*) AS calls,
               sum(input_tokens) AS input_tokens, sum(cache_read_tokens) AS cache_read_tokens,
               sum(cache_write_tokens) AS cache_write_tokens, sum(output_tokens) AS output_tokens,
               sum(reasoning_tokens) AS reasoning_tokens, sum(cost_usd) AS cost_usd,
               count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked') AS unpriced_calls
        FROM calls GROUP BY 1, 2""",
    "spend_by_tag": """
        SELECT t.key AS tag, t.value AS value, count(*) AS calls,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(cost_usd) AS cost_usd
        FROM calls, jsonb_each_text(coalesce(tags, '{}'::jsonb)) AS t(key, value) GROUP BY 1, 2""",
}

# version -> statements; a database at version N gets every step above N, in order, in one transaction
MIGRATIONS: dict[int, list[str]] = {
    1: [create_table(BY_NAME["calls"])],
    # every other table that carries rows (issue 14's follow-up); `instance` on calls came with version 1
    2: [create_table(t) for t in SHIPPED if t.name != "calls"],
}


def migrate(con: Any) -> int:
    """Brings the database to VERSION (a psycopg connection, not in autocommit). Returns the version it
    found. Columns added to the DuckDB tables since are added here; the views are made again."""
    with con.transaction():
        con.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_ID])
        con.execute("CREATE TABLE IF NOT EXISTS meterline_schema (version integer PRIMARY KEY, "
                    "applied_at timestamptz NOT NULL DEFAULT now())")
        found = con.execute("SELECT coalesce(max(version), 0) FROM meterline_schema").fetchone()[0]
        if found > VERSION:
            raise RuntimeError(f"the fleet ledger is at schema version {found}, newer than this meterline "
                               f"knows ({VERSION}): upgrade this sidecar")
        for version in range(found + 1, VERSION + 1):
            for statement in MIGRATIONS[version]:
                con.execute(statement)
            con.execute("INSERT INTO meterline_schema (version) VALUES (%s)", [version])
        for table in SHIPPED:
            have = {r[0] for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = %s", [table.name]).fetchall()}
            for name, sql_type in table.columns:
                if name not in have:
                    con.execute(f"ALTER TABLE {_q(table.name)} ADD COLUMN {_q(name)} {pg_type(sql_type)}")
        for name, body in VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {_q(name)} AS {body}")
        now = datetime.now(timezone.utc)
        for table in SHIPPED:  # this month and the next exist before any row needs them
            if table.partition_by is None:
                continue
            for month in (_month(now), _next(_month(now))):
                _create_partition(con, table, month)
    return found


def ensure_partitions(con: Any, table: ShippedTable, months: set[tuple[int, int]], known: set[Any]) -> None:
    """Creates the monthly partitions of `table` for `months` ((year, month) pairs) not in `known` (a set
    the caller keeps per connection, so the common case costs nothing), inside the caller's transaction."""
    missing = sorted(m for m in months if (table.name, m) not in known)
    if not missing:
        return
    con.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_ID])
    for month in missing:
        _create_partition(con, table, month)
        known.add((table.name, month))


def partition_name(table: ShippedTable, month: tuple[int, int]) -> str:
    return f"{table.name}_y{month[0]:04d}m{month[1]:02d}"


def _create_partition(con: Any, table: ShippedTable, month: tuple[int, int]) -> None:
    start = datetime(month[0], month[1], 1, tzinfo=timezone.utc)
    end_y, end_m = _next(month)
    end = datetime(end_y, end_m, 1, tzinfo=timezone.utc)
    con.execute(f"CREATE TABLE IF NOT EXISTS {_q(partition_name(table, month))} PARTITION OF {_q(table.name)} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')")


def _month(at: datetime) -> tuple[int, int]:
    return at.year, at.month


def _next(month: tuple[int, int]) -> tuple[int, int]:
    return (month[0] + 1, 1) if month[1] == 12 else (month[0], month[1] + 1)
