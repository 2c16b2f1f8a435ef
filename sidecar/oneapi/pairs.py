"""The registry of translator pairs: (client format, upstream adapter) -> how one call's request
is translated (body, upstream path) and which module translates its answer back."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping

from ..translate import (anthropic_to_gemini, anthropic_to_openai_chat, openai_chat_to_anthropic,
                         openai_chat_to_gemini, openai_embeddings_to_gemini)

CHAT = "chat"  # /v1/chat/completions (OpenAI format)
MESSAGES = "messages"  # /v1/messages (Anthropic format)
EMBEDDINGS = "embeddings"  # /v1/embeddings (OpenAI format)

# root path -> (operation, client format: the adapter whose error bodies and headers the app reads)
ROOT_PATHS = {"/chat/completions": (CHAT, "openai"), "/messages": (MESSAGES, "anthropic"),
              "/embeddings": (EMBEDDINGS, "openai")}
# the path each adapter serves an operation on when no translation is needed
NATIVE_PATHS = {(CHAT, "openai"): "/v1/chat/completions", (MESSAGES, "anthropic"): "/v1/messages",
                (EMBEDDINGS, "openai"): "/v1/embeddings"}


@dataclass(slots=True)
class Translated:
    """One request, translated: the upstream's body and target, and what the answer needs."""

    body: dict
    target: str  # upstream path and query, after the upstream's base path
    dropped: list[str]
    stream: bool
    include_usage: bool = True
    extra: dict = field(default_factory=dict)  # per pair (embeddings: model, encoding)


Fetched = Mapping[str, tuple[str, bytes]]  # image URL -> (media type, bytes), for inline-only upstreams


@dataclass(frozen=True, slots=True)
class Pair:
    module: ModuleType  # response(), error(), StreamTranslator (not for embeddings)
    translate: Callable[[dict, str, Fetched], Translated]
    # the http(s) image URLs a request names, for upstreams that take only inline images; None: URLs pass
    image_urls: Callable[[dict], list[str]] | None = None


def _usage_wanted(doc: dict) -> bool:
    opts = doc.get("stream_options")
    return bool(isinstance(opts, dict) and opts.get("include_usage"))


def _chat_to_anthropic(doc: dict, model: str, fetched: Fetched) -> Translated:
    body, dropped = openai_chat_to_anthropic.request(doc, model)
    return Translated(body, "/v1/messages", dropped, bool(doc.get("stream")), _usage_wanted(doc))


def _chat_to_gemini(doc: dict, model: str, fetched: Fetched) -> Translated:
    body, dropped = openai_chat_to_gemini.request(doc, model, fetched)
    stream = bool(doc.get("stream"))
    return Translated(body, "/v1beta" + openai_chat_to_gemini.upstream_path(model, stream), dropped, stream,
                      _usage_wanted(doc))


def _messages_to_openai(doc: dict, model: str, fetched: Fetched) -> Translated:
    body, dropped = anthropic_to_openai_chat.request(doc, model)
    return Translated(body, "/v1/chat/completions", dropped, bool(doc.get("stream")))


def _messages_to_gemini(doc: dict, model: str, fetched: Fetched) -> Translated:
    body, dropped = anthropic_to_gemini.request(doc, model, fetched_images=fetched)
    stream = bool(doc.get("stream"))
    return Translated(body, anthropic_to_gemini.path(model, stream), dropped, stream)


def _embeddings_to_gemini(doc: dict, model: str, fetched: Fetched) -> Translated:
    call = openai_embeddings_to_gemini.request(doc, model)
    return Translated(call.body, "/v1beta/" + openai_embeddings_to_gemini.path(model, call.method), call.dropped,
                      False, extra={"model": model, "encoding": call.encoding_format})


def anthropic_image_urls(doc: dict) -> list[str]:
    """The http(s) URLs of an Anthropic request's URL image sources (tool results' too), once each."""
    found: dict[str, None] = {}

    def walk(blocks: Any) -> None:
        if not isinstance(blocks, list):
            return
        for block in blocks:
            if not isinstance(block, dict):
                continue
            source = block.get("source")
            if block.get("type") == "image" and isinstance(source, dict) and source.get("type") == "url":
                url = source.get("url")
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    found[url] = None
            walk(block.get("content"))

    for message in doc.get("messages") or []:
        if isinstance(message, dict):
            walk(message.get("content"))
    return list(found)


PAIRS: dict[tuple[str, str], Pair] = {
    (CHAT, "anthropic"): Pair(openai_chat_to_anthropic, _chat_to_anthropic),
    (CHAT, "gemini"): Pair(openai_chat_to_gemini, _chat_to_gemini, openai_chat_to_gemini.image_urls),
    (MESSAGES, "openai"): Pair(anthropic_to_openai_chat, _messages_to_openai),
    (MESSAGES, "gemini"): Pair(anthropic_to_gemini, _messages_to_gemini, lambda doc: anthropic_image_urls(doc)),
    (EMBEDDINGS, "gemini"): Pair(openai_embeddings_to_gemini, _embeddings_to_gemini),
}


def reachable(operation: str, adapter: str) -> bool:
    """Whether a call of this operation can go to an upstream of this adapter (natively or translated)."""
    return (operation, adapter) in NATIVE_PATHS or (operation, adapter) in PAIRS


# the chat formats: a chat client (CHAT or MESSAGES) reaches each of them, natively or translated
CHAT_FORMATS = frozenset({"openai", "anthropic", "gemini"})


def mixable(adapters: set[str] | frozenset[str]) -> bool:
    """Whether one route may hold targets of these adapters: every chat client reaches each of them."""
    return all(reachable(op, a) for op in (CHAT, MESSAGES) for a in adapters)
