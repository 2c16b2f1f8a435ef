"""Read-only SQL on the fleet ledger: one statement, in a READ ONLY transaction, under a statement timeout.

Used by `meterline sql --fleet` and by the sinks process for the dashboard's "whole fleet" view.
Three locks, each enough alone for ordinary writes: the statement must begin as a query does
(SELECT, WITH, VALUES, TABLE, EXPLAIN); it is prepared, and Postgres prepares exactly one statement;
and the transaction is READ ONLY (a snapshot is taken by the query itself, after which read-write
mode can no longer be set). Give the fleet URL's user no superuser rights: a superuser's SELECT can
still call functions that read server files.
"""
from __future__ import annotations

import re
from typing import Any

from ledger.sql import QueryInterrupted, QueryRefused, Result

from .urls import scrub

_LEADING = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)
_QUERY_WORDS = ("select", "with", "values", "table", "explain")


class FleetUnavailable(RuntimeError):
    """The fleet ledger does not answer (or refused the login); the message holds no password."""


def check(query: str) -> None:
    """Refuses what is not a single query, before anything reaches Postgres."""
    body = _LEADING.sub("", query)
    word = re.match(r"[A-Za-z]+", body)
    if word is None or word.group(0).lower() not in _QUERY_WORDS:
        raise QueryRefused(f"only read-only queries are allowed (SELECT, WITH, VALUES, TABLE, EXPLAIN), "
                           f"not {(word.group(0).upper() if word else body[:20])!r}")


def run(url: str, query: str, max_rows: int | None, timeout_s: float, connect_timeout_s: float = 5.0) -> Result:
    """Runs `query` on the fleet ledger at `url` (call from a thread). Raises QueryRefused (not a single
    read-only query, or Postgres refused it as a write), QueryInterrupted (timeout), FleetUnavailable,
    or ValueError with Postgres's message for a bad query. No message holds the URL's password."""
    import psycopg

    check(query)
    try:
        con = psycopg.connect(url, connect_timeout=max(1, round(connect_timeout_s)), options="-c TimeZone=UTC",
                              application_name="meterline sql", autocommit=True)
    except psycopg.Error as e:
        raise FleetUnavailable(f"the fleet ledger does not answer: {scrub(_first_line(e), url)}") from None
    try:
        con.execute("BEGIN READ ONLY")  # autocommit: this BEGIN is the transaction's own, not psycopg's
        con.execute("SELECT set_config('statement_timeout', %s, true)", [f"{max(1, int(timeout_s * 1000))}ms"])
        with con.cursor() as cur:
            try:
                cur.execute(query.encode(), prepare=True)  # prepared: one statement, and no %-placeholders
            except psycopg.errors.QueryCanceled:
                raise QueryInterrupted(f"it ran longer than {timeout_s:g} s (sql.timeout_s)") from None
            except psycopg.errors.ReadOnlySqlTransaction as e:
                raise QueryRefused(f"the fleet ledger is read-only here: {scrub(_first_line(e), url)}") from None
            except psycopg.errors.SyntaxError as e:
                if "multiple commands" in str(e):
                    raise QueryRefused("exactly one statement is allowed") from None
                raise ValueError(scrub(_first_line(e), url)) from None
            except psycopg.Error as e:
                if "multiple commands" in str(e):
                    raise QueryRefused("exactly one statement is allowed") from None
                if isinstance(e, psycopg.OperationalError):
                    raise FleetUnavailable(f"the fleet ledger failed: {scrub(_first_line(e), url)}") from None
                raise ValueError(scrub(_first_line(e), url)) from None
            if cur.description is None:
                raise QueryRefused("the statement returned no rows: only queries are allowed")
            columns = [d.name for d in cur.description]
            rows = [tuple(_plain(v) for v in r) for r in (cur.fetchall() if max_rows is None
                                                           else cur.fetchmany(max_rows + 1))]
    finally:
        try:
            con.execute("ROLLBACK")
        except Exception:  # noqa: BLE001
            pass
        con.close()
    if max_rows is None:
        return Result(columns, rows)
    return Result(columns, rows[:max_rows], truncated=len(rows) > max_rows)


def _plain(value: Any) -> Any:
    # jsonb comes back as dicts and lists, numeric as Decimal (exact), timestamps as aware datetimes:
    # ledger.sql's renderers take all of them as DuckDB's answers give them
    return value


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]
