"""Request guarding for the sidecar's aiohttp application: body cap, Host allow-list, cross-site refusals and the admin token.

A web page open in the user's browser can send requests to the sidecar: "simple" cross-origin
requests (no-cors, text/plain bodies) reach it without a preflight, and DNS rebinding lets a page on
its own domain read the answers. So, on the aiohttp application (which serves /_meterline/ and the
connections the front hands over):

- a /_meterline/ body past the front's cap (server.MAX_ADMIN_BODY) is refused from its
  Content-Length before it is read, as the front refuses it on the connections it serves;
- a `Host` that sidecar/hostcheck.py does not allow gets 421 (DNS rebinding), on every route but
  healthz (which probes may reach by a pod IP, and which reveals nothing of the ledger); proxied
  calls on these connections get theirs from proxy.handle, in the provider-style error shape;
- under /_meterline/, a mutation (any method but GET/HEAD/OPTIONS; SQL is a POST too: a query can
  burn a core) with a foreign `Origin` or a `Sec-Fetch-Site` of `cross-site`/`same-site` gets 403;
- when an admin token is set, every /_meterline/ endpoint but healthz and the dashboard's own files
  needs it (`x-meterline-admin-token`, or `Authorization: Bearer`, for Prometheus), loopback included.
"""
from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from . import proxy, server
from .hostcheck import host_ok
from .reply import closing, timed_out

PREFIX = "/_meterline"
HEALTHZ = f"{PREFIX}/healthz"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_HEADER = "x-meterline-admin-token"
_INSTALLED = web.AppKey("web_guard_installed", bool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application) -> None:
    """Adds the two middlewares to the application (once)."""
    if app.get(_INSTALLED):
        return
    app[_INSTALLED] = True
    app.middlewares.extend((body_cap, guard))  # the body cap first: a refusal reads no body


@web.middleware
async def body_cap(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/_meterline/ requests on connections aiohttp serves get the front's cap (server.MAX_ADMIN_BODY):
    refused from Content-Length before a byte of body is read, and a chunked body is cut there."""
    if not request.path.startswith(f"{PREFIX}/"):
        return await handler(request)
    length = request.content_length
    if length is None or length <= server.MAX_ADMIN_BODY:
        if not request.body_exists:
            return await handler(request)
        request = request.clone(client_max_size=server.MAX_ADMIN_BODY)
        # read here, whole within body_idle_s (at most 1 MiB; the handler's read() gets it): a stalled body ends the connection
        idle_s = request.app[proxy.RUNTIME].config.body_idle_timeout_s
        try:
            await asyncio.wait_for(request.read(), idle_s)
        except asyncio.TimeoutError:
            return await timed_out(request, idle_s)
        except web.HTTPRequestEntityTooLarge:
            pass  # a chunked body past the cap, found as it was read
        else:
            return await handler(request)
    return await closing(request, 413, "request body too large", "meterline_too_large")


def is_open(path: str) -> bool:
    """Paths that need no token: healthz, and the dashboard's page and static files (they hold no data)."""
    return path in (HEALTHZ, PREFIX, f"{PREFIX}/") or path.startswith(f"{PREFIX}/static/")


def given_token(request: web.Request) -> str:
    given = request.headers.get(TOKEN_HEADER, "")
    auth = request.headers.get("authorization", "")
    if not given and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given


def token_ok(request: web.Request, token: str) -> bool:
    return hmac.compare_digest(given_token(request).encode(), token.encode())


def cross_site(request: web.Request) -> str | None:
    """Why this request comes from another site's page, or None. Non-browser clients send neither
    header; a browser sends Origin on every POST and Sec-Fetch-Site to loopback."""
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site: {site}"
    origin = request.headers.get("origin")
    if origin is not None:
        own = (request.headers.get("host") or "").strip().lower()
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in ("http", "https") or not own or parts.netloc != own:
            return f"Origin {origin!r} is not this sidecar's"
    return None


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path == HEALTHZ:
        return await handler(request)
    if path != PREFIX and not path.startswith(f"{PREFIX}/"):
        # a proxied call: proxy.handle checks its Host and answers 421 in the provider-style error shape
        return await handler(request)
    cfg = request.app[proxy.RUNTIME].config
    if not host_ok(request.headers.get("host"), cfg.allowed_hosts):
        return _error(421, "this sidecar does not serve that Host (add it to allowed_hosts in the config)")
    if request.method not in SAFE_METHODS:
        why = cross_site(request)
        if why is not None:
            return _error(403, f"refused: a request from another site's page ({why})")
    token = cfg.admin_token
    if token is not None and not is_open(path) and not token_ok(request, token):
        return _error(401, "missing or wrong admin token: send x-meterline-admin-token (or Authorization: Bearer); "
                           "open the dashboard as /_meterline/#token=TOKEN")
    return await handler(request)


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type="application/json")
