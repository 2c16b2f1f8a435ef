"""The `reconciliations` and `reconciliation_rows` tables: their schema, storing a run in one transaction, and the
JSON form in which `meterline reconcile` hands a finished run to a running sidecar, whose sinks process owns the file.

A run crosses as parts of at most PART_BYTES (the sidecar caps /_meterline/ bodies at 1 MiB), each
`{"format": 1, "run_id", "part", "parts", "columns": [...], "rows": [[...], ...]}`, the last one
also carrying `"run": {...}` (the `reconciliations` row). The sinks process holds the parts in
memory and writes the run and all its rows together when the last part arrives: a run is stored
whole or not at all. Values cross as JSON: money and ratios as decimal strings (never floats),
times as RFC 3339 strings, counts as integers; every value is checked against its column.
"""
from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from ledger.columns import MONEY

RATIO = "DECIMAL(38, 12)"
SECONDS = "DECIMAL(38, 3)"
# the compared metrics and their column types, in the order reports show them
METRIC_TYPES = {"requests": "BIGINT", "uncached_input": "BIGINT", "cache_read": "BIGINT", "cache_write": "BIGINT",
                "output": "BIGINT", "images": "BIGINT", "seconds": SECONDS, "usd": MONEY}
METRICS = tuple(METRIC_TYPES)
_FIRST_METRICS = ("requests", "uncached_input", "cache_read", "cache_write", "output", "usd")  # the table's first shape

RUN_COLUMNS = {
    "run_id": "VARCHAR", "ran_at": "TIMESTAMPTZ", "provider": "VARCHAR", "since": "TIMESTAMPTZ",
    "until": "TIMESTAMPTZ", "bucket": "VARCHAR", "tolerance": RATIO, "scope": "JSON", "ledger_usd": MONEY,
    "provider_usd": MONEY, "covered_share": RATIO, "rows_over": "INTEGER", "max_drift": RATIO, "status": "VARCHAR",
}
# set by the sidecar that stores a run (fleet.instance), not by the run's sender; added later, so last
INSTANCE = {"instance": "VARCHAR"}
_SIDES = {f"{side}_{m}": METRIC_TYPES[m] for m in _FIRST_METRICS for side in ("ledger", "provider")}
_ADDED = {f"{side}_{m}": METRIC_TYPES[m] for m in ("images", "seconds") for side in ("ledger", "provider")}
# columns added after the table first shipped go last, so a migrated table and a new one look alike
ROW_COLUMNS = {"run_id": "VARCHAR", "bucket": "TIMESTAMPTZ", "width": "VARCHAR", "model": "VARCHAR", **_SIDES,
               "unpriced_calls": "BIGINT", "max_drift": RATIO, "cause": "VARCHAR", **_ADDED}
_REQUIRED_ROW = ("bucket", "width", "model")

PART_BYTES = 900 * 1024  # under the sidecar's 1 MiB body cap, with room for the header
# rows held in the sinks process for uploads not finished yet, all together (30 days of hourly rows
# for 270 models; a typical run has a few thousand): past it a part is refused, memory stays bounded
MAX_ROWS = 200_000
MAX_UPLOADS = 4  # uploads held at once
UPLOAD_IDLE_S = 300.0  # an upload whose next part does not come within this is dropped
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_TEXT = 1000
_DECIMAL_LIMIT = {MONEY: Decimal("1e26"), SECONDS: Decimal("1e35")}


class Refused(ValueError):
    """A part that is not a valid piece of a run (the message names the field)."""


