"""The built-in dashboard: serves dashboards/web (read into memory at start-up) and the page's small config endpoint.

The page itself reads the ledger only through POST /_meterline/sql and GET /_meterline/budgets.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from . import proxy

log = logging.getLogger("meterline.dashboard")

PREFIX = "/_meterline"
WEB_DIR = Path(__file__).resolve().parents[1] / "dashboards" / "web"
POLL_S = 3
MAX_FILE_BYTES = 4 * 1024 * 1024

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
    ".license": "text/plain; charset=utf-8",  # vendor/uPlot.LICENSE
    "": "text/plain; charset=utf-8",  # LICENSE
}
# no third-party origin at all: scripts, styles, data and images come from the sidecar itself
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str
    cache_control: str


_ASSETS = web.AppKey("dashboard_assets", dict)
_ADDED = web.AppKey("dashboard_added", bool)


def add_routes(app: web.Application, web_dir: Path = WEB_DIR) -> None:
    """Registers GET /_meterline/ (the page), /_meterline/static/{path} and /_meterline/dashboard/config.

    Safe to call twice (the second call does nothing). Files are read once, on a worker thread, when
    the application starts; requests are answered from memory and never touch the file system.
    """
    if app.get(_ADDED):
        return
    app[_ADDED] = True
    assets: dict[str, Asset] = {}
    app[_ASSETS] = assets

    async def load(app: web.Application) -> None:
        loaded = await asyncio.get_running_loop().run_in_executor(None, load_assets, web_dir)
        assets.update(loaded)
        if "index.html" not in assets:
            log.warning("dashboard files not found under %s: /_meterline/ will answer 404", web_dir)

    app.on_startup.append(load)
    app.router.add_get(PREFIX, _redirect)
    app.router.add_get(f"{PREFIX}/", index)
    app.router.add_get(f"{PREFIX}/static/{{path:.+}}", static)
    app.router.add_get(f"{PREFIX}/dashboard/config", config)


def load_assets(web_dir: Path) -> dict[str, Asset]:
    """Every regular file under web_dir, keyed by its relative POSIX path (runs on a worker thread)."""
    assets: dict[str, Asset] = {}
    if not web_dir.is_dir():
        return assets
    root = web_dir.resolve()
    for path in sorted(root.rglob("*")):
        rel_path = path.relative_to(root)
        if not path.is_file() or path.is_symlink() or any(p.startswith(".") for p in rel_path.parts):
            continue
        rel = rel_path.as_posix()
        body = path.read_bytes()
        if len(body) > MAX_FILE_BYTES:
            log.warning("dashboard file %s is over %d bytes: not served", rel, MAX_FILE_BYTES)
            continue
        suffix = path.suffix.lower()
        content_type = _TYPES.get(suffix, "application/octet-stream")
        # vendored libraries change only with a new release of meterline; our own files revalidate
        cache = "public, max-age=86400" if rel.startswith("vendor/") else "no-cache"
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[rel] = Asset(body, content_type, etag, cache)
    return assets


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(f"{PREFIX}/")


async def index(request: web.Request) -> web.StreamResponse:
    return _serve(request, "index.html")


async def static(request: web.Request) -> web.StreamResponse:
    path = request.match_info["path"]
    parts = PurePosixPath(path).parts
    # lookups are in a dict of loaded files, so nothing outside dashboards/web is reachable; refuse
    # odd names outright all the same
    if (not parts or path.startswith("/") or "\\" in path or "\x00" in path
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts)):
        raise web.HTTPNotFound()
    return _serve(request, "/".join(parts))


def _serve(request: web.Request, name: str) -> web.StreamResponse:
    asset = request.app[_ASSETS].get(name)
    if asset is None:
        raise web.HTTPNotFound(text="not found" if name != "index.html" else
                               "the dashboard's files are not installed (dashboards/web)")
    headers = {"ETag": asset.etag, "Cache-Control": asset.cache_control, "X-Content-Type-Options": "nosniff"}
    if name.endswith(".html"):
        headers["Content-Security-Policy"] = _CSP
        headers["Referrer-Policy"] = "no-referrer"
    if asset.etag in _etags(request.headers.get("If-None-Match", "")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def _etags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


async def config(request: web.Request) -> web.Response:
    """What the page needs besides SQL: where traces live, and how often to poll."""
    cfg = request.app[proxy.RUNTIME].config
    # fleet: whether the page offers "whole fleet" (the fleet ledger, fleet.postgres) beside this sidecar
    body = {"jaeger_ui_url": jaeger_ui_url(cfg.telemetry), "poll_s": POLL_S, "app": cfg.app,
            "fleet": bool(cfg.fleet.postgres), "instance": cfg.fleet.instance}
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def jaeger_ui_url(telemetry: dict) -> str | None:
    """`telemetry.jaeger_ui_url` when it is an http(s) URL (links are `{url}/trace/{trace_id}`), else None."""
    value = telemetry.get("jaeger_ui_url") if isinstance(telemetry, dict) else None
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        log.warning("telemetry.jaeger_ui_url is not an http(s) URL: trace links are off")
        return None
    return value
