"""The fake provider server: one aiohttp app serving the OpenAI, Anthropic and Gemini fakes, plus inspection.

Use :class:`FakeProvider` in-loop (``await fake.start()``) or in a background thread
(``fake.start_in_thread()``). Requests are recorded in ``fake.exchanges``; when the fake runs in
another process, ``GET /_fake/exchanges`` (see :func:`fetch_exchanges`) returns the same records.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.request
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from . import anthropic_api, gemini_api, hostile, openai_api
from .records import Exchange, ExchangeLog
from .scenarios import DEFAULT_CHUNK_DELAY_MS, DEFAULT_CHUNKS, Scenario, ScenarioError, parse_scenario, parse_tokens
from .wire import BadRequest, ConnectionDropped, Ctx, Provider

_CTX_KEY = web.RequestKey("fake_ctx", Ctx)
_MAX_BODY = 64 * 1024 * 1024


def provider_for(path: str) -> Optional[Provider]:
    """Which provider a request path belongs to (their paths do not collide)."""
    if path.startswith("/v1beta/") or path.startswith("/v1/models/"):
        return gemini_api.PROVIDER
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_api.PROVIDER
    if path.startswith("/v1/"):
        return openai_api.PROVIDER
    return None


def _endpoint_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for _, path, name, _ in openai_api.ROUTES + anthropic_api.ROUTES:
        if name:
            names[path] = name
    return names


_ENDPOINTS = _endpoint_names()


class FakeProvider:
    """A local HTTP server impersonating the OpenAI, Anthropic and Gemini APIs.

    ``default_scenario`` applies to requests without an ``x-fake-scenario`` header;
    ``chunks`` / ``chunk_delay_ms`` are the defaults of ``x-fake-chunks`` /
    ``x-fake-chunk-delay-ms``; with ``require_auth`` requests lacking the provider's API key
    header get the provider's authentication error.
    """

    def __init__(
        self,
        *,
        default_scenario: str = "",
        chunks: int = DEFAULT_CHUNKS,
        chunk_delay_ms: float = DEFAULT_CHUNK_DELAY_MS,
        require_auth: bool = True,
    ) -> None:
        parse_tokens(default_scenario)  # fail early on typos
        self.default_scenario = default_scenario
        self.chunks = chunks
        self.chunk_delay_ms = chunk_delay_ms
        self.require_auth = require_auth
        self.retry_after = "1"  # retry-after of errors when the request sends no x-fake-retry-after
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self._log = ExchangeLog()
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None
        self._thread_loop: Optional[asyncio.AbstractEventLoop] = None

    # ----- addresses -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port`` (no trailing slash)."""
        if self.port is None:
            raise RuntimeError("FakeProvider is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """What to pass as ``base_url`` to ``openai.OpenAI``."""
        return self.base_url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """What to pass as ``base_url`` to ``anthropic.Anthropic``."""
        return self.base_url

    @property
    def gemini_base_url(self) -> str:
        """What to pass as ``HttpOptions(base_url=...)`` to ``google.genai.Client``."""
        return self.base_url

    # ----- records -------------------------------------------------------------------------

    @property
    def exchanges(self) -> list[Exchange]:
        """Snapshot of the exchanges so far, oldest first (records may still be in progress)."""
        return self._log.snapshot()

    @property
    def last(self) -> Optional[Exchange]:
        items = self._log.snapshot()
        return items[-1] if items else None

    def clear(self) -> None:
        self._log.clear()

    def fail_with(self, scenario: str = "", retry_after: str = "1") -> None:
        """Tells this fake (not the others a test runs) how to answer requests without an
        x-fake-scenario header from now on: e.g. "error503", "reset", "stall"; "" answers normally.
        A fake in another process is told with ``POST /_fake/scenario`` (see :func:`set_scenario`)."""
        parse_tokens(scenario)
        self.default_scenario = scenario
        self.retry_after = retry_after

    async def wait_settled(self, timeout: float = 5.0) -> None:
        """Wait (in the server's loop or another) until every started exchange is finished."""
        deadline = time.monotonic() + timeout
        while self._log.pending():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._log.pending()} exchange(s) still in progress")
            await asyncio.sleep(0.005)

    def wait_settled_sync(self, timeout: float = 5.0) -> None:
        """Blocking variant of :meth:`wait_settled`, for tests using a threaded server."""
        deadline = time.monotonic() + timeout
        while self._log.pending():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._log.pending()} exchange(s) still in progress")
            time.sleep(0.005)

    # ----- lifecycle -----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=_MAX_BODY)
        for method, path, _name, handler in openai_api.ROUTES + anthropic_api.ROUTES + gemini_api.ROUTES:
            app.router.add_route(method, path, _bind(handler))
        app.router.add_get("/_fake/health", _health)
        app.router.add_get("/_fake/exchanges", self._get_exchanges)
        app.router.add_delete("/_fake/exchanges", self._delete_exchanges)
        app.router.add_post("/_fake/scenario", self._set_scenario)
        app.router.add_get("/_fake/images/{name}", _image)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "FakeProvider":
        """Start serving in the running event loop; returns self."""
        if self._runner is not None:
            raise RuntimeError("FakeProvider already started")
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self.host = host
        self.port = int(runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Stop serving; open connections are closed."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> "FakeProvider":
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> "FakeProvider":
        """Run the server in a daemon thread with its own event loop; returns self once listening."""
        if self._thread is not None:
            raise RuntimeError("FakeProvider thread already running")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("fake provider did not start in time")
        if failure:
            thread.join()
            raise failure[0]
        self._thread, self._thread_loop = thread, loop
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start_in_thread`."""
        thread, loop = self._thread, self._thread_loop
        self._thread = self._thread_loop = None
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> "FakeProvider":
        return self.start_in_thread()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop_thread()

    # ----- request pipeline --------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await handler(request)
        body = await request.read()
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request_json = _parse_json(body, headers.get("content-type", ""))
        provider = provider_for(request.path)
        exchange = self._log.begin(
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            request_headers=headers,
            request_body=body,
            request_json=request_json,
            provider=provider.name if provider else None,
            endpoint=_ENDPOINTS.get(request.path) or (gemini_api.endpoint_of(request.path) if provider is gemini_api.PROVIDER else None),
        )
        _describe_request(exchange)
        try:
            if provider is None:
                return _plain_not_found(exchange)
            if hostile.HEADER in headers:  # a broken or hostile upstream (tests/fakes/hostile.py)
                return await hostile.respond(request, exchange, headers[hostile.HEADER], headers)
            try:
                scenario = parse_scenario(
                    headers,
                    default_scenario=self.default_scenario,
                    default_chunks=self.chunks,
                    default_chunk_delay_ms=self.chunk_delay_ms,
                    default_retry_after=self.retry_after,
                )
            except ScenarioError as exc:
                return await Ctx(request, exchange, Scenario(), provider, body).send_error(400, f"fake provider: {exc}")
            exchange.scenario = tuple(sorted(scenario.tokens))
            exchange.api_key = provider.api_key(request)
            ctx = Ctx(request, exchange, scenario, provider, body)
            try:
                problem = provider.auth_problem(request) if self.require_auth else None
                if problem:
                    return await ctx.send_error(*problem)
                if scenario.error_status:
                    return await ctx.send_error(scenario.error_status)
                request[_CTX_KEY] = ctx
                return await handler(request)
            except BadRequest as exc:
                return await ctx.send_error(exc.status, exc.message)
            except web.HTTPMethodNotAllowed:
                return await ctx.send_error(405, f"Method {request.method} not allowed for {request.path}")
            except web.HTTPNotFound:
                return await ctx.send_error(404, f"Invalid URL ({request.method} {request.path})")
        except ConnectionDropped as exc:
            return exc.response if exc.response is not None else _DroppedResponse()
        finally:
            if exchange.finished_at is None:
                exchange.finished_at = time.time()

    async def _get_exchanges(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([e.to_dict() for e in self._log.snapshot()])

    async def _set_scenario(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        try:
            self.fail_with(doc.get("scenario", ""), str(doc.get("retry_after", "1")))
        except ScenarioError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"scenario": self.default_scenario})

    async def _delete_exchanges(self, request: web.Request) -> web.StreamResponse:
        self._log.clear()
        return web.json_response({"cleared": True})


class _DroppedResponse(web.StreamResponse):
    """Returned after the transport was aborted: aiohttp has nothing left to send."""

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _bind(handler: Callable[[Ctx], Awaitable[web.StreamResponse]]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def route(request: web.Request) -> web.StreamResponse:
        return await handler(request[_CTX_KEY])

    return route


def _parse_json(body: bytes, content_type: str) -> Any:
    if not body or content_type.startswith("multipart/"):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _describe_request(exchange: Exchange) -> None:
    """Fill model / stream from the request itself, before any handler runs."""
    if isinstance(exchange.request_json, dict):
        model = exchange.request_json.get("model")
        exchange.model = model if isinstance(model, str) else None
        exchange.stream = exchange.request_json.get("stream") is True
    if exchange.provider == "gemini":
        tail = exchange.path.rsplit("/", 1)[-1]
        exchange.model = tail.rpartition(":")[0] or None
        exchange.stream = exchange.endpoint == "streamGenerateContent"


def _plain_not_found(exchange: Exchange) -> web.StreamResponse:
    body = b'{"error": "not found"}'
    exchange.status = 404
    exchange.response_headers = {"content-type": "application/json"}
    exchange.response_body = exchange.response_body_decoded = body
    exchange.complete = True
    exchange.finished_at = time.time()
    return web.Response(body=body, status=404, content_type="application/json")


async def _health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


async def _image(request: web.Request) -> web.StreamResponse:
    return web.Response(body=base64.b64decode(openai_api.TINY_PNG_B64), content_type="image/png")


def fetch_exchanges(base_url: str, timeout: float = 5.0) -> list[Exchange]:
    """Exchanges of a fake running elsewhere (e.g. ``python -m tests.fakes`` in a subprocess)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/_fake/exchanges", timeout=timeout) as response:
        return [Exchange.from_dict(item) for item in json.load(response)]


def set_scenario(base_url: str, scenario: str, retry_after: str = "1", timeout: float = 5.0) -> None:
    """Tells a fake in another process how to answer requests without an x-fake-scenario header."""
    data = json.dumps({"scenario": scenario, "retry_after": retry_after}).encode()
    req = urllib.request.Request(f"{base_url.rstrip('/')}/_fake/scenario", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()


def clear_exchanges(base_url: str, timeout: float = 5.0) -> None:
    """Forget the exchanges of a fake running elsewhere."""
    request = urllib.request.Request(base_url.rstrip("/") + "/_fake/exchanges", method="DELETE")
    with urllib.request.urlopen(request, timeout=timeout):
        pass
