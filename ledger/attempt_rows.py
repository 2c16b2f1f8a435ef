"""The ledger's `attempts` table: one row per try of a routed call, written with the call's row from its journal line."""
from __future__ import annotations

import dataclasses
import operator
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa

from . import validate
from .columns import USAGE_AND_COST
from .records import Attempt


# (column, DuckDB type, Arrow type), in Attempt's field order
COLUMNS: list[tuple[str, str, pa.DataType]] = [
    ("call_id", "VARCHAR", pa.string()),
    ("attempt", "INTEGER", pa.int32()),
    ("upstream", "VARCHAR", pa.string()),
    ("provider", "VARCHAR", pa.string()),
    ("model", "VARCHAR", pa.string()),
    ("started_at", "TIMESTAMPTZ", pa.timestamp("us", tz="UTC")),
    ("ttft_ms", "DOUBLE", pa.float64()),
    ("duration_ms", "DOUBLE", pa.float64()),
    ("status_code", "INTEGER", pa.int32()),
    ("outcome", "VARCHAR", pa.string()),
    ("error_type", "VARCHAR", pa.string()),
    *USAGE_AND_COST,
    ("response_model", "VARCHAR", pa.string()),
    ("instance", "VARCHAR", pa.string()),
]
_NAMES = [name for name, _, _ in COLUMNS]
assert _NAMES == [f.name for f in dataclasses.fields(Attempt)], "attempts schema and Attempt drifted"
ARROW_SCHEMA = pa.schema([(name, arrow) for name, _, arrow in COLUMNS])
_ROW = operator.attrgetter(*_NAMES)
CREATE = "CREATE TABLE IF NOT EXISTS attempts (\n  " + ",\n  ".join(
    f"{name} {sql}" for name, sql, _ in COLUMNS) + "\n)"

_STRINGS = ("upstream", "provider", "model", "outcome", "error_type", "price_source", "response_model")
_COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
_MONEY = ("input_cost_usd", "output_cost_usd", "cost_usd")


def create(con: Any) -> None:
    con.execute(CREATE)
    have = {row[0] for row in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'attempts'").fetchall()}
    for name, sql_type, _ in COLUMNS:
        if name not in have:
            con.execute(f"ALTER TABLE attempts ADD COLUMN {name} {sql_type}")


def read(items: Any, call_id: str, instance: str | None = None) -> list[Attempt]:
    """A journal line's attempts (dicts, or Attempt objects in-process) as clean Attempts of `call_id`
    (metered by `instance`, the call's):
    a value that does not fit its column becomes NULL; an item that is no attempt at all is dropped."""
    if not isinstance(items, list):
        return []
    out = []
    for n, item in enumerate(items, 1):
        doc = dataclasses.asdict(item) if isinstance(item, Attempt) else item
        if not isinstance(doc, dict):
            continue
        started = doc.get("started_at")
        if isinstance(started, str):
            try:
                started = datetime.fromisoformat(started)
            except ValueError:
                started = None
        if not isinstance(started, datetime):
            continue
        a = Attempt(call_id=call_id, attempt=doc.get("attempt") if _int_ok(doc.get("attempt")) else n,
                    upstream=_text(doc.get("upstream")) or "", provider=_text(doc.get("provider")) or "",
                    model=_text(doc.get("model")) or "", started_at=started, instance=instance)
        for name in _STRINGS[3:]:
            setattr(a, name, _text(doc.get(name)))
        a.outcome = a.outcome or "interrupted"
        for name in ("ttft_ms", "duration_ms"):
            value = doc.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300:
                setattr(a, name, float(value))
        a.status_code = doc.get("status_code") if _int_ok(doc.get("status_code")) else None
        for name in _COUNTS:
            value = doc.get(name)
            setattr(a, name, value if validate.count_ok(value) else None)
        units = doc.get("units")
        a.units = validate._units(units)[0] or None if isinstance(units, dict) else None
        for name in _MONEY:
            setattr(a, name, validate.money(doc.get(name)) if doc.get(name) is not None else None)
        out.append(a)
    return out


def to_arrow(attempts: list[Attempt]) -> pa.Table:
    columns: dict[str, list[Any]] = dict(zip(_NAMES, map(list, zip(*map(_ROW, attempts))))) if attempts \
        else {name: [] for name in _NAMES}
    columns["units"] = [orjson.dumps(u).decode() if u else None for u in columns["units"]]
    return pa.Table.from_pydict(columns, schema=ARROW_SCHEMA)


def _int_ok(value: Any) -> bool:
    return type(value) is int and 0 <= value <= validate.INT32_MAX


def _text(value: Any) -> str | None:
    return value if type(value) is str and validate._text_ok(value) else None


def total(attempts: list[Attempt], name: str) -> Decimal | int | None:
    """The sum of one column over attempts; None when no attempt has a value."""
    values = [v for a in attempts if (v := getattr(a, name)) is not None]
    return sum(values[1:], values[0]) if values else None
