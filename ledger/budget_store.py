"""Budgets in the ledger: rules added at run time, top-ups, fired alerts, and window spend rebuilt from `calls`.

Every function here does DuckDB I/O: call them from a worker thread, never the event loop.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import orjson

from .budgets import Budgets, CallAttrs, Crossing, CrossingNote, Rule, RuleError, Tally, parse_rule

CREATE_RULES = """CREATE TABLE IF NOT EXISTS budget_rules (
         name VARCHAR PRIMARY KEY, spec JSON NOT NULL, updated_at TIMESTAMPTZ NOT NULL)"""
# (column, DuckDB type) of the tables the fleet ledger receives too (fleet/postgres_schema.py); the id and
# `instance` came later and go last, so a migrated table and a new one look alike
TOPUP_COLUMNS: list[tuple[str, str]] = [
    ("topped_at", "TIMESTAMPTZ"), ("rule", "VARCHAR"), ("split_key", "VARCHAR"), ("amount_usd", "DECIMAL(38, 12)"),
    ("topup_id", "VARCHAR"), ("instance", "VARCHAR"),
]
ALERT_COLUMNS: list[tuple[str, str]] = [
    ("fired_at", "TIMESTAMPTZ"), ("rule", "VARCHAR"), ("split_key", "VARCHAR"), ("window_start", "TIMESTAMPTZ"),
    ("threshold", "DECIMAL(6, 3)"), ("utilization", "DECIMAL(18, 6)"), ("spent_usd", "DECIMAL(38, 12)"),
    ("limit_usd", "DECIMAL(38, 12)"), ("action", "VARCHAR"), ("call_id", "VARCHAR"),
    ("alert_id", "VARCHAR"), ("instance", "VARCHAR"),
]
_NOT_NULL = {"topped_at", "rule", "split_key", "amount_usd", "fired_at", "window_start", "threshold", "utilization"}


def _create(table: str, columns: list[tuple[str, str]]) -> str:
    cols = ", ".join(f"{n} {t}{' NOT NULL' if n in _NOT_NULL and not (table == 'alerts' and n == 'split_key') else ''}"
                     for n, t in columns)
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


CREATE = [CREATE_RULES, _create("budget_topups", TOPUP_COLUMNS), _create("alerts", ALERT_COLUMNS)]

# a call counts against budgets unless it was refused; tokens are input plus output
_HISTORY = """
    SELECT provider, coalesce(request_model, response_model, '') AS model, operation, coalesce(app, '') AS app,
           coalesce(user_id, '') AS user_id, coalesce(key_fingerprint, '') AS key, tags,
           coalesce(sum(cost_usd), 0) AS usd,
           coalesce(sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)), 0) AS tokens,
           count(*) AS requests
    FROM calls WHERE started_at >= ? AND outcome <> 'blocked'
    GROUP BY ALL"""


def create(con: Any) -> None:
    for statement in CREATE:
        con.execute(statement)
    for table, columns, ident in (("budget_topups", TOPUP_COLUMNS, "topup_id"), ("alerts", ALERT_COLUMNS, "alert_id")):
        for name, sql_type in columns:  # a ledger made by an older version gains the columns added since
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {sql_type}")
        # rows of an older version get an id (the fleet ledger's key)
        con.execute(f"UPDATE {table} SET {ident} = CAST(uuid() AS VARCHAR) WHERE {ident} IS NULL")


def api_rules(con: Any) -> list[Rule]:
    rules = []
    for name, spec in con.execute("SELECT name, spec FROM budget_rules ORDER BY name").fetchall():
        try:
            rules.append(parse_rule(orjson.loads(spec), f"budget_rules[{name}]", source="api"))
        except (RuleError, ValueError):
            continue  # a rule saved by an older version that no longer parses is skipped, not fatal
    return rules


def save_rule(con: Any, rule: Rule, at: datetime) -> None:
    con.execute("INSERT OR REPLACE INTO budget_rules VALUES (?, ?, ?)",
                [rule.name, orjson.dumps(rule.to_doc()).decode(), at])


def delete_rule(con: Any, name: str) -> None:
    con.execute("DELETE FROM budget_rules WHERE name = ?", [name])


def save_topup(con: Any, rule: str, key: str, amount: Decimal, at: datetime, instance: str | None = None) -> None:
    con.execute("INSERT INTO budget_topups (topped_at, rule, split_key, amount_usd, topup_id, instance) "
                "VALUES (?, ?, ?, ?, ?, ?)", [at, rule, key, amount, uuid.uuid4().hex, instance])


def save_alert(con: Any, crossing: Crossing | CrossingNote, call_id: str | None, instance: str | None = None) -> None:
    n = crossing if isinstance(crossing, CrossingNote) else CrossingNote.of(crossing)
    con.execute("INSERT INTO alerts (fired_at, rule, split_key, window_start, threshold, utilization, spent_usd, "
                "limit_usd, action, call_id, alert_id, instance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [n.at, n.rule, n.key or None, n.window_start, n.threshold,
                 n.utilization.quantize(Decimal("0.000001")), n.spent_usd, n.limit_usd, n.action, call_id,
                 uuid.uuid4().hex, instance])


@dataclass(slots=True)
class History:
    """What the ledger says about budgets' current windows; applied to Budgets on the event loop."""

    topups: list[tuple[str, str, Decimal]]
    spend: list[tuple[CallAttrs, datetime, Tally]]  # since each window start
    fired: list[tuple[str, str, datetime, Decimal]]


