"""The sidecar's own endpoints under /_meterline/: health, read-only SQL, and the budget API."""
from __future__ import annotations

import asyncio
import ipaddress
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal, InvalidOperation

import orjson
from aiohttp import web

from ledger import sql
from ledger.budgets import RuleError, parse_rule

from . import proxy, web_guard

PREFIX = "/_meterline"
MAX_SQL_BYTES = 64 * 1024


def add_routes(app: web.Application) -> None:
    """The admin routes, and the guard every request to the application passes (sidecar/web_guard.py)."""
    web_guard.install(app)
    app.on_startup.append(_start_queries)
    app.on_shutdown.append(_stop_queries)  # before aiohttp waits for handlers: a running query ends now
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
    max_rows: object = request.query.get("max_rows", sql.MAX_ROWS)
    if request.content_type == "application/json":
        try:
            doc = orjson.loads(raw)
            query = doc["query"]
            max_rows = doc.get("max_rows", max_rows)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return _error(400, 'expected a JSON body {"query": "SELECT ..."}')
    if not isinstance(query, str) or not query.strip():
        return _error(400, "empty query")
    try:
        rows_wanted = int(max_rows)  # type: ignore[arg-type]
        if isinstance(max_rows, (bool, float)) or rows_wanted <= 0:
            raise ValueError
    except (TypeError, ValueError):
        return _error(400, f"max_rows must be a positive whole number (at most {sql.MAX_EXPORT_ROWS})")
    rt = request.app[proxy.RUNTIME]
    con = rt.writer.con
    if con is None:
        return _error(503, "ledger not open")
    try:
        result = await request.app[_QUERIES].run(con, query, min(rows_wanted, sql.MAX_EXPORT_ROWS))
    except _Busy as e:
        return _error(503, str(e))
    except sql.QueryRefused as e:
        return _error(403, f"refused: {e}")
    except sql.QueryInterrupted as e:
        return _error(400, f"query interrupted: {e}")
    except Exception as e:  # noqa: BLE001 - a bad query is the caller's error, shown as DuckDB says it
        return _error(400, str(e))
    return web.Response(body=sql.to_json(result), content_type="application/json")


class _Busy(Exception):
    pass


class Queries:
    """The SQL endpoint's queries: a bounded pool of threads of their own (the loop's default executor
    stays free for the rest), each query with a timer that interrupts it. Up to QUEUED_PER_THREAD
    queries per thread wait their turn (the dashboard sends 7 at once); past that, 503."""

    QUEUED_PER_THREAD = 8
    REPEAT_S = 0.2

    def __init__(self, max_concurrent: int, timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_admitted = max_concurrent * self.QUEUED_PER_THREAD
        self.timeout_s = timeout_s
        self.executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="meterline-sql")
        self.running: dict[sql.Handle, Future] = {}  # admitted, until their thread is done with them
        self.closed = False

    async def run(self, con: object, query: str, max_rows: int) -> sql.Result:
        if self.closed:
            raise _Busy("the sidecar is shutting down")
        if len(self.running) >= self.max_admitted:
            raise _Busy(f"{len(self.running)} queries are running or waiting ({self.max_concurrent} at a time, "
                        "sql.max_concurrent): try again shortly")
        loop = asyncio.get_running_loop()
        handle = sql.Handle()
        future = self.executor.submit(sql.run, con, query, max_rows, handle)
        self.running[handle] = future
        future.add_done_callback(lambda _: self._done(loop, handle))
        timer = loop.call_later(self.timeout_s, self._stop, handle,
                                f"it ran longer than {self.timeout_s:g} s (sql.timeout_s)")
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler)
            self._stop(handle, "the client went away")
            raise
        finally:
            timer.cancel()

    def _stop(self, handle: sql.Handle, reason: str) -> None:
        """Interrupts the query, again every REPEAT_S until its thread is done with it: DuckDB clears an
        interrupt that lands between two statements (the read-only BEGIN and the query) when the next starts."""
        future = self.running.get(handle)
        if future is None or future.done():
            return
        handle.interrupt(reason)
        asyncio.get_running_loop().call_later(self.REPEAT_S, self._stop, handle, reason)

    def _done(self, loop: asyncio.AbstractEventLoop, handle: sql.Handle) -> None:
        try:
            loop.call_soon_threadsafe(self.running.pop, handle, None)
        except RuntimeError:  # the loop is closed: nothing left to count
            pass

    def close(self) -> None:
        """Interrupts every running query; the threads end as soon as DuckDB notices (milliseconds)."""
        self.closed = True
        for handle in list(self.running):
            self._stop(handle, "the sidecar is shutting down")
        self.executor.shutdown(wait=False, cancel_futures=True)


_QUERIES = web.AppKey("sql_queries", Queries)


async def _start_queries(app: web.Application) -> None:
    cfg = app[proxy.RUNTIME].config
    app[_QUERIES] = Queries(cfg.sql_max_concurrent, cfg.sql_timeout_s)


async def _stop_queries(app: web.Application) -> None:
    queries = app.get(_QUERIES)
    if queries is not None:
        queries.close()


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
