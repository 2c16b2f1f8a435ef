"""The `meterline` command: serve the sidecar, and query its ledger."""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
import urllib.parse
from typing import Any

import httpx2
import orjson

from exporters import http_client
from ledger.defaults import is_lock_error
from jobs import cli_reconcile

from . import config as config_mod
from .hostcheck import allowed_hosts

DEFAULT_CONFIG = "meterline.yaml"
CALL_TIMEOUT_S = 120.0  # a large SQL export through the sidecar may take a while
URL_HELP = ("sidecar URL or HOST:PORT (default: $METERLINE_URL, else the config's listen address)")
DB_HELP = ("ledger file: read through the sidecar when it is the one the sidecar owns, else opened directly "
           "(also used when no sidecar answers)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meterline",
                                     description="A localhost sidecar that meters every AI model call.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar",
                           description="Run the sidecar (default 127.0.0.1:8720, ledger ./meterline.duckdb).")
    serve.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; loopback keeps it private)")
    serve.add_argument("--port", type=int, help="port (default 8720)")
    serve.add_argument("--db", help="ledger file (default ./meterline.duckdb)")
    serve.add_argument("--workers", type=int, help="forwarder processes on the one port (default 1, or the "
                                                   "config's workers:); budgets need 1 unless fleet.redis is set")
    serve.add_argument("--log-level", default=os.environ.get("METERLINE_LOG_LEVEL", "INFO"))

    q = sub.add_parser("sql", help="run read-only SQL on the ledger",
                       description="Run one read-only SELECT on the ledger: through the running sidecar "
                                   "(which owns the file), or on the file itself when none runs.")
    q.add_argument("query")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    q.add_argument("--url", help=URL_HELP)
    q.add_argument("--db", help=DB_HELP)
    q.add_argument("--fleet", action="store_true",
                   help="query the fleet ledger (fleet.postgres: every sidecar's rows) instead of this one's")

    b = sub.add_parser("budgets", help="budget rules with spend, limit and window",
                       description="Every budget rule and split key: spend, limit, percent used and time to reset. "
                                   "Asks the running sidecar, or rebuilds from the ledger file when none runs.")
    b.add_argument("--format", choices=("table", "json"), default="table")
    b.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    b.add_argument("--url", help=URL_HELP)
    b.add_argument("--db", help=DB_HELP)

    r = sub.add_parser("routes", help="routes with their targets, circuit states and recent error rates",
                       description="Every route of the running sidecar: strategy, targets, circuit state "
                                   "(closed, open, half_open), recent error rate and time to first token.")
    r.add_argument("--format", choices=("table", "json"), default="table")
    r.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    r.add_argument("--url", help=URL_HELP)

    d = sub.add_parser("demo", help="try it without API keys: a fake provider, sample traffic and the dashboard",
                       description="Start the sidecar with a built-in fake OpenAI/Anthropic/Gemini provider, send "
                                   "about a minute of varied traffic through it (apps, users, tags, models; one "
                                   "budget that gets close, one that blocks), then print the dashboard URL and some "
                                   "SQL to try. Keeps serving until Ctrl-C unless --exit is given. The demo has a "
                                   "ledger of its own and ignores meterline.yaml.")
    d.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    d.add_argument("--exit", action="store_true", help="stop when the traffic is done instead of serving on")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8720, help="port (default 8720)")
    d.add_argument("--db", default="meterline-demo.duckdb", help="the demo's ledger (default ./meterline-demo.duckdb)")
    d.add_argument("--seed", type=int, help="random seed, for the same traffic every run")
    d.add_argument("--jaeger-ui-url", help="Jaeger UI base URL: recent calls link to their traces")
    d.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)  # shorter fake latencies, for tests
    d.add_argument("--log-level", default=os.environ.get("METERLINE_LOG_LEVEL", "WARNING"))

    cli_reconcile.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":  # the demo brings its own config: a meterline.yaml here is not read
        return _demo(args)
    try:
        cfg = config_mod.load(_config_path(args.config))
    except config_mod.ConfigError as e:
        print(f"meterline: {e}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(args, cfg)
    if args.command == "budgets":
        return _budgets(args, cfg)
    if args.command == "routes":
        return _routes(args, cfg)
    if args.command == "reconcile":
        return cli_reconcile.run(args, cfg)
    return _sql(args, cfg)


def _config_path(given: str | None) -> str | None:
    if given:
        return given
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def _serve(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s")
    if args.host:
        cfg.host = args.host
        cfg.allowed_hosts = allowed_hosts(cfg.host, cfg.allowed_hosts)  # the new listen address too
    if args.port is not None:
        cfg.port = args.port
    if args.db:
        cfg.ledger_path = args.db
    if args.workers is not None:
        cfg.workers = args.workers
    try:
        config_mod.check_workers(cfg)
    except config_mod.ConfigError as e:
        print(f"meterline: {e}", file=sys.stderr)
        return 2
    from . import supervisor  # imported late: `meterline sql` should start fast

    try:
        return supervisor.run(cfg, cfg.workers)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        hint = " (another process listens there: pick another --port)" if e.errno == errno.EADDRINUSE else ""
        print(f"meterline: cannot listen on {cfg.host}:{cfg.port}: {reason}{hint}", file=sys.stderr)
        return 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.duration <= 0:
        print("meterline: --duration must be a positive number of seconds", file=sys.stderr)
        return 2
    from . import demo  # imported late: `meterline sql` should start fast

    opts = demo.Options(duration_s=args.duration, exit=args.exit, host=args.host, port=args.port, db=args.db,
                        seed=args.seed, jaeger_ui_url=args.jaeger_ui_url, fast=args.fast)

    async def run() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await demo.run(opts, out=lambda line: print(line, flush=True))
        except asyncio.CancelledError:
            return 0

    return asyncio.run(run())


def _sql(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from ledger import sql  # DuckDB loads only for the commands that read the ledger
    export = args.format in ("csv", "json")  # every row, or a warning that they were cut
    if args.fleet:
        return _sql_fleet(args, cfg, export)
    try:
        client = _Client(_base_url(args.url, cfg), cfg.admin_token)
        result = None
        if _through_sidecar(client, args.db):
            doc = {"query": args.query, **({"max_rows": sql.MAX_EXPORT_ROWS} if export else {})}
            result = _sql_via_sidecar(client, doc)
        if result is None:
            result = _on_file(args.db or cfg.ledger_path, lambda con: sql.run(con, args.query,
                                                                                None if export else sql.MAX_ROWS))
    except _Failed as e:
        print(f"meterline: {e}", file=sys.stderr)
        return 1
    print(sql.render(result, args.format))
    if result.truncated:
        print(f"meterline: output cut at {len(result.rows):,} rows (the sidecar's limit); narrow the query, "
              "or page through it with LIMIT and OFFSET", file=sys.stderr)
    return 0


def _budgets(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from ledger import sql  # DuckDB loads only for the commands that read the ledger
    try:
        client = _Client(_base_url(args.url, cfg), cfg.admin_token)
        rows = None
        if _through_sidecar(client, args.db):
            doc = client.call("GET", "/_meterline/budgets")
            if doc is not None:
                if not isinstance(doc, dict) or not isinstance(doc.get("budgets"), list):
                    raise _Failed(f"{client.url} does not answer as a meterline sidecar")
                rows = doc["budgets"]
        if rows is None:
            rows = _on_file(args.db or cfg.ledger_path, lambda con: _budgets_from_file(con, cfg))
    except _Failed as e:
        print(f"meterline: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    table = sql.Result(["rule", "key", "window", "action", "spent", "limit", "used", "resets in"], [
        (r["rule"], r["key"] or "", r["window"], r["action"], _spent(r), _limit(r),
         f"{r['utilization']:.1%}", _duration(r["seconds_to_reset"])) for r in rows])
    print(sql.render(table, "table"))
    return 0


def _sql_fleet(args: argparse.Namespace, cfg: config_mod.Config, export: bool) -> int:
    """`meterline sql --fleet`: the query goes straight to the fleet ledger (no sidecar needed)."""
    from fleet import postgres_query
    from ledger import sql

    if not cfg.fleet.postgres:
        print("meterline: --fleet needs the fleet ledger: set config key 'fleet.postgres' "
              "(e.g. postgres: ${METERLINE_POSTGRES_URL})", file=sys.stderr)
        return 2
    try:
        result = postgres_query.run(cfg.fleet.postgres, args.query, sql.MAX_EXPORT_ROWS if export else sql.MAX_ROWS,
                                    cfg.sql_timeout_s, cfg.fleet.connect_timeout_s)
    except sql.QueryRefused as e:
        print(f"meterline: refused: {e}", file=sys.stderr)
        return 1
    except (sql.QueryInterrupted, postgres_query.FleetUnavailable, ValueError) as e:
        print(f"meterline: {e}", file=sys.stderr)
        return 1
    print(sql.render(result, args.format))
    if result.truncated:
        print(f"meterline: output cut at {len(result.rows):,} rows; narrow the query, "
              "or page through it with LIMIT and OFFSET", file=sys.stderr)
    return 0


def _routes(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """Circuit states live in the running sidecar only: without one, the configured targets are listed."""
    from ledger import sql  # the table renderer
    try:
        client = _Client(_base_url(args.url, cfg), cfg.admin_token)
        doc = client.call("GET", "/_meterline/routes")
    except _Failed as e:
        print(f"meterline: {e}", file=sys.stderr)
        return 1
    if doc is None:
        print(f"meterline: no sidecar answers at {client.url}; circuit states are kept by the running sidecar "
              "(configured routes follow)", file=sys.stderr)
        routes = {name: {"strategy": r.strategy, "targets": [{"target": t.key, "weight": t.weight} for t in r.targets]}
                  for name, r in cfg.routes.items()}
    elif not isinstance(doc, dict) or not isinstance(doc.get("routes"), dict):
        print(f"meterline: {client.url} does not answer as a meterline sidecar", file=sys.stderr)
        return 1
    else:
        routes = doc["routes"]
    if args.format == "json":
        print(orjson.dumps(routes, option=orjson.OPT_INDENT_2).decode())
        return 0

    def rate(t: dict) -> str:
        value = t.get("recent_error_rate")
        return "" if value is None else f"{value:.1%} of {t.get('recent_attempts')}"

    table = sql.Result(["route", "strategy", "target", "weight", "circuit", "opened", "errors", "ttft ms"], [
        (name, r["strategy"], t["target"], f"{t.get('weight', 1):g}", t.get("state", "?"), t.get("opened", ""),
         rate(t), "" if t.get("ttft_ms") is None else t["ttft_ms"])
        for name, r in routes.items() for t in r["targets"]])
    print(sql.render(table, "table"))
    return 0


def _on_file(path: str, fn: Any) -> Any:
    """Opens the ledger file itself (no sidecar owns it) and runs fn on it; failures become one line."""
    from ledger import sql  # DuckDB loads only for the commands that read the ledger
    try:
        con = sql.open_file(path)
    except FileNotFoundError as e:
        raise _Failed(str(e)) from None
    except Exception as e:  # noqa: BLE001 - DuckDB's errors, made one line
        if is_lock_error(e):
            raise _Failed(f"the ledger {path} is in use by another process (a running sidecar?): query it through "
                          "that sidecar with --url HOST:PORT or METERLINE_URL") from None
        raise _Failed(f"cannot open the ledger {path}: {_first_line(e)}") from None
    try:
        return fn(con)
    except sql.QueryRefused as e:
        raise _Failed(f"refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - DuckDB's own message is the useful one
        raise _Failed(_first_line(e)) from None
    finally:
        con.close()


def _budgets_from_file(con: Any, cfg: config_mod.Config) -> list[dict]:
    from datetime import datetime, timezone

    from ledger import budget_store
    from ledger.budgets import Budgets

    budgets = Budgets(cfg.budgets)
    for rule in budget_store.api_rules(con):
        if rule.name not in budgets.rules:
            budgets.put(rule)
    now = datetime.now(timezone.utc)
    budget_store.rebuild(con, budgets, now)
    return budgets.status(now)


def _spent(r: dict) -> str:
    return _amounts(r, r["spent_usd"], r["spent_tokens"], r["requests"])


def _limit(r: dict) -> str:
    return _amounts(r, r["limit_usd"], r["limit_tokens"], r["limit_requests"])


def _amounts(r: dict, usd: str | None, tokens: int | None, requests: int | None) -> str:
    """One budget row's spend or limits, for the kinds of limit its rule has; dollars exactly
    (from the row's Decimal string, never through a float): $0.0005, not $0.00."""
    from decimal import Decimal

    from ledger.budgets import dollars

    parts = []
    if r["limit_usd"] is not None:
        parts.append(dollars(Decimal(usd or 0)))
    if r["limit_tokens"] is not None:
        parts.append(f"{tokens:,} tok")
    if r["limit_requests"] is not None:
        parts.append(f"{requests:,} req")
    return " / ".join(parts)


def _duration(seconds: int | None) -> str:
    from ledger.budgets import duration

    return duration(seconds)


class _Failed(Exception):
    """What the CLI prints as its one line on stderr before exiting 1."""


class _Client:
    """The sidecar's admin API over httpx2: None when nothing listens, _Failed for anything else wrong."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token
        self._http: httpx2.Client | None = None  # made on the first call; reused by the next one

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        headers = {"accept": "application/json"}
        if content_type:
            headers["content-type"] = content_type
        if self.token:
            headers["x-meterline-admin-token"] = self.token
        try:
            if self._http is None:
                self._http = http_client.client(CALL_TIMEOUT_S)
            resp = self._http.request(method, self.url + path, content=body, headers=headers)
        except httpx2.TimeoutException:
            raise _Failed(f"{self.url} did not answer in time") from None
        except httpx2.ConnectError as e:
            cause = _os_error(e)
            if isinstance(cause, ConnectionRefusedError):
                return None
            reason = getattr(cause, "strerror", None) or str(e) or type(e).__name__
            raise _Failed(f"cannot reach {self.url}: {reason}") from None
        except httpx2.InvalidURL as e:
            raise _Failed(f"not a sidecar URL: {self.url!r} ({e})") from None
        except httpx2.HTTPError as e:  # a reply that is not HTTP, a connection dropped mid-answer
            raise _Failed(f"{self.url} does not answer as a meterline sidecar ({type(e).__name__})") from None
        # a sidecar never redirects: a 3xx (not followed, so the admin token goes nowhere else) is not one
        if resp.status_code >= 300:
            try:
                message = orjson.loads(resp.content)["error"]
                if not isinstance(message, str):  # e.g. an OpenAI-compatible server's {"error": {...}}
                    raise TypeError(message)
            except Exception:  # noqa: BLE001 - not one of our error bodies
                raise _Failed(f"{self.url} does not answer as a meterline sidecar (HTTP {resp.status_code} on "
                              f"{path})") from None
            raise _Failed(message if resp.status_code != 401 else f"{message.split(':')[0]} (the config's "
                          "admin_token, or METERLINE_ADMIN_TOKEN)") from None
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise _Failed(f"{self.url} does not answer as a meterline sidecar (no JSON from {path})") from None


def _os_error(e: BaseException) -> OSError | None:
    """The socket error under httpx2's exception (it chains httpcore2's, which chains the OSError)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _base_url(given: str | None, cfg: config_mod.Config) -> str:
    """--url, else METERLINE_URL, else the config's listen address; HOST:PORT gets http://."""
    url = (given or os.environ.get("METERLINE_URL") or f"http://{_connect_host(cfg.host)}:{cfg.port}").strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _Failed(f"not a sidecar URL: {url!r} (expected HOST:PORT or http://HOST:PORT)")
    return url.rstrip("/")


def _through_sidecar(client: _Client, db: str | None) -> bool:
    """Whether to ask the sidecar: yes when one answers and (with --db) its ledger is that file."""
    health = client.call("GET", "/_meterline/healthz")
    if health is None:
        return False
    try:
        owned = health["ledger"]["path"]
    except (TypeError, KeyError):
        raise _Failed(f"{client.url} does not answer as a meterline sidecar") from None
    if db is None:
        return True
    try:
        return os.path.samefile(owned, db)
    except OSError:
        return os.path.abspath(owned) == os.path.abspath(db)


def _sql_via_sidecar(client: _Client, doc: dict[str, Any]) -> sql.Result | None:
    from ledger import sql  # DuckDB loads only for the commands that read the ledger
    payload = client.call("POST", "/_meterline/sql", orjson.dumps(doc), "application/json")
    if payload is None:
        return None
    try:
        return sql.Result(payload["columns"], [tuple(r) for r in payload["rows"]], payload.get("truncated", False))
    except (TypeError, KeyError):
        raise _Failed(f"{client.url} does not answer as a meterline sidecar") from None


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


if __name__ == "__main__":
    sys.exit(main())
