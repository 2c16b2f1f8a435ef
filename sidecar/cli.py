"""The `meterline` command: serve the sidecar, and query its ledger."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import urllib.error
import urllib.request

import orjson

from jobs import cli_reconcile
from ledger import sql

from . import config as config_mod
from .hostcheck import allowed_hosts

DEFAULT_CONFIG = "meterline.yaml"


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
    serve.add_argument("--log-level", default=os.environ.get("METERLINE_LOG_LEVEL", "INFO"))

    q = sub.add_parser("sql", help="run read-only SQL on the ledger",
                       description="Run one read-only SELECT on the ledger: through the running sidecar "
                                   "(which owns the file), or on the file itself when none runs.")
    q.add_argument("query")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    q.add_argument("--url", help="sidecar URL (default from the config's listen address)")
    q.add_argument("--db", help="ledger file, used when no sidecar answers")

    b = sub.add_parser("budgets", help="budget rules with spend, limit and window",
                       description="Every budget rule and split key: spend, limit, percent used and time to reset. "
                                   "Asks the running sidecar, or rebuilds from the ledger file when none runs.")
    b.add_argument("--format", choices=("table", "json"), default="table")
    b.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    b.add_argument("--url", help="sidecar URL (default from the config's listen address)")
    b.add_argument("--db", help="ledger file, used when no sidecar answers")

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
    if args.command == "reconcile":  # reads the config itself: it knows the `reconcile:` key
        return cli_reconcile.run(args)
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
    return _sql(args, cfg)


def _config_path(given: str | None) -> str | None:
    if given:
        return given
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def _serve(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host:
        cfg.host = args.host
        cfg.allowed_hosts = allowed_hosts(cfg.host, cfg.allowed_hosts)  # the new listen address too
    if args.port is not None:
        cfg.port = args.port
    if args.db:
        cfg.ledger_path = args.db
    try:
        import uvloop  # optional: a faster event loop where installed
    except ImportError:
        uvloop = None
    from .app import serve  # imported late: `meterline sql` should start fast

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(cfg)
        except asyncio.CancelledError:
            pass

    try:
        if uvloop is not None:
            uvloop.run(run())
        else:
            asyncio.run(run())
    except OSError as e:
        print(f"meterline: cannot listen on {cfg.host}:{cfg.port}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


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
    url = args.url or f"http://{_connect_host(cfg.host)}:{cfg.port}"
    try:
        result = _sql_via_sidecar(url, args.query, cfg.admin_token)
    except ConnectionRefusedError:
        result = None
    except _Refused as e:
        print(f"meterline: {e}", file=sys.stderr)
        return 1
    if result is None:
        try:
            con = sql.open_file(args.db or cfg.ledger_path)
            result = sql.run(con, args.query)
        except (FileNotFoundError, sql.QueryRefused) as e:
            print(f"meterline: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - DuckDB's own message is the useful one
            print(f"meterline: {e}", file=sys.stderr)
            return 1
    print(sql.render(result, args.format))
    return 0


def _budgets(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    url = args.url or f"http://{_connect_host(cfg.host)}:{cfg.port}"
    try:
        with urllib.request.urlopen(f"{url}/_meterline/budgets", timeout=30) as resp:
            rows = orjson.loads(resp.read())["budgets"]
    except urllib.error.URLError as e:
        if not isinstance(e.reason, ConnectionRefusedError):
            print(f"meterline: {e.reason}", file=sys.stderr)
            return 1
        try:
            rows = _budgets_from_file(args.db or cfg.ledger_path, cfg)
        except FileNotFoundError as e:
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


def _budgets_from_file(path: str, cfg: config_mod.Config) -> list[dict]:
    from datetime import datetime, timezone

    from ledger import budget_store
    from ledger.budgets import Budgets

    con = sql.open_file(path)
    budgets = Budgets(cfg.budgets)
    for rule in budget_store.api_rules(con):
        if rule.name not in budgets.rules:
            budgets.put(rule)
    now = datetime.now(timezone.utc)
    budget_store.rebuild(con, budgets, now)
    return budgets.status(now)


def _spent(r: dict) -> str:
    return _amounts(r, r["spent_usd"], r["spent_tokens"], r["requests"], 4)


def _limit(r: dict) -> str:
    return _amounts(r, r["limit_usd"], r["limit_tokens"], r["limit_requests"], 2)


def _amounts(r: dict, usd: str | None, tokens: int | None, requests: int | None, places: int) -> str:
    """One budget row's spend or limits, for the kinds of limit its rule has."""
    parts = []
    if r["limit_usd"] is not None:
        parts.append(f"${float(usd):,.{places}f}")
    if r["limit_tokens"] is not None:
        parts.append(f"{tokens:,} tok")
    if r["limit_requests"] is not None:
        parts.append(f"{requests:,} req")
    return " / ".join(parts)


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d {h}h" if d else f"{h}h {m}m" if h else f"{m}m {s}s"


class _Refused(Exception):
    pass


def _sql_via_sidecar(url: str, query: str, token: str | None) -> sql.Result | None:
    headers = {"content-type": "text/plain"}
    if token:
        headers["x-meterline-admin-token"] = token
    request = urllib.request.Request(f"{url}/_meterline/sql", data=query.encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return sql.from_json(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = orjson.loads(e.read())["error"]
        except Exception:  # noqa: BLE001
            message = f"HTTP {e.code}"
        raise _Refused(message) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            raise e.reason from None
        raise


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


if __name__ == "__main__":
    sys.exit(main())
