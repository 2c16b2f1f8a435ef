"""One call on a root path: the model name resolved to an upstream (or a route), the request
translated for it, and the answer translated back through a Reply wrapper, while the forwarder's
own observer meters the upstream's untranslated bytes."""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl

import orjson
from multidict import CIMultiDict, MultiDict

from .. import attribution
from ..reply import Incoming, Reply
from ..runtime import ADAPTER_MODULES, Runtime
from ..translate import models_list
from ..translate.base import TranslateError, dropped_header
from . import images, pairs

Forward = Callable[[Runtime, Incoming, Reply, float], Awaitable[None]]

# the app's credentials and the client-format headers that must not reach an upstream of another format
_CLIENT_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "anthropic-version", "anthropic-beta",
                             "openai-organization", "openai-project", "content-length", "accept-encoding",
                             "content-type"})
ANTHROPIC_VERSION = "2023-06-01"
DROPPED_HEADER = "x-meterline-dropped"


def serves(path: str) -> bool:
    """Whether a path under /v1 is a One API root path."""
    return path in pairs.ROOT_PATHS or path == "/models" or path.startswith("/models/")


def _error(client: str, status: int, message: str, kind: str) -> bytes:
    return ADAPTER_MODULES[client].error_body(status, f"meterline: {message}", kind)


async def forward(rt: Runtime, incoming: Incoming, reply: Reply, t0: float, direct: Forward) -> None:
    """Serves one root-path call; `direct` is proxy.forward, which meters and sends it upstream."""
    path = incoming.path
    if path == "/models" or path.startswith("/models/"):
        _models(rt, incoming, reply)
        return
    operation, client = pairs.ROOT_PATHS[path]
    if incoming.method != "POST":
        reply.simple(405, _error(client, 405, f"{incoming.method} /v1{path} is not served; use POST", "meterline_method"))
        return
    try:
        doc = orjson.loads(incoming.body)
    except orjson.JSONDecodeError:
        doc = None
    name = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        reply.simple(400, _error(client, 400, "the body must be a JSON object with a string 'model': "
                                 "'<upstream>/<model>' or a route name", "meterline_bad_model"))
        return
    route = rt.routes.get(name) if rt.routes else None
    if route is not None:
        await _routed(rt, incoming, reply, t0, direct, operation, client, route)
        return
    up_name, _, model = name.partition("/")
    upstream = rt.config.upstreams.get(up_name)
    if upstream is None or not model or up_name == "_meterline":
        reply.simple(404, _error(client, 404, f"model {name!r} names no route and no configured upstream "
                                 "(use '<upstream>/<model>' with an upstream under 'upstreams:', or a route name)",
                                 "meterline_unknown_model"))
        return
    adapter = upstream.adapter
    formats = (client, adapter)
    native = pairs.NATIVE_PATHS.get((operation, adapter))
    headers = _upstream_headers(incoming.headers, upstream.api_key, adapter)
    if native is not None:  # the same format: only the model is rewritten
        doc["model"] = model
        await direct(rt, _incoming(incoming, up_name, native, orjson.dumps(doc), headers, formats), reply, t0)
        return
    pair = pairs.PAIRS.get((operation, adapter))
    if pair is None:
        reply.simple(400, _error(client, 400, f"upstream {up_name!r} speaks {adapter}; /v1{path} cannot be "
                                 f"translated to it", "meterline_no_translator"))
        return
    try:
        fetched: dict[str, tuple[str, bytes]] = {}
        urls = pair.image_urls(doc) if pair.image_urls is not None else []
        if urls:
            opts = rt.config.translate
            if not opts.fetch_images:
                raise TranslateError(400, f"upstream {up_name!r} ({adapter}) takes only inline image data and this "
                                          f"request names image URLs ({urls[0]}); send the image as base64 data, or "
                                          "set the config key translate.fetch_images: true to let meterline fetch them")
            fetched = await images.fetch(urls, opts.max_image_bytes, opts.image_timeout_s)
        done = pair.translate(doc, model, fetched)
    except TranslateError as e:
        reply.simple(e.status, _error(client, e.status, e.message, "meterline_translate"))
        return
    out = TranslatingReply(reply, pair, done, client)
    await direct(rt, _incoming(incoming, up_name, done.target, orjson.dumps(done.body), headers, formats), out, t0)


