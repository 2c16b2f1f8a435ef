"""`meterline reconcile openai|anthropic`: the ledger beside the provider's usage and cost reports, for people and cron.

Exit status: 0 within tolerance, 1 when any drift passes it, 2 when the comparison could not be made.
"""
from __future__ import annotations

import argparse
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from . import reconcile_config  # the rest is imported when the command runs: other commands start fast

DEFAULT_CONFIG = "meterline.yaml"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reconcile", help="compare the ledger with the provider's own usage and cost reports",
        description="Read the provider's usage and cost reports with an admin key, aggregate the ledger by the same "
                    "buckets and models, and report the drift. Exit 0 within tolerance, 1 on drift, 2 on errors.")
    p.add_argument("provider", choices=reconcile_config.PROVIDERS)
    p.add_argument("--since", default="7d", help="how far back: 7d, 36h or a date (default 7d; snapped to a day)")
    p.add_argument("--until", help="end of the window, exclusive (default: the start of the current bucket)")
    p.add_argument("--bucket", choices=("1h", "1d"), default="1d", help="token buckets (dollars are always daily)")
    p.add_argument("--tolerance", default="0.005", help="largest relative drift that passes (default 0.005)")
    p.add_argument("--base-url", help="the provider's API (default from the config, else its public API)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    p.add_argument("--url", help="sidecar URL (default from the config's listen address)")
    p.add_argument("--db", help="ledger file, read directly (and the run stored in it)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per provider request (default 30)")
    return p


def _fail(message: str) -> int:
    print(f"meterline: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace, cfg: Any) -> int:
    """`cfg` is the sidecar's Config, its `reconcile:` key parsed by jobs.reconcile_config."""
    try:
        return _run(args, cfg)
    except Exception as e:  # noqa: BLE001 - cron must see 2 (could not compare), never 1 (drift), for a bug
        return _fail(f"reconcile failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")


def _run(args: argparse.Namespace, cfg: Any) -> int:
    from ledger import sql

    from . import admin_api, reconcile

    scope = cfg.reconcile.scope(args.provider)
    if args.base_url:
        scope.base_url = args.base_url.rstrip("/")
    if not scope.admin_key:
        return _fail(f"no admin key for {args.provider}: set reconcile.{args.provider}.admin_key in the config "
                     f"or {reconcile_config.KEY_ENV[args.provider]} in the environment")
    try:
        tolerance = Decimal(args.tolerance)
        if not tolerance.is_finite() or tolerance < 0:
            raise InvalidOperation
    except InvalidOperation:
        return _fail(f"--tolerance: expected a relative drift such as 0.005, got {args.tolerance!r}")
    try:
        since, until = reconcile.window(args.since, args.until, args.bucket)
    except ValueError as e:
        return _fail(str(e))

    query = reconcile.ledger_query(args.provider, since, until, args.bucket, scope.key_fingerprints)
    try:
        result, db_path, sidecar = _ledger(args, cfg, query)
    except Exception as e:  # noqa: BLE001 - DuckDB's or the sidecar's own message is the useful one
        return _fail(f"cannot read the ledger: {e}")
    if result.truncated:
        return _fail("the ledger's answer was truncated: use a shorter --since or --bucket 1d")
    try:
        report = admin_api.fetch(scope, since, until, args.bucket, args.timeout)
    except admin_api.AdminApiError as e:
        return _fail(str(e))

    scope_doc = {"base_url": scope.base_url, **scope.filters, "key_fingerprints": scope.key_fingerprints,
                 "ledger": str(db_path) if db_path else f"sidecar at {sidecar.url}"}
    run_ = reconcile.compare(args.provider, report, reconcile.ledger_side(result), since, until, args.bucket,
                             tolerance, scope_doc)
    run_.stored = _store(db_path, run_) if sidecar is None else _store_via_sidecar(sidecar, run_)
    if args.format == "json":
        print(reconcile.to_json(run_))
    else:
        print(sql.render(reconcile.table(run_), "table"))
        print("\n".join(reconcile.summary_lines(run_)))
    print(f"meterline: run {run_.run_id} {run_.stored}", file=sys.stderr)
    return 1 if run_.over else 0


def _ledger(args: argparse.Namespace, cfg: Any, query: str) -> tuple[Any, str | None, Any]:
    """The ledger's aggregate (a sql.Result): from the file given by --db, else through a running sidecar, else its
    file; with the file's path, or the sidecar's client (the run is stored where the ledger was read)."""
    from ledger import sql

    # late: sidecar.cli imports this module. The same lookup as `meterline sql`: --url, METERLINE_URL,
    # the config's listen address; through the sidecar when it owns the ledger (--db) or none is named
    from sidecar.cli import _base_url, _Client, _Failed, _sql_via_sidecar, _through_sidecar

    try:
        client = _Client(_base_url(args.url, cfg), cfg.admin_token)
        if _through_sidecar(client, args.db):
            result = _sql_via_sidecar(client, {"query": query, "max_rows": sql.MAX_EXPORT_ROWS})
            if result is not None:
                return result, None, client
    except _Failed as e:
        raise RuntimeError(str(e)) from None
    path = args.db or cfg.ledger_path
    con = sql.open_file(path)
    try:
        return sql.run(con, query), path, None
    finally:
        con.close()


def _store_via_sidecar(client: Any, run_: Any) -> str:
    """Hands the finished run to the sidecar that owns the ledger (its sinks process writes it), in parts
    under its body cap; only the report's rows go there, never the admin key."""
    from sidecar.cli import _Failed

    from . import reconcile

    bodies = reconcile.parts(run_)
    try:
        for body in bodies:
            answer = client.call("POST", "/_meterline/reconciliations", body, "application/json")
            if answer is None:
                return f"not stored: the sidecar at {client.url} went away"
    except _Failed as e:
        return f"not stored: {' '.join(str(e).split())[:300]}"
    if not isinstance(answer, dict) or answer.get("stored") is not True:
        return f"not stored: {client.url} did not confirm the run"
    return (f"stored through the sidecar at {client.url} (tables reconciliations, reconciliation_rows; "
            f"{len(bodies)} part{'s' if len(bodies) != 1 else ''})")


def _store(db_path: str, run_: Any) -> str:
    """Appends the run to the ledger file (no sidecar holds it)."""
    import duckdb

    from . import reconcile

    try:
        con = duckdb.connect(str(db_path))
    except duckdb.Error as e:
        return f"not stored: the ledger {db_path} is not writable ({' '.join(str(e).split())[:200]})"
    try:
        reconcile.store(con, run_)
    except duckdb.Error as e:
        return f"not stored: {' '.join(str(e).split())[:200]}"
    finally:
        con.close()
    return f"stored in {db_path} (tables reconciliations, reconciliation_rows)"
