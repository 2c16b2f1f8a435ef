"""The ledger's DuckDB schema: the `calls` table, its Arrow twin for batch inserts, and the spend views."""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import orjson
import pyarrow as pa

from . import attempt_rows
from .columns import MONEY, USAGE_AND_COST
from .records import CallRecord


# (column, DuckDB type, Arrow type), in CallRecord's field order
COLUMNS: list[tuple[str, str, pa.DataType]] = [
    ("call_id", "VARCHAR", pa.string()),
    ("started_at", "TIMESTAMPTZ", pa.timestamp("us", tz="UTC")),
    ("ended_at", "TIMESTAMPTZ", pa.timestamp("us", tz="UTC")),
    ("duration_ms", "DOUBLE", pa.float64()),
    ("ttft_ms", "DOUBLE", pa.float64()),
    ("overhead_ms", "DOUBLE", pa.float64()),
    ("app", "VARCHAR", pa.string()),
    ("upstream", "VARCHAR", pa.string()),
    ("provider", "VARCHAR", pa.string()),
    ("operation", "VARCHAR", pa.string()),
    ("endpoint", "VARCHAR", pa.string()),
    ("request_model", "VARCHAR", pa.string()),
    ("response_model", "VARCHAR", pa.string()),
    ("response_id", "VARCHAR", pa.string()),
    ("stream", "BOOLEAN", pa.bool_()),
    ("status_code", "INTEGER", pa.int32()),
    ("outcome", "VARCHAR", pa.string()),
    ("error_type", "VARCHAR", pa.string()),
    ("finish_reason", "VARCHAR", pa.string()),
    *USAGE_AND_COST,
    ("user_id", "VARCHAR", pa.string()),
    ("key_fingerprint", "VARCHAR", pa.string()),
    ("tags", "MAP(VARCHAR, VARCHAR)", pa.map_(pa.string(), pa.string())),
    ("trace_id", "VARCHAR", pa.string()),
    ("span_id", "VARCHAR", pa.string()),
    ("request_bytes", "BIGINT", pa.int64()),
    ("response_bytes", "BIGINT", pa.int64()),
    ("anomaly", "VARCHAR", pa.string()),
    ("service_tier", "VARCHAR", pa.string()),
    ("instance", "VARCHAR", pa.string()),
    # routes (see ledger/attempt_rows.py for the `attempts` table)
    ("route", "VARCHAR", pa.string()),
    ("attempts", "INTEGER", pa.int32()),
    ("served_by", "VARCHAR", pa.string()),
    ("arm", "VARCHAR", pa.string()),
    # One API (sidecar/oneapi): the format the app spoke and the upstream's; None for direct calls
    ("client_format", "VARCHAR", pa.string()),
    ("upstream_format", "VARCHAR", pa.string()),
]
assert [c[0] for c in COLUMNS] == [f.name for f in dataclasses.fields(CallRecord)], "schema and CallRecord drifted"

ARROW_SCHEMA = pa.schema([(name, arrow) for name, _, arrow in COLUMNS])

CREATE_CALLS = "CREATE TABLE IF NOT EXISTS calls (\n  " + ",\n  ".join(
    f"{name} {sql}" for name, sql, _ in COLUMNS) + "\n)"

VIEWS = {
    "spend_daily": """
        SELECT CAST(date_trunc('day', started_at AT TIME ZONE 'UTC') AS DATE) AS day, app, provider,
               count(*) AS calls,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(cost_usd) AS cost_usd,
               count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked') AS unpriced_calls
        FROM calls GROUP BY ALL""",
    "spend_by_model": """
        SELECT provider, coalesce(response_model, request_model) AS model, count(*) AS calls,
               sum(input_tokens) AS input_tokens, sum(cache_read_tokens) AS cache_read_tokens,
               sum(cache_write_tokens) AS cache_write_tokens, sum(output_tokens) AS output_tokens,
               sum(reasoning_tokens) AS reasoning_tokens, sum(cost_usd) AS cost_usd,
               count(*) FILTER (WHERE cost_usd IS NULL AND outcome <> 'blocked') AS unpriced_calls
        FROM calls GROUP BY ALL""",
    "spend_by_tag": """
        SELECT entry.key AS tag, entry.value AS value, count(*) AS calls,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(cost_usd) AS cost_usd
        FROM calls, unnest(map_entries(tags)) AS t(entry) GROUP BY ALL""",
}


