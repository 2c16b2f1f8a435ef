"""One try of a mixed-format route (sidecar/routes/attempts.py): the app's request translated for
a target of another wire format, described by that format's adapter (so the try is admitted,
observed and priced as the upstream's own call), and the Reply that translates its answer back."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import orjson

from ledger.records import CallInfo

from ..reply import Reply
from ..runtime import ADAPTER_MODULES
from . import pairs
from .call import TranslatingReply, _upstream_headers

_OPERATIONS = {"/v1/chat/completions": pairs.CHAT, "/v1/messages": pairs.MESSAGES}


@dataclass(slots=True)
class Try:
    adapter: ModuleType  # the target's wire format
    info: CallInfo  # the translated request, as that format's adapter describes it
    raw: bytes
    rewritten: bytes | None  # the adapter's own rewrite of the translated body (e.g. include_usage)
    path: str
    pair: pairs.Pair
    done: pairs.Translated

    def headers(self, client_headers: dict[str, str]) -> dict[str, str]:
        """The try's headers: the app's, forwarded as for any try, with the target format's auth."""
        return dict(_upstream_headers(client_headers, None, self.adapter.__name__.rsplit(".", 1)[-1]))

    def reply(self, inner: Reply, client: str) -> TranslatingReply:
        return TranslatingReply(inner, self.pair, self.done, client)


class RouteTranslation:
    """What a routed root-path call needs to translate a try: the app's format and operation."""

    __slots__ = ("client", "operation")

    def __init__(self, client: str, path: str) -> None:
        self.client = client
        self.operation = _OPERATIONS.get(path)

    def needed(self, adapter: str) -> bool:
        return adapter != self.client

    def prepare(self, doc: Any, model: str, upstream: Any) -> Try:
        """Raises TranslateError when the request cannot go to this target unchanged in meaning."""
        pair = pairs.PAIRS[(self.operation, upstream.adapter)]
        done = pair.translate(dict(doc), model, {})  # image URLs are fetched only for unrouted calls
        adapter = ADAPTER_MODULES[upstream.adapter]
        raw = orjson.dumps(done.body)
        path_only = done.target.partition("?")[0]
        info = adapter.describe(upstream.provider, path_only, done.body, raw)
        rewritten = adapter.prepare(info, done.body)
        return Try(adapter, info, rewritten if rewritten is not None else raw, rewritten, done.target, pair, done)
