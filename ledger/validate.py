"""Checks every value crossing into a call record against the ledger's columns: a bad one becomes NULL and an anomaly.

What an upstream reports (counts, model names) and what a journal line holds can be anything JSON
can say: 2**64 tokens, 1.5 tokens, a NaN cost, a model that is a number. DuckDB and Arrow refuse
those with an exception, which would stop the writer for every later call. So values are checked
here, where they enter: a count must be a whole number in BIGINT range and >= 0, money a finite
Decimal that fits DECIMAL(38, 12), a string a string. A bad value is replaced by NULL (or an empty
map for `tags`) and the row's `anomaly` says so: `out_of_range` for numbers beyond their column,
`invalid_value` for values of the wrong kind. Records without a usable `call_id` or `started_at`
cannot be rows at all: `full` raises `Unusable` for them, and the journal quarantines the line.

`usage` and `costs` run on the event loop for every call: a few attribute reads each (see
docs/design.md for the measured cost). `full` checks every field; it runs on journal replay.
"""
from __future__ import annotations

import math
from datetime import datetime
from decimal import Context, Decimal
from typing import Any

from .money import MONEY_DIGITS
from .records import CallRecord, Usage

OUT_OF_RANGE = "out_of_range"
INVALID = "invalid_value"

BIGINT_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MONEY_QUANTUM = Decimal("0.000000000001")
_MONEY_CONTEXT = Context(prec=38)  # quantizing a 26-digit amount to 12 places needs 38 digits

_COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
_MONEY = ("input_cost_usd", "output_cost_usd", "cost_usd")
_UPSTREAM_STRINGS = ("request_model", "response_model", "response_id", "finish_reason", "error_type",
                     "service_tier")
_STRINGS = ("app", "upstream", "provider", "operation", "endpoint", "request_model", "response_model",
            "response_id", "outcome", "error_type", "finish_reason", "price_source", "user_id",
            "key_fingerprint", "trace_id", "span_id", "anomaly", "service_tier", "instance", "route", "served_by",
            "arm", "client_format", "upstream_format")
_FLOATS = ("duration_ms", "ttft_ms", "overhead_ms")
_BYTES = ("request_bytes", "response_bytes")


class Unusable(ValueError):
    """A record that cannot be a row (no call id or start time); the reason says which."""


def count_ok(value: Any) -> bool:
    return type(value) is int and 0 <= value <= BIGINT_MAX


def money_ok(value: Any) -> bool:
    """A Decimal DECIMAL(38, 12) holds as it is (a finite amount of at most 26 whole digits and 12 places)."""
    return (type(value) is Decimal and value.is_finite() and value.adjusted() < MONEY_DIGITS
            and value.as_tuple().exponent >= -12)


def money(value: Any) -> Decimal | None:
    """`value` (a Decimal, number or numeric text) as an amount the column holds, or None."""
    if type(value) is not Decimal:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return None
        try:
            value = Decimal(str(value))
        except ArithmeticError:
            return None
    if not value.is_finite() or value.adjusted() >= MONEY_DIGITS:
        return None
    if value.as_tuple().exponent < -12:
        value = value.quantize(MONEY_QUANTUM, context=_MONEY_CONTEXT)
    return value


def mark(record: CallRecord, kind: str | None) -> None:
    """Adds `kind` to the record's anomaly (comma-separated, after what the observer found)."""
    if kind is None:
        return
    if not record.anomaly:
        record.anomaly = kind
    elif kind not in record.anomaly.split(","):
        record.anomaly = f"{record.anomaly},{kind}"


def usage(u: Usage) -> str | None:
    """On the request path, before pricing: NULLs every count outside BIGINT or below zero and
    every unit that is not such a count or a finite number >= 0. Returns the anomaly, or None."""
    a, b, c, d, e = u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens
    kind = None
    if not ((a is None or (type(a) is int and 0 <= a <= BIGINT_MAX))
            and (b is None or (type(b) is int and 0 <= b <= BIGINT_MAX))
            and (c is None or (type(c) is int and 0 <= c <= BIGINT_MAX))
            and (d is None or (type(d) is int and 0 <= d <= BIGINT_MAX))
            and (e is None or (type(e) is int and 0 <= e <= BIGINT_MAX))):
        for name in _COUNTS:
            value = getattr(u, name)
            if value is not None and not count_ok(value):
                setattr(u, name, None)
                kind = OUT_OF_RANGE if isinstance(value, (int, float)) and not isinstance(value, bool) else INVALID
    if u.units:
        units, bad = _units(u.units)
        if bad:
            u.units = units
            kind = kind or bad
    return kind