def create(con: Any) -> None:
    """Creates the tables, or adds the columns a ledger made by an earlier version lacks."""
    cols = ",\n  ".join(f"{name} {kind}{' PRIMARY KEY' if name == 'run_id' else ''}"
                         for name, kind in {**RUN_COLUMNS, **INSTANCE}.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS reconciliations (\n  {cols})")
    cols = ",\n  ".join(f"{name} {kind}" for name, kind in {**ROW_COLUMNS, **INSTANCE}.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS reconciliation_rows (\n  {cols})")
    for name, kind in {**_ADDED, **INSTANCE}.items():
        con.execute(f"ALTER TABLE reconciliation_rows ADD COLUMN IF NOT EXISTS {name} {kind}")
    con.execute("ALTER TABLE reconciliations ADD COLUMN IF NOT EXISTS instance VARCHAR")


def insert(con: Any, run: dict[str, Any], rows: list[dict[str, Any]], instance: str | None = None) -> None:
    """Appends the run and its rows in one transaction (python values: Decimal, datetime, int, str, dict),
    naming `instance` (fleet.instance of the sidecar storing it) on each."""
    create(con)
    con.execute("BEGIN")
    try:
        names = [n for n in run if n != "instance"]
        con.execute(f"INSERT INTO reconciliations ({', '.join(names)}, instance) VALUES ({', '.join('?' * len(names))}, ?)",
                    [orjson.dumps(run[n]).decode() if RUN_COLUMNS[n] == "JSON" else run[n] for n in names] + [instance])
        by_columns: dict[tuple[str, ...], list[list[Any]]] = {}
        for r in rows:
            r = {k: v for k, v in r.items() if k != "instance"}
            by_columns.setdefault(("run_id", *r, "instance"), []).append([run["run_id"], *r.values(), instance])
        for columns, values in by_columns.items():
            con.executemany(f"INSERT INTO reconciliation_rows ({', '.join(columns)}) "
                            f"VALUES ({', '.join('?' * len(columns))})", values)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


# --- the wire form ---------------------------------------------------------------------------

def _out(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return value


def parts(run: dict[str, Any], rows: list[dict[str, Any]], max_bytes: int = PART_BYTES) -> list[bytes]:
    """The run as request bodies of at most about `max_bytes` each (a single row is never split)."""
    columns = [c for c in ROW_COLUMNS if c != "run_id" and any(c in r for r in rows)] or list(_REQUIRED_ROW)
    encoded = [orjson.dumps([_out(r.get(c)) for c in columns]) for r in rows]
    header = orjson.dumps({k: _out(v) for k, v in run.items()})
    chunks: list[list[bytes]] = [[]]
    size = len(header)
    for row in encoded:
        if chunks[-1] and size + len(row) + 1 > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += len(row) + 1
    bodies = []
    for i, chunk in enumerate(chunks):
        doc = b'{"format":1,"run_id":%s,"part":%d,"parts":%d,"columns":%s,"rows":[%s]' % (
            orjson.dumps(run["run_id"]), i, len(chunks), orjson.dumps(columns), b",".join(chunk))
        bodies.append(doc + (b',"run":' + header if i == len(chunks) - 1 else b"") + b"}")
    return bodies


def _value(value: Any, kind: str, where: str) -> Any:
    if value is None:
        return None
    if kind == "VARCHAR":
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            raise Refused(f"{where}: expected a string of at most {_MAX_TEXT} characters")
        return value
    if kind in ("BIGINT", "INTEGER"):
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2 ** 63:
            raise Refused(f"{where}: expected a whole number")
        return value
    if kind == "TIMESTAMPTZ":
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise Refused(f"{where}: expected an RFC 3339 time with its offset")
        return moment.astimezone(timezone.utc)
    if kind == "JSON":
        if not isinstance(value, dict):
            raise Refused(f"{where}: expected an object")
        return value
    # DECIMAL: exact text (or a whole number), never a float
    try:
        amount = Decimal(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite() or abs(amount) >= _DECIMAL_LIMIT.get(kind, Decimal("1e26")):
        raise Refused(f"{where}: expected a decimal number as a string")
    return amount


def _run(doc: Any, run_id: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise Refused("run: expected an object (the reconciliations row)")
    unknown = sorted(set(doc) - set(RUN_COLUMNS))
    if unknown:
        raise Refused(f"run.{unknown[0]}: not a column of reconciliations")
    run = {name: _value(doc.get(name), kind, f"run.{name}") for name, kind in RUN_COLUMNS.items()}
    if run["run_id"] != run_id:
        raise Refused("run.run_id: differs from the part's run_id")
    for name in ("ran_at", "provider", "since", "until", "status"):
        if run[name] is None:
            raise Refused(f"run.{name}: required")
    if run["status"] not in ("ok", "drift"):
        raise Refused("run.status: expected ok or drift")
    return run


class Uploads:
    """The parts of runs being handed over, until each run's last part arrives (in the sinks process)."""

    def __init__(self, instance: str | None = None) -> None:
        self.instance = instance  # fleet.instance: the `instance` of the runs stored here
        self._lock = threading.Lock()
        self._open: dict[str, tuple[int, list[dict[str, Any]], float]] = {}  # run_id -> (next part, rows, last seen)

    def receive(self, con: Any, body: bytes) -> dict[str, Any]:
        """One part; on the last, the run is written. Raises Refused for a part that does not fit."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Refused("expected a JSON part of a reconciliation run") from None
        if not isinstance(doc, dict) or doc.get("format") != 1:
            raise Refused("format: expected 1 (a part made by meterline reconcile)")
        run_id, part, count = doc.get("run_id"), doc.get("part"), doc.get("parts")
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise Refused("run_id: expected 1 to 64 letters, digits, '-' or '_'")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (part, count)) or not 0 <= part < count:
            raise Refused("part, parts: expected 0 <= part < parts")
        columns, values = doc.get("columns"), doc.get("rows")
        if not isinstance(columns, list) or len(set(columns)) != len(columns) or not all(
                isinstance(c, str) and c in ROW_COLUMNS and c != "run_id" for c in columns):
            raise Refused("columns: expected distinct column names of reconciliation_rows (without run_id)")
        missing = [c for c in _REQUIRED_ROW if c not in columns]
        if missing:
            raise Refused(f"columns: {missing[0]} is required")
        if not isinstance(values, list):
            raise Refused("rows: expected a list")
        rows = []
        for i, row in enumerate(values):
            if not isinstance(row, list) or len(row) != len(columns):
                raise Refused(f"rows[{i}]: expected {len(columns)} values, as the columns")
            r = {c: _value(v, ROW_COLUMNS[c], f"rows[{i}].{c}") for c, v in zip(columns, row)}
            if not all(r[c] for c in _REQUIRED_ROW):
                raise Refused(f"rows[{i}]: bucket, width and model are required")
            rows.append(r)
        last = part == count - 1
        run = _run(doc.get("run"), run_id) if last else None
        if not last and "run" in doc:
            raise Refused("run: only the last part carries it")
        with self._lock:
            now = time.monotonic()
            for stale in [k for k, (_, _, seen) in self._open.items() if now - seen > UPLOAD_IDLE_S]:
                del self._open[stale]
            expected, held, _ = self._open.get(run_id, (0, [], now))
            if part != expected:
                self._open.pop(run_id, None)
                raise Refused(f"part {part} of run {run_id} arrived where part {expected} was due: send the run again")
            if sum(len(h) for _, h, _ in self._open.values()) + len(rows) > MAX_ROWS:
                self._open.pop(run_id, None)
                raise Refused(f"more than {MAX_ROWS:,} rows are being handed over (this run and others): "
                              "use a shorter --since, or --bucket 1d")
            if not last:
                if run_id not in self._open and len(self._open) >= MAX_UPLOADS:
                    raise Refused(f"{MAX_UPLOADS} runs are being handed over already: try again shortly")
                self._open[run_id] = (part + 1, held + rows, now)
                return {"run_id": run_id, "received": part + 1, "parts": count}
            self._open.pop(run_id, None)
        try:
            insert(con, run, held + rows, self.instance)
        except Exception as e:  # noqa: BLE001 - DuckDB's constraint message is the useful one
            if "primary key" in str(e).lower() or "duplicate key" in str(e).lower():
                raise Refused(f"run {run_id} is stored already") from None
            raise
        return {"run_id": run_id, "stored": True, "rows": len(held) + len(rows)}
