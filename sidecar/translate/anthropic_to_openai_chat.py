"""Translate an Anthropic Messages client to an OpenAI Chat Completions upstream: request, JSON
response, SSE stream and error body. A pure library; the tables are in docs/one-api.md."""

from __future__ import annotations

import base64
import json
from typing import Any, Mapping

import orjson

from sidecar.translate.base import Dropped, SseData, TranslateError, map_stop

# thinking.budget_tokens -> reasoning_effort, as budget floors: the inverse of the other pair's
# THINKING_BUDGETS (low 1024, medium 2048, high 4096), so a round trip keeps the level. Never
# xhigh or max from a budget: only some OpenAI models take them, and a bigger budget is no
# request for them (coding agents send budgets like 31999). output_config.effort maps 1:1.
EFFORT_FLOORS = ((4096, "high"), (2048, "medium"), (0, "low"))
EFFORTS = ("low", "medium", "high", "xhigh", "max")

# OpenAI finish_reason -> Anthropic stop_reason. An unknown reason maps to "error", never
# "end_turn". "stop" with tool calls present is "tool_use" (some OpenAI-compatible servers say
# "stop" there, and an agent seeing end_turn would not run the tools); with a refusal it is
# "refusal". content_filter is "refusal": the output was cut by a safety system.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# OpenAI takes at most four stop sequences; dropping the rest would change where the answer ends.
MAX_STOP_SEQUENCES = 4
MAX_USER_LENGTH = 64

# Request fields with no Chat Completions equivalent whose loss leaves the answer's meaning
# intact: named in x-meterline-dropped (as is any field not handled). Listed for the docs' table.
# Anthropic's server-side features (MCP servers, code-execution containers, context editing)
# are dropped like its server tools: the call is answered without them, and says so.
_DROP = ("top_k", "service_tier", "speed", "inference_geo", "cache_control", "container",
         "mcp_servers", "context_management")
_HANDLED = {"model", "system", "messages", "max_tokens", "temperature", "top_p", "stop_sequences",
            "tools", "tool_choice", "thinking", "output_config", "output_format", "metadata",
            "stream"}

_ERROR_TYPES = {  # upstream HTTP status -> (status for the Anthropic client, Anthropic error type)
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    402: (402, "billing_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    500: (500, "api_error"),
    # 503 is OpenAI's "overloaded, try again"; Anthropic clients know that as 529, which the
    # anthropic SDK retries like 503.
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
}
# OpenAI's insufficient_quota is sent as a 429 but is an empty account: retrying cannot help,
# and Anthropic calls that billing_error (402, which the anthropic SDK does not retry).
_QUOTA = (402, "billing_error")
# OpenAI error type/code in a stream's error chunk (no status there) -> Anthropic error type.
_STREAM_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_exceeded": "rate_limit_error",
    "rate_limit_error": "rate_limit_error",
    "insufficient_quota": "billing_error",
    "server_error": "api_error",
}


def _refuse(message: str) -> TranslateError:
    return TranslateError(400, f"meterline cannot translate this request to OpenAI Chat Completions: {message}")


# ---------------------------------------------------------------- request

class _Images:
    """Image sources -> OpenAI image_url parts. An upstream that takes only inline data gets URL
    images as data: URLs from bytes the caller fetched beforehand; without them it is a 400."""

    def __init__(self, inline_only: bool, fetched: Mapping[str, tuple[str, bytes]] | None) -> None:
        self.inline_only = inline_only
        self.fetched = fetched or {}

    def part(self, block: dict) -> dict:
        source = block.get("source") or {}
        kind = source.get("type")
        if kind == "base64":
            if not source.get("media_type") or not source.get("data"):
                raise _refuse("a base64 image needs media_type and data")
            url = f"data:{source['media_type']};base64,{source['data']}"
        elif kind == "url":
            url = source.get("url") or ""
            if not url.startswith(("http://", "https://")):
                raise _refuse("an image url must be http(s)")
            if self.inline_only:
                if url not in self.fetched:
                    raise _refuse(f"image {url} is a URL, this upstream takes only inline image data, "
                                  "and fetching image URLs is not allowed for it")
                media_type, data = self.fetched[url]
                url = f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
        else:
            raise _refuse(f"image source {kind!r} has no Chat Completions equivalent (only base64 and url)")
        return {"type": "image_url", "image_url": {"url": url}}