# top-ups and alerts of a rule count from its last definition on: a rule replaced through the API
# (budget_rules.updated_at) starts clean, with neither its old top-ups nor its old alerts
_SINCE_DEFINED = "LEFT JOIN budget_rules r ON r.name = t.rule WHERE (r.updated_at IS NULL OR t.{at} >= r.updated_at)"


def history(con: Any, starts: set[datetime], exclude: Iterable[str] = ()) -> History:
    """Reads top-ups, spend since each window start (less the calls in `exclude`) and fired alerts."""
    topups = [(rule, key, Decimal(amount)) for rule, key, amount in con.execute(
        "SELECT t.rule, t.split_key, sum(t.amount_usd) FROM budget_topups t "
        + _SINCE_DEFINED.format(at="topped_at") + " GROUP BY ALL").fetchall()]
    spend = []
    excluded = sorted(exclude)
    query = _HISTORY.replace("GROUP BY ALL", "AND NOT list_contains(?, call_id) GROUP BY ALL")
    for start in sorted(starts):
        for provider, model, operation, app, user, key, tags, usd, tokens, requests in con.execute(
                query, [start, excluded]).fetchall():
            attrs = CallAttrs(provider or "", model, operation or "", app, user, key, dict(tags or {}))
            spend.append((attrs, start, Tally(Decimal(usd), int(tokens), int(requests))))
    fired = [(rule, key, window_start, Decimal(threshold)) for rule, key, window_start, threshold in con.execute(
        "SELECT t.rule, coalesce(t.split_key, ''), t.window_start, t.threshold FROM alerts t "
        + _SINCE_DEFINED.format(at="fired_at") + " AND t.window_start >= ?",
        [min(starts, default=datetime.now(timezone.utc))]).fetchall()]
    return History(topups, spend, fired)


def recent_outputs(con: Any, since: datetime, per_key: int) -> list[tuple[tuple[str, str, str], int]]:
    """The output tokens of the last `per_key` successful calls since `since` of each (provider,
    request model, app), oldest first: a restarted guard's estimates for calls without max tokens."""
    rows = con.execute(
        """SELECT provider, coalesce(request_model, ''), coalesce(app, ''), output_tokens FROM calls
           WHERE outcome = 'ok' AND output_tokens IS NOT NULL AND started_at >= ?
           QUALIFY row_number() OVER (PARTITION BY provider, request_model, app ORDER BY started_at DESC) <= ?
           ORDER BY started_at""", [since, per_key]).fetchall()
    return [((provider, model, app), int(tokens)) for provider, model, app, tokens in rows]


def apply(budgets: Budgets, h: History, only: str | None = None) -> None:
    """Fills the accounts of the current windows (of one rule, or all) from a History."""
    if only is None:
        for rule, key, amount in h.topups:
            budgets.topups[(rule, key)] = amount
    for attrs, start, tally in h.spend:
        budgets.restore(attrs, start, tally, only)
    for rule, key, window_start, threshold in h.fired:
        if only in (None, rule):
            budgets.restore_fired(rule, key, window_start, threshold)


def rebuild(con: Any, budgets: Budgets, now: datetime) -> None:
    """History and apply in one step, for a process that has no event loop (the CLI)."""
    apply(budgets, history(con, budgets.window_starts(now)))