async def _routed(rt: Runtime, incoming: Incoming, reply: Reply, t0: float, direct: Forward,
                  operation: str, client: str, route: Any) -> None:
    """A route name: the route's own machinery (sidecar/routes) runs it on a path of its format."""
    adapter = route.route.adapter
    adapters = {rt.config.upstreams[t.upstream].adapter for t in route.route.targets}
    if adapters != {client} and all(pairs.reachable(operation, a) for a in adapters) \
            and operation in (pairs.CHAT, pairs.MESSAGES):
        # each try is translated for its target (sidecar/oneapi/routed.py); the call itself is
        # described in the app's format, on an upstream of that format (a target's if there is one)
        names = [t.upstream for t in route.route.targets] + list(rt.config.upstreams)
        first = next((n for n in names if n != "_meterline" and rt.config.upstreams[n].adapter == client), None)
        if first is not None:
            native = pairs.NATIVE_PATHS[(operation, client)]
            await direct(rt, _incoming(incoming, first, native, incoming.body, incoming.headers, (client, client)),
                         reply, t0)
            return
    native = pairs.NATIVE_PATHS.get((operation, adapter))
    if native is None:
        reply.simple(400, _error(client, 400, f"route {route.route.name!r} has {adapter} targets; /v1{incoming.path} "
                                 "cannot be translated to them", "meterline_route_format"))
        return
    first = route.route.targets[0].upstream
    upstream = rt.config.upstreams[first]
    headers = _upstream_headers(incoming.headers, None, upstream.adapter)
    await direct(rt, _incoming(incoming, first, native, incoming.body, headers, (client, adapter)), reply, t0)


def _incoming(incoming: Incoming, upstream: str, target: str, body: bytes, headers: CIMultiDict[str],
              formats: tuple[str, str]) -> Incoming:
    path, _, query = target.partition("?")
    return Incoming(incoming.method, upstream, path, query, target, headers, body, formats,
                    attribution.api_key(incoming.headers, incoming.query))


def _upstream_headers(headers: Any, api_key: str | None, adapter: str) -> CIMultiDict[str]:
    """The app's headers without its client-format ones, plus the upstream's own auth: the
    upstream's configured key, else the app's key moved into the header the upstream reads."""
    out: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in headers.items() if k.lower() not in _CLIENT_HEADERS)
    out["Content-Type"] = "application/json"
    out["Accept-Encoding"] = "identity"  # the answer is translated, so it must come uncompressed
    key = api_key or attribution.api_key(headers, "")
    if adapter == "anthropic":
        out["anthropic-version"] = headers.get("anthropic-version") or ANTHROPIC_VERSION
        if headers.get("anthropic-beta"):
            out["anthropic-beta"] = headers["anthropic-beta"]
        if key:
            out["x-api-key"] = key
    elif adapter == "gemini":
        if key:
            out["x-goog-api-key"] = key
    elif key:
        out["Authorization"] = f"Bearer {key}"
    return out


def _models(rt: Runtime, incoming: Incoming, reply: Reply) -> None:
    """GET /v1/models and /v1/models/{id}: the route targets and route names the config reaches."""
    anthropic = models_list.wants_anthropic(incoming.headers)
    client = "anthropic" if anthropic else "openai"
    if incoming.method != "GET":
        reply.simple(405, _error(client, 405, f"{incoming.method} /v1{incoming.path} is not served; use GET",
                                 "meterline_method"))
        return
    entries = []
    names: list[str] = []
    for name, routed in (rt.routes or {}).items():
        names.append(name)
        for t in routed.route.targets:
            up = rt.config.upstreams.get(t.upstream)
            if up is not None:
                entries.append(models_list.ModelEntry(t.upstream, t.model, up.provider))
    if incoming.path == "/models":
        query = MultiDict(parse_qsl(incoming.query, keep_blank_values=True))
        body = models_list.models_list(entries, names, incoming.headers, query)
        reply.simple(200, orjson.dumps(body))
        return
    try:
        body = models_list.retrieve(entries, names, incoming.target.partition("?")[0][len("/models/"):], anthropic)
    except TranslateError as e:
        reply.simple(e.status, _error(client, e.status, e.message, "meterline_unknown_model"))
        return
    reply.simple(200, orjson.dumps(body))


