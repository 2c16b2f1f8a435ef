"""The sidecar's own endpoints under /_meterline/: health, read-only SQL, metrics, the budget API and reconciliation runs.

SQL, metrics and most of health are answered by the sinks process (over sinks/link.py); the budget
API by this forwarder's guard.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path

import orjson
from aiohttp import web

from ledger import defaults  # the endpoint's row limits (the forwarder loads no DuckDB)
from ledger.budgets import RuleError, parse_rule
from sinks import rpc

from .routes import attempts as route_attempts
from . import proxy, web_guard

PREFIX = "/_meterline"
HEALTH_WAIT_S = 2.0  # healthz answers within this even when the sinks process hangs
MAX_SQL_BYTES = 64 * 1024


def add_routes(app: web.Application) -> None:
    """The admin routes, and the guard every request to the application passes (sidecar/web_guard.py)."""
    web_guard.install(app)
    app.on_shutdown.append(_give_up_waits)  # before aiohttp waits for handlers: a running query ends now
    app.router.add_get(f"{PREFIX}/healthz", healthz)
    app.router.add_post(f"{PREFIX}/sql", run_sql)
    app.router.add_get(f"{PREFIX}/metrics", metrics)
    app.router.add_get(f"{PREFIX}/budgets", list_budgets)
    app.router.add_get(f"{PREFIX}/routes", list_routes)
    app.router.add_post(f"{PREFIX}/budgets", create_budget)
    app.router.add_put(f"{PREFIX}/budgets/{{name}}", replace_budget)
    app.router.add_delete(f"{PREFIX}/budgets/{{name}}", delete_budget)
    app.router.add_post(f"{PREFIX}/budgets/{{name}}/topup", topup_budget)
    app.router.add_post(f"{PREFIX}/reconciliations", store_reconciliation)


async def healthz(request: web.Request) -> web.Response:
    """"ok", or "degraded" while ledger writes or journal appends fail, once records were lost or
    quarantined (in `rejected`) since start-up, or while the sinks process does not answer (calls
    still flow: their records wait in the journal, `sinks.backlog_bytes`); the counts say which."""
    rt = request.app[proxy.RUNTIME]
    j = rt.journal
    try:
        sinks = await rt.link.call("health", timeout=HEALTH_WAIT_S)
    except (rpc.Unavailable, rpc.Failed) as e:
        sinks = None
        problem = str(e)
    journal = {"append_failures": j.append_failures, "unwritten": len(j.unwritten), "lost": j.lost}
    if sinks is None:
        ledger = {"path": str(rt.config.ledger_path), "reachable": False, "error": problem}
        degraded = True
        telemetry = None
        # what waits for it: this forwarder's journal on disk (an upper bound: some may be read already)
        on_disk = await asyncio.get_running_loop().run_in_executor(None, _journal_bytes, j.dir)
        sinks_part = {"up": False, "error": problem, "backlog_bytes": on_disk}
    else:
        ledger = {**sinks["ledger"], "reachable": True}
        degraded = ledger["failing"] or ledger["rejected"]
        telemetry = sinks["telemetry"]
        sinks_part = {"up": True, "pid": sinks["pid"], "backlog_bytes": sinks["backlog_bytes"],
                      "open_calls": sinks["open_calls"], "interrupted": sinks["interrupted"]}
    # the fleet ledger down degrades shipping only: its rows wait in this ledger (fleet.postgres.backlog_rows)
    fleet = sinks.get("fleet") if sinks is not None else {
        "instance": rt.config.fleet.instance,  # the sinks process ships: while it is down, nothing is known
        "postgres": {"up": None, "backlog_rows": None, "lag_s": None} if rt.config.fleet.postgres else None}
    if fleet and fleet.get("postgres") is not None and fleet["postgres"]["up"] is False:
        degraded = True
    degraded = degraded or j.unwritten or j.lost
    body = {
        "status": "degraded" if degraded else "ok",
        "in_flight": rt.in_flight,
        "forwarder": {"pid": os.getpid(), "worker": rt.journal.dir.name},
        "ledger": ledger,
        "journal": journal,
        "sinks": sinks_part,
        "anomalies": dict(rt.anomalies),
        "telemetry": telemetry,
        "fleet": fleet,
    }
    if rt.routes:  # circuit states are this forwarder's (each worker keeps its own)
        body["routes"] = route_attempts.status(rt.routes)
    leases = rt.guard.leases
    if leases is not None:  # fleet.redis: shared budgets; Redis down degrades them, never a call
        body["fleet"] = {**(body["fleet"] or {"instance": rt.config.fleet.instance}), "redis": leases.state.to_json()}
        if not leases.state.up:
            body["status"] = "degraded"
    return _json(body)


async def list_routes(request: web.Request) -> web.Response:
    """Every route's strategy and targets: circuit state, times opened, recent error rate and TTFT
    (this forwarder's view: each worker keeps its own circuits)."""
    rt = request.app[proxy.RUNTIME]
    return _json({"forwarder": os.getpid(), "routes": route_attempts.status(rt.routes)})


def _journal_bytes(directory: Path) -> int:
    total = 0
    for path in directory.glob("*.jsonl"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition, from the sinks process's telemetry (the calls it has read)."""
    rt = request.app[proxy.RUNTIME]
    try:
        body, content_type = await rt.link.call("metrics")
    except (rpc.Unavailable, rpc.Failed) as e:
        return _error(503, f"metrics are unavailable: {e}")
    if rt.routes:  # circuits live in the forwarder, not in the records the sinks process reads
        body = route_attempts.metrics_text(rt.routes, body)
    leases = rt.guard.leases
    if leases is not None:  # this forwarder's view of Redis: the sinks process does not talk to it
        body = _with_fleet_metrics(body, leases.state, rt.journal.dir.name)
    return web.Response(body=body, headers={"content-type": content_type})


def _with_fleet_metrics(body: str | bytes, state: object, worker: str) -> bytes:
    """The Prometheus text with the fleet budget store's gauges added (before an OpenMetrics `# EOF`)."""
    text = body.decode() if isinstance(body, bytes) else body
    lines = [
        "# HELP meterline_fleet_redis_up Whether fleet.redis answers this forwarder (1) or not (0).",
        "# TYPE meterline_fleet_redis_up gauge",
        f'meterline_fleet_redis_up{{worker="{worker}"}} {int(state.up)}',  # type: ignore[attr-defined]
        "# HELP meterline_fleet_redis_degraded_seconds_total Time this forwarder ran without fleet.redis answering.",
        "# TYPE meterline_fleet_redis_degraded_seconds_total counter",
        f'meterline_fleet_redis_degraded_seconds_total{{worker="{worker}"}} '
        f'{state.degraded_total():.3f}',  # type: ignore[attr-defined]
    ]
    head, eof, _ = text.rpartition("# EOF")
    if not eof:
        head = text
    return (head.rstrip("\n") + "\n" + "\n".join(lines) + "\n" + (eof + "\n" if eof else "")).encode()


async def run_sql(request: web.Request) -> web.Response:
    """POST {"query": "...", "max_rows": N} (or the query as the body, any other type; `?max_rows=N`);
    answers {"columns", "rows", "truncated"}. Beyond loopback the ledger is readable only with the admin
    token. Queries run on threads of their own, at most sql.max_concurrent at once (a few more wait;
    503 past them), and are interrupted at sql.timeout_s, when the client goes away, and at shutdown."""
    cfg = request.app[proxy.RUNTIME].config
    if not _is_loopback(cfg.host):
        denied = _check_admin(request)
        if denied:
            return denied
    raw = await request.read()
    if len(raw) > MAX_SQL_BYTES:
        return _error(413, "query too long")
    query: object = raw.decode("utf-8", "replace")
    max_rows: object = request.query.get("max_rows", defaults.MAX_ROWS)
    fleet: object = request.query.get("fleet", "") in ("1", "true")  # the fleet ledger (fleet.postgres)
    if request.content_type == "application/json":
        try:
            doc = orjson.loads(raw)
            query = doc["query"]
            max_rows = doc.get("max_rows", max_rows)
            fleet = doc.get("fleet", fleet)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return _error(400, 'expected a JSON body {"query": "SELECT ..."}')
    if not isinstance(query, str) or not query.strip():
        return _error(400, "empty query")
    try:
        rows_wanted = int(max_rows)  # type: ignore[arg-type]
        if isinstance(max_rows, (bool, float)) or rows_wanted <= 0:
            raise ValueError
    except (TypeError, ValueError):
        return _error(400, f"max_rows must be a positive whole number (at most {defaults.MAX_EXPORT_ROWS})")
    rt = request.app[proxy.RUNTIME]
    try:
        # the sinks process times the query out itself (sql.timeout_s); a client that goes away
        # cancels this handler, which closes the connection, which interrupts the query there
        if fleet is not True and fleet is not False:
            return _error(400, '"fleet" must be true or false')
        kind, answer = await rt.link.call("fleet_sql" if fleet else "sql", query,
                                          min(rows_wanted, defaults.MAX_EXPORT_ROWS), timeout=None)
    except (rpc.Unavailable, rpc.Failed) as e:
        return _error(503, f"the ledger is unavailable: {e}")
    if kind == "ok":
        return web.Response(body=answer, content_type="application/json")
    status = {"busy": 503, "refused": 403, "interrupted": 400, "unavailable": 503}.get(kind, 400)
    prefix = {"refused": "refused: ", "interrupted": "query interrupted: "}.get(kind, "")
    return _error(status, prefix + answer)


async def _give_up_waits(app: web.Application) -> None:
    app[proxy.RUNTIME].link.cancel_all()


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


# --- reconciliation runs ----------------------------------------------------------------------

async def store_reconciliation(request: web.Request) -> web.Response:
    """POST one part of a finished `meterline reconcile` run (the CLI fetched the provider's reports
    itself; only the report's rows come here). The sinks process, which owns the ledger file, checks
    every value and stores the run whole when its last part arrives: 201 then, 202 before. The admin
    token is needed as for budget changes."""
    denied = _check_admin(request) or _json_typed(request)
    if denied:
        return denied
    rt = request.app[proxy.RUNTIME]
    try:
        kind, answer = await rt.link.call("reconciliation", await request.read())
    except (rpc.Unavailable, rpc.Failed) as e:
        return _error(503, f"the ledger is unavailable: {e}")
    if kind == "ok":
        return _json(answer, status=201 if answer.get("stored") else 202)
    return _error(400, answer)


# --- budgets ---------------------------------------------------------------------------------

async def list_budgets(request: web.Request) -> web.Response:
    """The rules with their spend; alerts fired here, delivered by the sinks process (null while it is down)."""
    rt = request.app[proxy.RUNTIME]
    alerts = {"fired": rt.guard.alerts_fired, "delivered": None, "failed": None, "dropped": None}
    try:
        sent = (await rt.link.call("health", timeout=HEALTH_WAIT_S))["alerts"]
        alerts.update(delivered=sent["delivered"], failed=sent["failed"], dropped=sent["dropped"])
    except (rpc.Unavailable, rpc.Failed):
        pass
    return _json({"budgets": rt.guard.status(), "refused": rt.guard.refused, "alerts": alerts})


async def create_budget(request: web.Request) -> web.Response:
    return await _put(request, None)


async def replace_budget(request: web.Request) -> web.Response:
    return await _put(request, request.match_info["name"])


async def _put(request: web.Request, name: str | None) -> web.Response:
    denied = _check_admin(request) or _json_typed(request)
    if denied:
        return denied
    rt = request.app[proxy.RUNTIME]
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "expected a JSON budget rule")
    if name is not None and isinstance(doc, dict):
        doc.setdefault("name", name)
        if doc["name"] != name:
            return _error(400, f"the body names rule {doc['name']!r}, the path {name!r}")
    try:
        rule = parse_rule(doc, "budget", rt.config.thresholds, source="api")
    except RuleError as e:
        return _error(400, str(e))
    if name is None and rule.name in rt.guard.budgets.rules:
        return _error(409, f"a rule named {rule.name!r} exists; PUT /_meterline/budgets/{rule.name} replaces it")
    await rt.guard.put_rule(rule)
    return _json({"budgets": rt.guard.status(rule.name)}, status=201 if name is None else 200)


async def delete_budget(request: web.Request) -> web.Response:
    denied = _check_admin(request)
    if denied:
        return denied
    rt = request.app[proxy.RUNTIME]
    name = request.match_info["name"]
    if not await rt.guard.remove_rule(name):
        return _error(404, f"no budget rule named {name!r}")
    return _json({"deleted": name})


async def topup_budget(request: web.Request) -> web.Response:
    """POST {"amount_usd": "10.00", "key": "<split key, for per- rules>"}: adds to a rule's USD limit."""
    denied = _check_admin(request) or _json_typed(request)
    if denied:
        return denied
    rt = request.app[proxy.RUNTIME]
    name = request.match_info["name"]
    rule = rt.guard.budgets.rules.get(name)
    if rule is None:
        return _error(404, f"no budget rule named {name!r}")
    if rule.limit_usd is None:
        return _error(400, f"rule {name!r} has no limit_usd to top up")
    try:
        doc = orjson.loads(await request.read())
        amount = Decimal(str(doc["amount_usd"]))
        key = str(doc.get("key") or "")
    except (orjson.JSONDecodeError, KeyError, TypeError, InvalidOperation):
        return _error(400, 'expected {"amount_usd": "10.00"} (and "key" for a split rule)')
    if not amount.is_finite() or amount <= 0:
        return _error(400, "amount_usd must be a positive amount")
    return _json({"budgets": await rt.guard.topup(name, key, amount)})


def _json_typed(request: web.Request) -> web.Response | None:
    """JSON bodies must say so: a page elsewhere can send text/plain or a form without a preflight."""
    if request.content_type != "application/json":
        return _error(415, "send the body as Content-Type: application/json")
    return None


def _check_admin(request: web.Request) -> web.Response | None:
    """Budget changes (and, beyond loopback, SQL) need the admin token when one is set, and always when
    listening beyond loopback. (With a token set, web_guard has already asked for it on every route.)"""
    cfg = request.app[proxy.RUNTIME].config
    token = cfg.admin_token
    if token is None:
        if _is_loopback(cfg.host):
            return None
        return _error(403, "beyond loopback this endpoint needs admin_token (or METERLINE_ADMIN_TOKEN) to be set")
    if not web_guard.token_ok(request, token):
        return _error(401, "missing or wrong admin token")
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")