def _blocks(content: Any) -> list:
    """String content as the one text block it means; lists as they are."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _text_only(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for block in content or []:
        if block.get("type") != "text":
            raise _refuse(f"{where} has a {block.get('type')!r} block; only text is allowed there")
        texts.append(block.get("text", ""))
    return "".join(texts)


def _system(system: Any, dropped: Dropped) -> dict:
    if isinstance(system, str):
        return {"role": "system", "content": system}
    blocks = list(system)
    if any("cache_control" in b for b in blocks):
        dropped.append("cache_control")  # OpenAI caches prompt prefixes by itself
    text = _text_only(blocks, "system")
    if len(blocks) == 1:
        return {"role": "system", "content": text}
    # Several blocks stay several parts: no separator is invented between them.
    return {"role": "system", "content": [{"type": "text", "text": b.get("text", "")} for b in blocks]}


def _document(block: dict) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64" and source.get("media_type") == "application/pdf":
        return {"type": "file", "file": {"filename": block.get("title") or "document.pdf",
                                         "file_data": f"data:application/pdf;base64,{source.get('data', '')}"}}
    if source.get("type") == "text":
        return {"type": "text", "text": source.get("data", "")}
    raise _refuse("a document must be a base64 PDF or plain text")


def _tool_result(block: dict, images: _Images, dropped: Dropped) -> tuple[dict, list]:
    """A tool_result -> (the tool message, image parts that must follow in a user message:
    Chat Completions tool messages carry text only)."""
    if block.get("is_error"):
        dropped.append("tool_result.is_error")  # the content says what failed
    texts, pictures = [], []
    for part in _blocks(block.get("content")):
        kind = part.get("type")
        if "cache_control" in part:
            dropped.append("cache_control")
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind == "image":
            pictures.append(images.part(part))
        elif kind == "document":
            pictures.append(_document(part))
        else:
            raise _refuse(f"tool_result content {kind!r} has no Chat Completions equivalent")
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": "".join(texts)}, pictures


def _user(content: Any, images: _Images, dropped: Dropped) -> list:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools, moved, parts = [], [], []
    for block in content or []:
        kind = block.get("type")
        if "cache_control" in block:
            dropped.append("cache_control")
        if kind == "tool_result":
            message, pictures = _tool_result(block, images, dropped)
            tools.append(message)
            moved.extend(pictures)
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(images.part(block))
        elif kind == "document":
            if block.get("citations"):
                dropped.append("document.citations")
            parts.append(_document(block))
        else:
            raise _refuse(f"user content block {kind!r} has no Chat Completions equivalent")
    out = tools
    if moved or parts:
        out.append({"role": "user", "content": moved + parts})
    return out


def _assistant(content: Any, dropped: Dropped) -> dict | None:
    if isinstance(content, str):
        return {"role": "assistant", "content": content} if content else None
    texts, calls = [], []
    for block in content or []:
        kind = block.get("type")
        if "cache_control" in block:
            dropped.append("cache_control")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        elif kind in ("thinking", "redacted_thinking"):
            # Chat Completions has no field for earlier thinking, and its signature is
            # Anthropic's: the model answers without it, as Anthropic models do across turns.
            dropped.append("thinking_blocks")
        else:
            raise _refuse(f"assistant content block {kind!r} has no Chat Completions equivalent")
    if not texts and not calls:
        return None
    message: dict = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: list, dropped: Dropped) -> tuple[list, set]:
    """(OpenAI tools, names of the Anthropic-typed tools left out)."""
    out, left_out = [], set()
    for tool in tools:
        if tool.get("type") not in (None, "custom"):
            # web_search, web_fetch, code_execution, bash, text_editor, computer...: run by
            # Anthropic or defined by its schema, which an OpenAI model does not know. The
            # call goes on without them and names them (tools[web_search_20250305]).
            dropped.append(f"tools[{tool.get('type')}]")
            left_out.add(tool.get("name"))
            continue
        fn: dict = {"name": tool.get("name")}
        if tool.get("description"):
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        if tool.get("strict"):
            fn["strict"] = True
        for key in tool:
            if key not in ("type", "name", "description", "input_schema", "strict"):
                dropped.append("cache_control" if key == "cache_control" else f"tools[].{key}")
        out.append({"type": "function", "function": fn})
    return out, left_out


def _tool_choice(choice: dict) -> Any:
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise _refuse(f"tool_choice {kind!r} has no Chat Completions equivalent")


def _effort(doc: dict, dropped: Dropped) -> str | None:
    thinking = doc.get("thinking") or {}
    config = doc.get("output_config") or {}
    if "display" in thinking:
        dropped.append("thinking.display")
    effort = config.get("effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise _refuse(f"output_config.effort {effort!r} is not one of {list(EFFORTS)}")
        return effort
    kind = thinking.get("type")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int):
            raise _refuse("thinking type enabled needs an integer budget_tokens")
        return next(name for floor, name in EFFORT_FLOORS if budget >= floor)
    if kind not in (None, "disabled", "adaptive"):
        raise _refuse(f"thinking type {kind!r} has no Chat Completions equivalent")
    return None  # adaptive: the model's own default; disabled: no reasoning_effort is sent


def _response_format(doc: dict, dropped: Dropped) -> dict | None:
    config = doc.get("output_config") or {}
    for key in config:
        if key not in ("effort", "format"):
            dropped.append(f"output_config.{key}")
    fmt = config.get("format") or doc.get("output_format")  # output_format: the beta's name
    if not fmt:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _refuse("an output format must be json_schema with a schema")
    # Anthropic enforces the schema; OpenAI does so with strict, and it needs a name.
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt["schema"], "strict": True}}


def request(doc: dict, model: str, *, inline_images_only: bool = False,
            fetched_images: Mapping[str, tuple[str, bytes]] | None = None) -> tuple[dict, list[str]]:
    """An Anthropic Messages request -> (OpenAI chat completions request body, dropped field names).
    `inline_images_only`: the upstream takes no image URLs; `fetched_images` maps each URL the
    caller was allowed to fetch to (media type, bytes). Raises TranslateError when a field cannot
    be dropped without changing the answer."""
    dropped: Dropped = []
    images = _Images(inline_images_only, fetched_images)

    messages: list = []
    if doc.get("system"):
        messages.append(_system(doc["system"], dropped))
    turns = doc.get("messages") or []
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role == "user":
            messages.extend(_user(turn.get("content"), images, dropped))
        elif role == "assistant":
            if i == len(turns) - 1:
                raise _refuse("a last assistant turn (a prefill to continue) has no Chat Completions equivalent")
            message = _assistant(turn.get("content"), dropped)
            if message:
                messages.append(message)
        else:
            raise _refuse(f"message role {role!r} has no Chat Completions equivalent")

    out: dict = {"model": model, "messages": messages}
    if doc.get("max_tokens") is not None:
        # max_completion_tokens, not the deprecated max_tokens that reasoning models reject; like
        # Anthropic's max_tokens it bounds reasoning and answer together.
        out["max_completion_tokens"] = doc["max_tokens"]
    for key in ("temperature", "top_p"):
        if doc.get(key) is not None:
            out[key] = doc[key]
    stop = doc.get("stop_sequences")
    if stop:
        if len(stop) > MAX_STOP_SEQUENCES:
            raise _refuse(f"{len(stop)} stop_sequences (OpenAI takes at most {MAX_STOP_SEQUENCES})")
        out["stop"] = list(stop)

    tools, left_out = _tools(doc.get("tools") or [], dropped)
    choice = doc.get("tool_choice")
    if choice and (choice.get("type") == "tool" and choice.get("name") in left_out
                   or choice.get("type") == "any" and left_out and not tools):
        raise _refuse("tool_choice requires an Anthropic tool that has no Chat Completions equivalent")
    if tools:
        out["tools"] = tools
        if choice:
            out["tool_choice"] = _tool_choice(choice)
            if choice.get("disable_parallel_tool_use"):
                out["parallel_tool_calls"] = False
    elif choice:
        dropped.append("tool_choice")

    effort = _effort(doc, dropped)
    if effort:
        out["reasoning_effort"] = effort
    fmt = _response_format(doc, dropped)
    if fmt:
        out["response_format"] = fmt
    user_id = (doc.get("metadata") or {}).get("user_id")
    if user_id:
        # OpenAI refuses a `user` over 64 characters (coding agents send longer ids); it only
        # serves abuse monitoring, so a longer one is dropped rather than failing the call.
        if len(user_id) <= MAX_USER_LENGTH:
            out["user"] = user_id
        else:
            dropped.append("metadata.user_id")
    if doc.get("stream"):
        # Always: the Anthropic client expects usage in every stream, and metering reads it
        # from the upstream's own bytes.
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key in doc:
        if key not in _HANDLED:
            dropped.append(key)  # _DROP, and unknown fields too: the client asked for them
    return out, list(dict.fromkeys(dropped))


# ---------------------------------------------------------------- response

def usage(u: dict) -> dict:
    """OpenAI usage -> Anthropic usage. OpenAI's prompt_tokens includes cache reads (repeated in
    cached_tokens); Anthropic's input_tokens excludes them. OpenAI reports no cache writes."""
    prompt = u.get("prompt_tokens") or 0
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    out = {"input_tokens": max(prompt - cached, 0), "cache_creation_input_tokens": 0,
           "cache_read_input_tokens": cached, "output_tokens": u.get("completion_tokens") or 0}
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens")
    if reasoning is not None:
        out["output_tokens_details"] = {"thinking_tokens": reasoning}
    return out


