"""Fake Gemini API: POST /v1beta|/v1 /models/{model}:generateContent, :streamGenerateContent, embeddings, countTokens.

Usage convention (see ``tokens.py`` for the counts): ``promptTokenCount = fresh + cache_read``
with ``cachedContentTokenCount = cache_read`` INSIDE it, ``candidatesTokenCount = output``,
``thoughtsTokenCount = reasoning`` (not part of candidates), and
``totalTokenCount = promptTokenCount + candidatesTokenCount + thoughtsTokenCount``.
Streamed chunks carry usageMetadata without ``candidatesTokenCount`` except the last, complete one.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from . import naming
from .openai_api import embedding_vector
from .scenarios import Scenario
from .tokens import Counts, reply_parts, reply_text
from .tools import TOOL_ARGS, first_tool
from .wire import BadRequest, Ctx, JsonArrayFraming, Provider, SseFraming, dumps_pretty, dumps_spaced

JSON_CT = "application/json; charset=UTF-8"
SSE_CT = "text/event-stream"

_STATUSES = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and billing details."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "The request timed out. Please try again."),
}


def _status_of(status: int) -> tuple[str, str]:
    return _STATUSES.get(status, ("INTERNAL" if status >= 500 else "FAILED_PRECONDITION", f"Error {status}."))


class GeminiProvider(Provider):
    name = "gemini"

    def error_payload(self, status: int, message: Optional[str], scenario: Scenario) -> tuple[bytes, str, dict[str, str]]:
        grpc_status, default_message = _status_of(status)
        error: dict[str, Any] = {"code": status, "message": message or default_message, "status": grpc_status}
        headers: dict[str, str] = {}
        if status == 429:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{scenario.retry_after}s"}]
            headers["retry-after"] = scenario.retry_after
        return dumps_pretty({"error": error}), JSON_CT, headers

    def api_key(self, request: web.Request) -> Optional[str]:
        return request.headers.get("x-goog-api-key", "").strip() or request.query.get("key", "").strip() or None

    def auth_problem(self, request: web.Request) -> Optional[tuple[int, str]]:
        if self.api_key(request):
            return None
        return (
            403,
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API.",
        )


PROVIDER = GeminiProvider()


def usage_metadata(c: Counts, final: bool = True) -> dict[str, Any]:
    """usageMetadata of a response; streamed non-final chunks omit the candidates count."""
    prompt = c.fresh + c.cache_read
    candidates = c.output if final else 0
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if final:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt + candidates + c.reasoning
    if c.cache_read:
        usage["cachedContentTokenCount"] = c.cache_read
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if c.cache_read:
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": c.cache_read}]
    if c.reasoning:
        usage["thoughtsTokenCount"] = c.reasoning
    return usage


def _candidate(text: str, finished: bool, tool: Optional[str] = None) -> dict[str, Any]:
    # a function call comes whole, in one part (Gemini does not stream its arguments)
    part = {"functionCall": {"name": tool, "args": TOOL_ARGS}} if tool else {"text": text}
    out: dict[str, Any] = {"content": {"parts": [part], "role": "model"}}
    if finished:
        out["finishReason"] = "STOP"
    out["index"] = 0
    return out


def _model_from(path_model: str) -> str:
    return path_model.removeprefix("models/")


def _stream_error_event() -> tuple[dict[str, Any], Optional[str]]:
    status, message = _status_of(500)
    return {"error": {"code": 500, "message": message, "status": status}}, None


async def generate_content(ctx: Ctx, model: str) -> web.StreamResponse:
    body = ctx.json_body()
    if not isinstance(body.get("contents"), list):
        raise BadRequest(400, "* GenerateContentRequest.contents: contents is not specified")
    usage = usage_metadata(ctx.counts)
    response_id = naming.gemini_response_id()
    ctx.describe(model=model, response_model=model, response_id=response_id, stream=False, computed_usage=usage)
    obj = {
        "candidates": [_candidate(reply_text(ctx.scenario.chunks), True,
                                  first_tool(body) if ctx.scenario.has("tool-call") else None)],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": response_id,
    }
    return await ctx.send_bytes(dumps_pretty(obj), content_type=JSON_CT, usage=usage)


async def stream_generate_content(ctx: Ctx, model: str) -> web.StreamResponse:
    body = ctx.json_body()
    if not isinstance(body.get("contents"), list):
        raise BadRequest(400, "* GenerateContentRequest.contents: contents is not specified")
    sse = ctx.request.query.get("alt") == "sse"
    final_usage = usage_metadata(ctx.counts)
    partial_usage = usage_metadata(ctx.counts, final=False)
    response_id = naming.gemini_response_id()
    ctx.describe(model=model, response_model=model, response_id=response_id, stream=True, computed_usage=final_usage)
    if sse:
        s = await ctx.open_stream(
            content_type=SSE_CT, framing=SseFraming(b"\r\n\r\n"), dumps=dumps_spaced, error_event=_stream_error_event
        )
    else:
        s = await ctx.open_stream(
            content_type=JSON_CT, framing=JsonArrayFraming(), dumps=dumps_pretty, error_event=_stream_error_event
        )
    tool = first_tool(body) if ctx.scenario.has("tool-call") else None
    parts = [""] if tool else reply_parts(ctx.scenario.chunks)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        usage = final_usage if last else partial_usage
        chunk = {
            "candidates": [_candidate(part, last, tool)],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": response_id,
        }
        await s.content(chunk)
        s.note_usage(usage)
    return await s.finish()


def _embedding_usage(model: str, prompt: int) -> Optional[dict[str, Any]]:
    """Only the gemini-embedding-2 family reports usage on embedding responses."""
    if not model.startswith("gemini-embedding-2"):
        return None
    return {"promptTokenCount": prompt, "promptTokenDetails": [{"modality": "TEXT", "tokenCount": prompt}]}


def _content_text(content: Any) -> str:
    if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
        raise BadRequest(400, "* EmbedContentRequest.content: content is not specified")
    return "".join(str(p.get("text", "")) for p in content["parts"] if isinstance(p, dict))


def _embed_dims(model: str, request: dict[str, Any]) -> int:
    dims = request.get("outputDimensionality") or (request.get("embedContentConfig") or {}).get("outputDimensionality")
    return int(dims or (768 if model.startswith("text-embedding") else 3072))


async def embed_content(ctx: Ctx, model: str) -> web.StreamResponse:
    body = ctx.json_body()
    text = _content_text(body.get("content"))
    usage = _embedding_usage(model, ctx.counts.fresh)
    ctx.describe(model=model, response_model=model, computed_usage=usage)
    obj: dict[str, Any] = {"embedding": {"values": embedding_vector(f"{model}\n{text}", _embed_dims(model, body))}}
    if usage:
        obj["usageMetadata"] = usage
    return await ctx.send_bytes(dumps_pretty(obj), content_type=JSON_CT, usage=usage)


async def batch_embed_contents(ctx: Ctx, model: str) -> web.StreamResponse:
    body = ctx.json_body()
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise BadRequest(400, "* BatchEmbedContentsRequest.requests: requests is not specified")
    usage = _embedding_usage(model, ctx.counts.fresh)
    ctx.describe(model=model, response_model=model, computed_usage=usage)
    embeddings = [
        {"values": embedding_vector(f"{model}\n{_content_text(r.get('content'))}", _embed_dims(model, r))} for r in requests
    ]
    obj: dict[str, Any] = {"embeddings": embeddings}
    if usage:
        obj["usageMetadata"] = usage
    return await ctx.send_bytes(dumps_pretty(obj), content_type=JSON_CT, usage=usage)


async def count_tokens(ctx: Ctx, model: str) -> web.StreamResponse:
    ctx.json_body()
    total = ctx.counts.fresh
    obj = {"totalTokens": total, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]}
    ctx.describe(model=model, response_model=model, computed_usage=obj)
    return await ctx.send_bytes(dumps_pretty(obj), content_type=JSON_CT, usage=obj)


_METHODS: dict[str, Callable[[Ctx, str], Awaitable[web.StreamResponse]]] = {
    "generateContent": generate_content,
    "streamGenerateContent": stream_generate_content,
    "embedContent": embed_content,
    "batchEmbedContents": batch_embed_contents,
    "countTokens": count_tokens,
}


def endpoint_of(path: str) -> Optional[str]:
    """The Gemini method named by a ``.../models/{model}:{method}`` path, if any."""
    tail = path.rsplit("/", 1)[-1]
    return tail.rsplit(":", 1)[1] if ":" in tail else None


async def dispatch(ctx: Ctx) -> web.StreamResponse:
    model_and_method = ctx.request.match_info["model_and_method"]
    model, _, method = model_and_method.rpartition(":")
    handler = _METHODS.get(method)
    if not model or handler is None:
        raise BadRequest(404, f"Method not found: {method or model_and_method}.")
    return await handler(ctx, _model_from(model))


ROUTES: list[tuple[str, str, Optional[str], Callable[[Ctx], Awaitable[web.StreamResponse]]]] = [
    ("POST", "/v1beta/models/{model_and_method}", None, dispatch),
    ("POST", "/v1/models/{model_and_method}", None, dispatch),
]
