"""The floor for the benchmarks: a bare aiohttp forwarder with no metering (one pooled session, bytes streamed through, uvloop).

`/<anything>/<path>` is forwarded to `<upstream><path>`, as meterline routes `/openai/...`, so the
same load scripts drive both.

    python bench/bare_forwarder.py --port 9101 --upstream http://127.0.0.1:9100
"""
from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
_DROP = frozenset({"host", "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                   "content-length", "proxy-connection"})


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = request.app[UPSTREAM] + "/" + request.match_info["tail"]
    if request.query_string:
        url += "?" + request.query_string
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
    body = await request.read()
    async with session.request(request.method, url, data=body, headers=headers, allow_redirects=False) as up:
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        for key, value in up.headers.items():
            if key.lower() not in _DROP:
                resp.headers.add(key, value)
        if "content-length" in up.headers:
            resp.content_length = int(up.headers["content-length"])
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def lifecycle(app: web.Application):
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[SESSION].close()


async def serve(host: str, port: int, upstream: str) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.router.add_route("*", "/{prefix}/{tail:.*}", forward)
    app.cleanup_ctx.append(lifecycle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True, backlog=1024).start()
    print(f"bare forwarder listening on http://{host}:{port} -> {upstream}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    import uvloop

    try:
        uvloop.run(serve(args.host, args.port, args.upstream))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