def costs(record: CallRecord) -> None:
    """On the request path, after pricing: money that fits, strings from the upstream that are strings.
    (The pricer rounds to 12 places, so only the magnitude is checked here; `full` checks both.)"""
    a, b, c = record.input_cost_usd, record.output_cost_usd, record.cost_usd
    if ((a is not None and not (a.is_finite() and a.adjusted() < MONEY_DIGITS))
            or (b is not None and not (b.is_finite() and b.adjusted() < MONEY_DIGITS))
            or (c is not None and not (c.is_finite() and c.adjusted() < MONEY_DIGITS))):
        for name in _MONEY:
            value = getattr(record, name)
            if value is not None and not money_ok(value):
                setattr(record, name, money(value))
        mark(record, OUT_OF_RANGE)
    if not (_is_text(record.request_model) and _is_text(record.response_model) and _is_text(record.response_id)
            and _is_text(record.finish_reason) and _is_text(record.error_type) and _is_text(record.service_tier)):
        for name in _UPSTREAM_STRINGS:
            if not _is_text(getattr(record, name)):
                setattr(record, name, None)
        mark(record, INVALID)


def _is_text(value: Any) -> bool:
    return value is None or type(value) is str


def full(record: CallRecord) -> CallRecord:
    """Every field of a record read back from outside (a journal line), cleaned in place."""
    if type(record.call_id) is not str or not record.call_id or not _text_ok(record.call_id):
        raise Unusable(f"call_id is {record.call_id!r}")
    if not isinstance(record.started_at, datetime):
        raise Unusable(f"started_at is {record.started_at!r}")
    kinds: list[str] = []
    if record.ended_at is not None and not isinstance(record.ended_at, datetime):
        record.ended_at = None
        kinds.append(INVALID)
    for name in _STRINGS:
        value = getattr(record, name)
        if value is not None and (type(value) is not str or not _text_ok(value)):
            setattr(record, name, None)
            kinds.append(INVALID)
    for name in _FLOATS:
        value = getattr(record, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > 1e300:
            setattr(record, name, None)
            kinds.append(OUT_OF_RANGE)
        elif type(value) is not float:
            setattr(record, name, float(value))
    if record.stream is not None and type(record.stream) is not bool:
        record.stream = None
        kinds.append(INVALID)
    status = record.status_code
    if status is not None and not (type(status) is int and 0 <= status <= INT32_MAX):
        record.status_code = None
        kinds.append(OUT_OF_RANGE)
    tries = record.attempts
    if tries is not None and not (type(tries) is int and 0 <= tries <= INT32_MAX):
        record.attempts = None
        kinds.append(OUT_OF_RANGE)
    for name in (*_COUNTS, *_BYTES):
        value = getattr(record, name)
        if value is not None and not count_ok(value):
            setattr(record, name, None)
            kinds.append(OUT_OF_RANGE)
    if record.units is not None:
        if not isinstance(record.units, dict):
            record.units = None
            kinds.append(INVALID)
        else:
            units, bad = _units(record.units)
            if bad:
                record.units = units or None
                kinds.append(bad)
    for name in _MONEY:
        value = getattr(record, name)
        if value is not None and not money_ok(value):
            fixed = money(value)
            setattr(record, name, fixed)
            if fixed is None:
                kinds.append(OUT_OF_RANGE)
    tags = record.tags
    if tags is None:
        record.tags = {}
    elif not isinstance(tags, dict) or not all(
            type(k) is str and type(v) is str and _text_ok(k) and _text_ok(v) for k, v in tags.items()):
        record.tags = {}
        kinds.append(INVALID)
    for kind in kinds:
        mark(record, kind)
    return record


def _units(units: dict[Any, Any]) -> tuple[dict[str, int | float], str | None]:
    good: dict[str, int | float] = {}
    bad = None
    for key, value in units.items():
        if type(key) is str and ((type(value) is int and 0 <= value <= BIGINT_MAX)
                                 or (type(value) is float and 0 <= value <= 1e300)):
            good[key] = value
        else:
            bad = OUT_OF_RANGE if isinstance(value, (int, float)) and not isinstance(value, bool) else INVALID
    return good, bad


def _text_ok(text: str) -> bool:
    """Text Arrow can store (UTF-8: no lone surrogates, which a JSON `\\ud800` can produce)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