CREATE_META = "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)"
# records the ledger refused and journal lines replay could not read, kept to be looked at
# (source: writer or journal; data: the record as JSON, or the raw line)
CREATE_REJECTED = ("CREATE TABLE IF NOT EXISTS rejected "
                   "(rejected_at TIMESTAMPTZ, source VARCHAR, reason VARCHAR, data VARCHAR)")


# --- async media jobs (jobs/): one row per job, upserted by the sinks process from job events -------
# state: submitted, running, succeeded, failed, cancelled, expired, unknown; cost_source: provider,
# price, estimate. A row with settled_at NULL still holds a budget reservation of estimate_usd.
# (column, DuckDB type), in the table's order; `instance` and `change_seq` came later and go last, so a
# migrated table and a new one look alike
JOB_COLUMNS: list[tuple[str, str]] = [
    ("job_id", "VARCHAR"), ("call_id", "VARCHAR"), ("upstream", "VARCHAR"), ("provider", "VARCHAR"),
    ("model", "VARCHAR"), ("provider_job_id", "VARCHAR"), ("state", "VARCHAR"), ("submitted_at", "TIMESTAMPTZ"),
    ("updated_at", "TIMESTAMPTZ"), ("settled_at", "TIMESTAMPTZ"), ("units_asked", "JSON"), ("units_made", "JSON"),
    ("estimate_usd", MONEY), ("cost_usd", MONEY), ("cost_source", "VARCHAR"), ("output_file_id", "VARCHAR"),
    ("polls", "INTEGER"),
    ("instance", "VARCHAR"),  # the sidecar whose ledger holds the job (fleet.instance)
    # grows with every change of the row, in commit order (jobs/store.py): the fleet shipper's cursor
    ("change_seq", "BIGINT"),
]
_JOB_SQL = {"job_id": "VARCHAR PRIMARY KEY", "polls": "INTEGER DEFAULT 0"}
CREATE_JOBS = "CREATE TABLE IF NOT EXISTS jobs (\n  " + ",\n  ".join(
    f"{name} {_JOB_SQL.get(name, sql)}" for name, sql in JOB_COLUMNS) + ")"


def _add_columns(con: Any, table: str, columns: Any) -> None:
    """Adds the columns of `columns` ((name, type, ...) tuples) that `table`, made by an older version, lacks."""
    have = {row[0] for row in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()}
    for name, sql_type, *_ in columns:
        if name not in have:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")


def create(con: Any) -> None:
    con.execute(CREATE_CALLS)
    con.execute(CREATE_JOBS)
    # a ledger made by an older version gains the columns added since (as NULLs for old rows)
    _add_columns(con, "calls", COLUMNS)
    _add_columns(con, "jobs", JOB_COLUMNS)
    # rows of an older version get their place in the change order (so the shipper sees them once)
    con.execute("UPDATE jobs SET change_seq = s.n FROM (SELECT job_id, row_number() OVER (ORDER BY rowid) "
                "+ (SELECT coalesce(max(change_seq), 0) FROM jobs) AS n FROM jobs WHERE change_seq IS NULL) s "
                "WHERE jobs.job_id = s.job_id")
    con.execute(CREATE_META)
    con.execute(CREATE_REJECTED)
    attempt_rows.create(con)
    for name, body in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")


def meta_value(con: Any, key: str, make: Any) -> str:
    """A persistent setting of this ledger (e.g. the key-fingerprint salt), created by `make()` once."""
    row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    if row:
        return row[0]
    value = make()
    con.execute("INSERT INTO meta VALUES (?, ?)", [key, value])
    return value


_NAMES = [name for name, _, _ in COLUMNS]
_ROW = operator.attrgetter(*_NAMES)


def to_arrow(records: list[CallRecord]) -> pa.Table:
    # rows to columns in C (attrgetter, zip): the writer thread holds the GIL for this part
    columns: dict[str, list[Any]] = dict(zip(_NAMES, map(list, zip(*map(_ROW, records))))) if records \
        else {name: [] for name in _NAMES}
    columns["units"] = [orjson.dumps(u).decode() if u else None for u in columns["units"]]
    columns["tags"] = [list(t.items()) if t else [] for t in columns["tags"]]
    return pa.Table.from_pydict(columns, schema=ARROW_SCHEMA)
