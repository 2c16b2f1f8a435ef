"""Fake Anthropic Messages API: POST /v1/messages (JSON and SSE) and /v1/messages/count_tokens.

Usage convention (see ``tokens.py`` for the counts): ``input_tokens = fresh`` and the cache
fields sit BESIDE it: ``cache_read_input_tokens = cache_read``,
``cache_creation_input_tokens = cache_write_5m + cache_write_1h`` with the
``cache_creation`` split; ``output_tokens = output + reasoning`` (with the ``reasoning``
scenario a thinking block comes first and ``output_tokens_details.thinking_tokens = reasoning``).
Streams report ``output_tokens: 1`` in message_start and the cumulative totals in message_delta.
"""

from __future__ import annotations

import hashlib
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from . import naming
from .scenarios import Scenario
from .tokens import Counts, reply_parts, reply_text
from .tools import TOOL_ARGS, argument_pieces, first_tool
from .wire import BadRequest, Ctx, Provider, SseFraming, dumps_compact

JSON_CT = "application/json"
SSE_CT = "text/event-stream; charset=utf-8"

_ERRORS = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}


class AnthropicProvider(Provider):
    name = "anthropic"

    def error_payload(self, status: int, message: Optional[str], scenario: Scenario) -> tuple[bytes, str, dict[str, str]]:
        err_type, default_message = _ERRORS.get(status, ("api_error" if status >= 500 else "invalid_request_error", f"Error {status}."))
        body = {
            "type": "error",
            "error": {"type": err_type, "message": message or default_message},
            "request_id": naming.anthropic_request_id(),
        }
        headers = {"retry-after": scenario.retry_after} if status == 429 else {}
        if status in (500, 529):
            headers["x-should-retry"] = "true"
        return dumps_compact(body), JSON_CT, headers

    def api_key(self, request: web.Request) -> Optional[str]:
        key = request.headers.get("x-api-key", "").strip()
        if key:
            return key
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer ") and auth[7:].strip():
            return auth[7:].strip()
        return None

    def auth_problem(self, request: web.Request) -> Optional[tuple[int, str]]:
        if not self.api_key(request):
            return 401, "x-api-key header is required"
        if not request.headers.get("anthropic-version"):
            return 400, "anthropic-version: header is required"
        return None

    def response_headers(self) -> dict[str, str]:
        return {"request-id": naming.anthropic_request_id(), "anthropic-organization-id": "00000000-0000-4000-8000-000000000000"}


PROVIDER = AnthropicProvider()


def message_usage(c: Counts, output_tokens: int) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": c.fresh,
        "cache_creation_input_tokens": c.cache_write,
        "cache_read_input_tokens": c.cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": c.cache_write_5m, "ephemeral_1h_input_tokens": c.cache_write_1h},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    if c.reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": c.reasoning}
    return usage


def _signature(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest() * 2


def _stream_error_event() -> tuple[dict[str, Any], Optional[str]]:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": naming.anthropic_request_id()}
    return body, "error"


async def messages(ctx: Ctx) -> web.StreamResponse:
    body = ctx.json_body()
    model = ctx.require_model(body)
    if not isinstance(body.get("max_tokens"), int):
        raise BadRequest(400, "max_tokens: Field required")
    if not isinstance(body.get("messages"), list):
        raise BadRequest(400, "messages: Field required")
    stream = bool(body.get("stream"))
    c = ctx.counts
    total_output = c.output + c.reasoning
    usage = message_usage(c, total_output)
    mid = naming.anthropic_message_id()
    rmodel = naming.dated_model(model)
    ctx.describe(model=model, response_model=rmodel, response_id=mid, stream=stream, computed_usage=usage)
    thinking = "Let me think about this step by step." if c.reasoning else None
    signature = _signature(mid)
    tool = first_tool(body) if ctx.scenario.has("tool-call") else None
    tool_id = f"toolu_{mid[-24:]}"
    stop = "tool_use" if tool else "end_turn"

    def message(content: list[dict[str, Any]], stop_reason: Optional[str], msg_usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": rmodel,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": msg_usage,
        }

    if not stream:
        content: list[dict[str, Any]] = []
        if thinking:
            content.append({"type": "thinking", "thinking": thinking, "signature": signature})
        if tool:
            content.append({"type": "tool_use", "id": tool_id, "name": tool, "input": TOOL_ARGS})
        else:
            content.append({"type": "text", "text": reply_text(ctx.scenario.chunks)})
        return await ctx.send_json(message(content, stop, usage), usage=usage)

    s = await ctx.open_stream(content_type=SSE_CT, framing=SseFraming(), error_event=_stream_error_event)

    async def send(obj: dict[str, Any]) -> None:
        await s.send(obj, event=obj["type"])

    start_usage = message_usage(c, 1)
    start_usage.pop("output_tokens_details", None)
    await send({"type": "message_start", "message": message([], None, start_usage)})
    s.note_usage(dict(start_usage))
    index = 0
    if thinking:
        await send({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
        await send({"type": "ping"})
        await send({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": thinking}})
        await send({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": signature}})
        await send({"type": "content_block_stop", "index": 0})
        index = 1
    if tool:
        block = {"type": "tool_use", "id": tool_id, "name": tool, "input": {}}
        await send({"type": "content_block_start", "index": index, "content_block": block})
        for piece in argument_pieces():
            delta = {"type": "content_block_delta", "index": index,
                     "delta": {"type": "input_json_delta", "partial_json": piece}}
            await s.content(delta, event="content_block_delta")
    else:
        await send({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
        if not thinking:
            await send({"type": "ping"})
        for part in reply_parts(ctx.scenario.chunks):
            delta = {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": part}}
            await s.content(delta, event="content_block_delta")
    await send({"type": "content_block_stop", "index": index})

    if ctx.scenario.has("delta-output-only"):
        delta_usage: dict[str, Any] = {"output_tokens": total_output}
    else:
        delta_usage = {
            "input_tokens": c.fresh,
            "cache_creation_input_tokens": c.cache_write,
            "cache_read_input_tokens": c.cache_read,
            "output_tokens": total_output,
        }
    if c.reasoning:
        delta_usage["output_tokens_details"] = {"thinking_tokens": c.reasoning}
    await send({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": delta_usage})
    merged = {**start_usage, **delta_usage}
    s.note_usage(merged)
    return await s.finish(b"event: message_stop\ndata: " + dumps_compact({"type": "message_stop"}) + b"\n\n")


async def count_tokens(ctx: Ctx) -> web.StreamResponse:
    body = ctx.json_body()
    model = ctx.require_model(body)
    usage = {"input_tokens": ctx.counts.fresh}
    ctx.describe(model=model, response_model=model, computed_usage=usage)
    return await ctx.send_json(usage, usage=usage)


ROUTES: list[tuple[str, str, str, Callable[[Ctx], Awaitable[web.StreamResponse]]]] = [
    ("POST", "/v1/messages", "messages", messages),
    ("POST", "/v1/messages/count_tokens", "messages.count_tokens", count_tokens),
]
