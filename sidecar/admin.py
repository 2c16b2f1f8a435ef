"""The sidecar's own endpoints under /_meterline/: health and read-only SQL."""
from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from ledger import sql

from . import proxy

PREFIX = "/_meterline"
MAX_SQL_BYTES = 64 * 1024


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{PREFIX}/healthz", healthz)
    app.router.add_post(f"{PREFIX}/sql", run_sql)


async def healthz(request: web.Request) -> web.Response:
    rt = request.app[proxy.RUNTIME]
    w = rt.writer
    body = {
        "status": "ok",
        "in_flight": rt.in_flight,
        "ledger": {"path": str(w.path), "written": w.written, "pending": w.pending,
                   "write_failures": w.failures, "last_lag_s": round(w.last_lag_s, 4)},
        "anomalies": dict(rt.anomalies),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def run_sql(request: web.Request) -> web.Response:
    """POST {"query": "..."} (or the query as text/plain); answers {"columns", "rows", "truncated"}."""
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
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type="application/json")