def stop_reason(finish: str | None, tool_calls: bool = False, refusal: bool = False) -> str | None:
    """OpenAI finish_reason -> Anthropic stop_reason, through STOP_REASONS."""
    reason = map_stop(STOP_REASONS, finish)
    if reason == "end_turn" and refusal:
        return "refusal"
    if reason == "end_turn" and tool_calls:
        return "tool_use"
    return reason


def _reasoning_text(obj: dict) -> str | None:
    # Not in OpenAI's schema: the de-facto fields of OpenAI-compatible servers that return
    # their reasoning (DeepSeek and vLLM: reasoning_content; OpenRouter: reasoning).
    text = obj.get("reasoning_content")
    return text if text is not None else obj.get("reasoning")


def response(doc: dict, created: int = 0) -> dict:
    """An OpenAI chat.completion object -> an Anthropic Messages JSON response. `created` is
    unused (Anthropic messages carry no timestamp); it keeps every pair's call the same."""
    choices = doc.get("choices") or []
    if not choices:
        raise TranslateError(502, "the upstream chat completion has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    content: list = []
    thinking = _reasoning_text(message)
    if thinking:
        # No signature exists for an OpenAI model's reasoning; "" keeps the block's shape.
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    refusal = message.get("refusal")
    if refusal:
        content.append({"type": "text", "text": refusal})
    finish = choice.get("finish_reason")
    calls = 0
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            if finish == "length":
                continue  # cut by the token limit: stop_reason max_tokens says the answer is partial
            raise TranslateError(502, f"the upstream tool call {call.get('id')!r} has arguments "
                                      "that are not a JSON object")
        calls += 1
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": args})
    return {
        "id": doc.get("id"),
        "type": "message",
        "role": "assistant",
        "model": doc.get("model"),
        "content": content,
        "stop_reason": stop_reason(finish, calls > 0, bool(refusal)),
        "stop_sequence": None,  # OpenAI does not say which stop sequence matched
        "usage": usage(doc.get("usage") or {}),
    }


def _error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def error(status: int, doc: Any) -> tuple[int, dict]:
    """An OpenAI error (status, body) -> (status, Anthropic error body)."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message", ""))
        if err.get("code") == "insufficient_quota" or err.get("type") == "insufficient_quota":
            new_status, kind = _QUOTA
        elif status in _ERROR_TYPES:
            new_status, kind = _ERROR_TYPES[status]
        elif status >= 500:
            new_status, kind = status, "api_error"
        elif status >= 400:
            new_status, kind = status, "invalid_request_error"
        else:
            new_status, kind = 502, "api_error"
    else:
        # Not OpenAI's documented shape: pass its text on rather than lose it.
        new_status = status if status >= 400 else 502
        kind = _ERROR_TYPES.get(new_status, (new_status, "api_error"))[1]
        message = doc if isinstance(doc, str) else json.dumps(doc)
    return new_status, _error_body(kind, message)


def _stream_error(err: Any) -> dict:
    err = err if isinstance(err, dict) else {"message": str(err)}
    kind = _STREAM_ERROR_TYPES.get(err.get("code")) or _STREAM_ERROR_TYPES.get(err.get("type"), "api_error")
    return _error_body(kind, str(err.get("message", "")))


# ---------------------------------------------------------------- stream

def _event(kind: str, body: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


class StreamTranslator:
    """One per streamed call: OpenAI chunk SSE bytes in (split anywhere), Anthropic SSE events out.
    Keeps only the unfinished line, ids, the open blocks, the finish reason and the usage.
    `created` and `include_usage` are unused (Anthropic streams always carry usage); they keep
    every pair's constructor the same."""

    def __init__(self, created: int = 0, include_usage: bool = True) -> None:
        self._sse = SseData()  # the upstream's events, whole, from bytes split anywhere
        self._started = False
        self._blocks = 0                 # content blocks opened so far (the next block's index)
        # The one open block, (kind, index): Anthropic streams one block at a time.
        self._current: tuple[str, int] | None = None
        self._tools: dict = {}           # OpenAI tool index -> {"id", "block"}
        self._calls = 0
        self._refusal = False
        self._finish: str | None = None  # the upstream's finish_reason, once seen
        self._usage: dict | None = None
        self._done = False

    # -- blocks

    def _close(self) -> bytes:
        if self._current is None:
            return b""
        index = self._current[1]
        self._current = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _open(self, kind: str, block: dict) -> bytes:
        out = self._close()
        self._current = (kind, self._blocks)
        self._blocks += 1
        return out + _event("content_block_start", {"type": "content_block_start",
                                                    "index": self._current[1], "content_block": block})

    def _delta(self, kind: str, text: str) -> bytes:
        """A text or thinking fragment, opening its block when another one was open."""
        out = b""
        if self._current is None or self._current[0] != kind:
            out = self._open(kind, {"type": "text", "text": ""} if kind == "text" else {
                "type": "thinking", "thinking": "", "signature": ""})
        delta = {"type": "text_delta", "text": text} if kind == "text" else {
            "type": "thinking_delta", "thinking": text}
        return out + _event("content_block_delta", {"type": "content_block_delta",
                                                    "index": self._current[1], "delta": delta})

    def _tool_delta(self, tc: dict) -> bytes:
        out = b""
        raw = tc.get("index", 0)
        fn = tc.get("function") or {}
        tool = self._tools.get(raw)
        new_id = tc.get("id")
        # A new id at a known index is a new call: some OpenAI-compatible servers (Ollama)
        # give every call of a parallel batch index 0.
        if tool is None or (new_id and new_id != tool["id"]):
            tool = {"id": new_id or f"call_meterline_{self._calls}", "block": self._blocks}
            self._tools[raw] = tool
            self._calls += 1
            out += self._open("tool", {"type": "tool_use", "id": tool["id"], "name": fn.get("name") or "",
                                       "input": {}})
        fragment = fn.get("arguments")
        if fragment:
            if self._current != ("tool", tool["block"]):
                # OpenAI sends calls one after another; a fragment for a call whose block is
                # closed cannot be placed in an Anthropic stream, and dropping it would corrupt
                # the call's input.
                raise TranslateError(502, f"the upstream sent arguments for tool call {tool['id']!r} "
                                          "after another call had started")
            out += _event("content_block_delta", {"type": "content_block_delta", "index": tool["block"],
                                                  "delta": {"type": "input_json_delta", "partial_json": fragment}})
        return out

    # -- chunks

    def _message_start(self, chunk: dict) -> bytes:
        self._started = True
        # OpenAI reports usage only at the end; the counts come in message_delta, which the
        # anthropic SDK (and Anthropic's own streams) treat as the cumulative totals.
        return _event("message_start", {"type": "message_start", "message": {
            "id": chunk.get("id"), "type": "message", "role": "assistant", "model": chunk.get("model"),
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _end(self) -> bytes:
        """message_delta with the stop reason and usage, then message_stop."""
        self._done = True
        u = usage(self._usage) if self._usage is not None else {"output_tokens": 0}
        reason = stop_reason(self._finish, self._calls > 0, self._refusal)
        return (_event("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": u})
                + _event("message_stop", {"type": "message_stop"}))

    def _fail(self, body: dict) -> bytes:
        self._done = True
        return _event("error", body)

    def _chunk(self, chunk: dict) -> bytes:
        if "error" in chunk:
            return self._fail(_stream_error(chunk["error"]))
        out = b"" if self._started else self._message_start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # we never ask for n > 1
            delta = choice.get("delta") or {}
            thinking = _reasoning_text(delta)
            if thinking:
                out += self._delta("thinking", thinking)
            if delta.get("content"):
                out += self._delta("text", delta["content"])
            if delta.get("refusal"):
                self._refusal = True
                out += self._delta("text", delta["refusal"])
            for tc in delta.get("tool_calls") or []:
                try:
                    out += self._tool_delta(tc)
                except TranslateError as exc:
                    return out + self._fail(_error_body("api_error", exc.message))
            if choice.get("finish_reason") is not None and self._finish is None:
                self._finish = choice["finish_reason"]
                out += self._close()
        return out

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return b""
        out = []
        for data in self._sse.feed(chunk):
            if self._done:
                break  # nothing after the stream's end reaches the client
            if data == b"[DONE]":
                out.append(self._end() if self._finish is not None else self.finish())
                continue
            try:
                ev = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # not JSON: metering counts it from the upstream bytes
            if isinstance(ev, dict):
                out.append(self._chunk(ev))
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the client stream. After a finish reason, the closing events (a stream cut
        before [DONE] still ends properly); before one, an error event, so the client never
        mistakes a truncated answer for a complete one."""
        if self._done:
            return b""
        if self._finish is not None:
            return self._end()
        out = self._close()
        return out + self._fail(_error_body("api_error", "the upstream stream ended before its finish reason"))