class TranslatingReply:
    """A Reply that hands the app the translated answer: whole JSON bodies translated at the end,
    streams event by event through the pair's StreamTranslator, errors through its error()."""

    def __init__(self, inner: Reply, pair: pairs.Pair, done: pairs.Translated, client: str) -> None:
        self.inner = inner
        self.pair = pair
        self.done = done
        self.client = client
        self.defers_final = inner.defers_final
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.stream: Any = None  # the StreamTranslator of a 2xx stream
        self.held: list[bytes] = []  # a whole body (or an error body) until its end
        self.created = int(time.time())

    def _extra(self) -> dict[str, str]:
        return {DROPPED_HEADER: dropped_header(self.done.dropped)} if self.done.dropped else {}

    def simple(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        # the sidecar's own answers (refusals, 502s) are in the upstream's format: translate them too
        if status >= 400:
            try:
                status, doc = self.pair.module.error(status, orjson.loads(body))
                body = orjson.dumps(doc)
            except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
                pass
        self.inner.simple(status, body, {**(headers or {}), **self._extra()})

    def unsent(self) -> bool:
        return self.inner.unsent()

    def abort(self) -> None:
        self.inner.abort()

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], whole: bool) -> None:
        self.status, self.reason = status, reason
        keep = [(k, v) for k, v in headers if k.lower() not in ("content-length", "content-type", "content-encoding")]
        keep += list(self._extra().items())
        if status < 400 and not whole and self.done.stream and hasattr(self.pair.module, "StreamTranslator"):
            self.stream = self.pair.module.StreamTranslator(self.created, self.done.include_usage)
            await self.inner.start(status, reason, keep + [("Content-Type", "text/event-stream; charset=utf-8")],
                                   whole=False)
        else:
            self.headers = keep + [("Content-Type", "application/json")]

    async def write(self, data: bytes) -> None:
        if self.stream is not None:
            out = self.stream.feed(data)
            if out:
                await self.inner.write(out)
        else:
            self.held.append(data)

    async def finish(self, last: bytes | None) -> None:
        if self.stream is not None:
            tail = (self.stream.feed(last) if last else b"") + self.stream.finish()
            await self.inner.finish(tail or None)
            return
        if last:
            self.held.append(last)
        status, body = self._whole(b"".join(self.held))
        await self.inner.start(status, self.reason if status == self.status else "", self.headers, whole=True)
        await self.inner.finish(body)

    def _whole(self, raw: bytes) -> tuple[int, bytes]:
        """A whole upstream body -> (status, body) for the app."""
        module = self.pair.module
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        try:
            if self.status >= 400:
                status, out = module.error(self.status, doc if doc is not None else raw.decode("utf-8", "replace"))
                return status, orjson.dumps(out)
            if not isinstance(doc, dict):
                raise ValueError("the upstream's body is not a JSON object")
            if module is pairs.openai_embeddings_to_gemini:
                out = module.response(doc, self.done.extra["model"], self.done.extra["encoding"])
            else:
                out = module.response(doc, self.created)
            return self.status, orjson.dumps(out)
        except (TranslateError, ValueError, TypeError, KeyError, AttributeError) as e:
            message = e.message if isinstance(e, TranslateError) else f"{type(e).__name__}: {e}"
            return 502, _error(self.client, 502, f"the upstream's answer could not be translated: {message}",
                               "meterline_translate")
