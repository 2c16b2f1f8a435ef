"""Read-only SQL over the ledger: one SELECT at a time, no file access, results as plain rows."""
from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

READ_ONLY_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})
from .defaults import MAX_EXPORT_ROWS, MAX_ROWS  # noqa: E402,F401 - the endpoint's limits, for the forwarder too


class QueryRefused(ValueError):
    """The statement is not a single read-only query."""


class QueryInterrupted(RuntimeError):
    """The query was stopped before it finished (the reason is the message)."""


class Handle:
    """One query's cursor, so another thread can stop it: `interrupt` works before, during and after it runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self.reason: str | None = None

    def attach(self, cursor: duckdb.DuckDBPyConnection) -> None:
        with self._lock:
            self._cursor = cursor
            if self.reason is not None:
                raise QueryInterrupted(self.reason)

    def detach(self) -> None:
        with self._lock:
            self._cursor = None

    def interrupt(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            if self._cursor is not None:
                self._cursor.interrupt()


@dataclass(slots=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False


def check(con: duckdb.DuckDBPyConnection, query: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryRefused(str(e)) from None
    if len(statements) != 1:
        raise QueryRefused(f"exactly one statement is allowed, got {len(statements)}")
    kind = statements[0].type
    if kind not in READ_ONLY_STATEMENTS:
        raise QueryRefused(f"only SELECT queries are allowed, not {kind.name}")


def run(con: duckdb.DuckDBPyConnection, query: str, max_rows: int | None = MAX_ROWS,
        handle: Handle | None = None) -> Result:
    """Runs one read-only query on a cursor of its own (call from a worker thread, never the loop).
    max_rows None: every row. `handle.interrupt()` from another thread stops it (QueryInterrupted)."""
    check(con, query)
    cur = con.cursor()
    try:
        if handle is not None:
            handle.attach(cur)
        # a read-only transaction: even a statement that slipped past `check` cannot write
        cur.execute("BEGIN TRANSACTION READ ONLY")
        columns, rows = _fetch(cur, query, None if max_rows is None else max_rows + 1)
        cur.execute("ROLLBACK")
    except duckdb.InterruptException:
        raise QueryInterrupted(handle.reason if handle is not None and handle.reason else "interrupted") from None
    finally:
        if handle is not None:
            handle.detach()
        cur.close()
    if max_rows is None:
        return Result(columns, rows)
    return Result(columns, rows[:max_rows], truncated=len(rows) > max_rows)


def _fetch(cur: duckdb.DuckDBPyConnection, query: str,
           limit: int | None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Up to `limit` rows, read through Arrow: DuckDB's own conversion of TIMESTAMPTZ to Python needs
    pytz (not a dependency of ours); Arrow's uses zoneinfo. Values come back as DuckDB's own
    conversion gives them: MAPs as dicts, whole numbers (HUGEINT sums) as ints."""
    reader = cur.sql(query).to_arrow_reader(2048 if limit is None else min(limit, 2048))
    schema = reader.schema
    columns = list(schema.names)
    convert = {i: _to_python(f.type) for i, f in enumerate(schema) if _to_python(f.type) is not None}
    rows: list[tuple[Any, ...]] = []
    for batch in reader:
        values = [col.to_pylist() for col in batch.columns]
        for i, fn in convert.items():
            values[i] = [None if v is None else fn(v) for v in values[i]]
        rows.extend(zip(*values))
        if limit is not None and len(rows) >= limit:
            return columns, rows[:limit]
    return columns, rows


def _to_python(kind: pa.DataType) -> Any:
    if pa.types.is_map(kind):
        return dict
    if pa.types.is_decimal(kind) and kind.scale == 0:
        return int  # HUGEINT (e.g. sum of a BIGINT) travels as DECIMAL(38, 0)
    return None


def open_file(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Opens a ledger file directly (no sidecar running), read-only and without file access."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no ledger at {path}")
    return duckdb.connect(str(path), read_only=True,
                          config={"enable_external_access": False, "lock_configuration": True})


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: money never passes through a float
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def to_json(result: Result) -> bytes:
    return orjson.dumps({"columns": result.columns, "rows": result.rows, "truncated": result.truncated},
                        default=_plain)


def from_json(payload: bytes) -> Result:
    doc = orjson.loads(payload)
    return Result(doc["columns"], [tuple(r) for r in doc["rows"]], doc.get("truncated", False))


def render(result: Result, fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps([dict(zip(result.columns, row)) for row in result.rows], default=_plain,
                            option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(result.columns)
        writer.writerows([[_cell(v) for v in row] for row in result.rows])
        return out.getvalue()
    return _table(result)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return orjson.dumps(value, default=_plain).decode()
    return str(_plain(value))


def _table(result: Result) -> str:
    cells = [[_cell(v) if v is not None else "NULL" for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(result.columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(result.columns, widths)) + " |", line]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    out.append(line)
    note = f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
    out.append(note + (", truncated)" if result.truncated else ")"))
    return "\n".join(out)
