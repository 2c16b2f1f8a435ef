"""The sidecar's own endpoints under /_meterline/: health, read-only SQL, and the budget API."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
from decimal import Decimal, InvalidOperation

import orjson
from aiohttp import web

from ledger import sql
from ledger.budgets import RuleError, parse_rule

from . import proxy

PREFIX = "/_meterline"
MAX_SQL_BYTES = 64 * 1024


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{PREFIX}/healthz", healthz)
    app.router.add_post(f"{PREFIX}/sql", run_sql)
    app.router.add_get(f"{PREFIX}/metrics", metrics)
    app.router.add_get(f"{PREFIX}/budgets", list_budgets)
    app.router.add_post(f"{PREFIX}/budgets", create_budget)
    app.router.add_put(f"{PREFIX}/budgets/{{name}}", replace_budget)
    app.router.add_delete(f"{PREFIX}/budgets/{{name}}", delete_budget)
    app.router.add_post(f"{PREFIX}/budgets/{{name}}/topup", topup_budget)


async def healthz(request: web.Request) -> web.Response:
    """"ok", or "degraded" while ledger writes or journal appends fail, or once records were lost or
    quarantined (in `rejected`) since start-up; the counts say which."""
    rt = request.app[proxy.RUNTIME]
    w = rt.writer
    j = w.journal
    rejected = w.rejected + w.rejected_at_start
    degraded = w.failing or rejected or j.unwritten or j.lost
    body = {
        "status": "degraded" if degraded else "ok",
        "in_flight": rt.in_flight,
        "ledger": {"path": str(w.path), "written": w.written, "pending": w.pending,
                   "write_failures": w.failures, "last_lag_s": round(w.last_lag_s, 4),
                   "failing": w.failing, "rejected": rejected},
        "journal": {"append_failures": j.append_failures, "unwritten": len(j.unwritten), "lost": j.lost},
        "anomalies": dict(rt.anomalies),
        "telemetry": rt.telemetry.stats() if rt.telemetry is not None else None,
    }
    return _json(body)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition, rendered on a worker thread (it costs milliseconds at many series)."""
    rt = request.app[proxy.RUNTIME]
    body, content_type = await asyncio.get_running_loop().run_in_executor(None, rt.telemetry.prometheus)
    return web.Response(body=body, headers={"content-type": content_type})


async def run_sql(request: web.Request) -> web.Response:
    """POST {"query": "..."} (or the query as text/plain); answers {"columns", "rows", "truncated"}.
    Beyond loopback the ledger is readable only with the admin token."""
    cfg = request.app[proxy.RUNTIME].config
    if not _is_loopback(cfg.host):
        denied = _check_admin(request)
        if denied:
            return denied
    raw = await request.read()
    if len(raw) > MAX_SQL_BYTES:
        return _error(413, "query too long")
    query = raw.decode("utf-8", "replace")
    if request.content_type == "application/json":
        try:
            doc = orjson.loads(raw)
            query = doc["query"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, 'expected a JSON body {"query": "SELECT ..."}')
    if not isinstance(query, str) or not query.strip():
        return _error(400, "empty query")
    rt = request.app[proxy.RUNTIME]
    con = rt.writer.con
    if con is None:
        return _error(503, "ledger not open")
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(None, sql.run, con, query)
    except sql.QueryRefused as e:
        return _error(403, f"refused: {e}")
    except Exception as e:  # noqa: BLE001 - a bad query is the caller's error, shown as DuckDB says it
        return _error(400, str(e))
    return web.Response(body=sql.to_json(result), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


# --- budgets ---------------------------------------------------------------------------------

async def list_budgets(request: web.Request) -> web.Response:
    rt = request.app[proxy.RUNTIME]
    return _json({"budgets": rt.guard.status(), "refused": rt.guard.refused,
                  "alerts": {"fired": rt.guard.alerts.stats.fired, "delivered": rt.guard.alerts.stats.delivered,
                             "failed": rt.guard.alerts.stats.failed, "dropped": rt.guard.alerts.stats.dropped}})


async def create_budget(request: web.Request) -> web.Response:
    return await _put(request, None)


async def replace_budget(request: web.Request) -> web.Response:
    return await _put(request, request.match_info["name"])


async def _put(request: web.Request, name: str | None) -> web.Response:
    denied = _check_admin(request)
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
    denied = _check_admin(request)
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


def _check_admin(request: web.Request) -> web.Response | None:
    """Budget changes (and, beyond loopback, SQL) need the admin token when one is set, and always when
    listening beyond loopback."""
    cfg = request.app[proxy.RUNTIME].config
    token = cfg.admin_token
    if token is None:
        if _is_loopback(cfg.host):
            return None
        return _error(403, "beyond loopback this endpoint needs admin_token (or METERLINE_ADMIN_TOKEN) to be set")
    given = request.headers.get("x-meterline-admin-token", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = given or auth[7:]
    if not hmac.compare_digest(given.encode(), token.encode()):
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
