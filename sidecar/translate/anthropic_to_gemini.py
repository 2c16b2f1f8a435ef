"""Translate an Anthropic Messages client to a Gemini generateContent upstream: request, JSON
response, SSE stream (streamGenerateContent?alt=sse) and error body. A pure library; the tables
are in docs/one-api.md."""

from __future__ import annotations

import base64
import json
from typing import Any, Mapping

import orjson

from sidecar.translate.base import Dropped, SseData, TranslateError, map_stop

# output_config.effort -> Gemini thinking. Gemini 3 models take thinkingLevel (its enum: MINIMAL,
# LOW, MEDIUM, HIGH; HIGH is their most); Gemini 1.x/2.x models take only thinkingBudget, and
# 24576 is the largest budget every 2.5 model accepts (Flash's cap). The two cannot be combined.
EFFORT_LEVELS = {"low": "LOW", "medium": "MEDIUM", "high": "HIGH", "xhigh": "HIGH", "max": "HIGH"}
EFFORT_BUDGETS = {"low": 1024, "medium": 8192, "high": 24576, "xhigh": 24576, "max": 24576}
_BUDGET_ONLY_MODELS = ("gemini-1", "gemini-2")

# Gemini finishReason -> Anthropic stop_reason. Every value in the google-genai SDK's FinishReason
# enum is listed; an unknown one maps to "error", never "end_turn". STOP with function calls is
# "tool_use": Gemini says STOP for a tool-calling turn, and an agent seeing end_turn would not run
# the tools. The safety and policy stops are "refusal" (a classifier cut the output); the ones
# that mean the model or the request went wrong are "error", named here so nobody adds them as
# clean stops. CONTINUATION is a per-request token limit: the answer is cut, like max_tokens.
STOP_REASONS = {
    "STOP": "end_turn",
    "MAX_TOKENS": "max_tokens",
    "CONTINUATION": "max_tokens",
    "SAFETY": "refusal",
    "RECITATION": "refusal",
    "LANGUAGE": "refusal",
    "BLOCKLIST": "refusal",
    "PROHIBITED_CONTENT": "refusal",
    "SPII": "refusal",
    "IMAGE_SAFETY": "refusal",
    "IMAGE_PROHIBITED_CONTENT": "refusal",
    "IMAGE_RECITATION": "refusal",
    "MODEL_ARMOR": "refusal",
    "ESCALATION": "refusal",
    "PUP_LIMITED_DISABLED": "refusal",
    "FINISH_REASON_UNSPECIFIED": "error",
    "OTHER": "error",
    "MALFORMED_FUNCTION_CALL": "error",
    "UNEXPECTED_TOOL_CALL": "error",
    "TOO_MANY_TOOL_CALLS": "error",
    "MISSING_THOUGHT_SIGNATURE": "error",
    "MALFORMED_RESPONSE": "error",
    "IMAGE_OTHER": "error",
    "NO_IMAGE": "error",
}

# Gemini takes at most five stop sequences; dropping the rest would change where the answer ends.
MAX_STOP_SEQUENCES = 5

# Tool ids this module makes up when Gemini's functionCall has no id (the Gemini API usually
# sends none). They are never sent back to Gemini; its own ids are, in functionCall.id and
# functionResponse.id.
GENERATED_ID_PREFIX = "toolu_gemini_"

# Request fields with no Gemini equivalent whose loss leaves the answer's meaning intact: named
# in x-meterline-dropped (as is any field not handled). Listed for the docs' table.
_DROP = ("service_tier", "speed", "inference_geo", "cache_control", "container", "mcp_servers",
         "context_management")
_HANDLED = {"model", "system", "messages", "max_tokens", "temperature", "top_p", "top_k",
            "stop_sequences", "tools", "tool_choice", "thinking", "output_config", "output_format",
            "metadata", "stream"}

_ERROR_TYPES = {  # upstream HTTP status -> (status for the Anthropic client, Anthropic error type)
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    500: (500, "api_error"),
    # 503 UNAVAILABLE is Gemini's "the model is overloaded"; Anthropic clients know that as 529,
    # which the anthropic SDK retries like 503.
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
}
# Gemini refuses a bad API key with 400 INVALID_ARGUMENT and reason API_KEY_INVALID in its
# details; to an Anthropic client that is a 401 (the SDK and agents tell the user to log in).
_BAD_KEY = (401, "authentication_error")
# Gemini's google.rpc status in a stream's error chunk -> Anthropic error type.
_STREAM_ERROR_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error",
    "NOT_FOUND": "not_found_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "INTERNAL": "api_error",
    "UNAVAILABLE": "overloaded_error",
    "DEADLINE_EXCEEDED": "timeout_error",
}


def _refuse(message: str) -> TranslateError:
    return TranslateError(400, f"meterline cannot translate this request to Gemini: {message}")


def path(model: str, stream: bool) -> str:
    """The upstream path for a call (the body names no model and no stream flag in Gemini)."""
    if stream:
        return f"/v1beta/models/{model}:streamGenerateContent?alt=sse"
    return f"/v1beta/models/{model}:generateContent"


# ---------------------------------------------------------------- request

class _Images:
    """Image and PDF sources -> Gemini inlineData parts. Gemini's fileData takes only its own
    Files API URIs, so a URL image needs bytes the caller fetched beforehand, else it is a 400."""

    def __init__(self, fetched: Mapping[str, tuple[str, bytes]] | None) -> None:
        self.fetched = fetched or {}

    def part(self, block: dict) -> dict:
        source = block.get("source") or {}
        kind = source.get("type")
        if kind == "base64":
            if not source.get("media_type") or not source.get("data"):
                raise _refuse("a base64 image needs media_type and data")
            return {"inlineData": {"mimeType": source["media_type"], "data": source["data"]}}
        if kind == "url":
            url = source.get("url") or ""
            if not url.startswith(("http://", "https://")):
                raise _refuse("an image url must be http(s)")
            if url not in self.fetched:
                raise _refuse(f"image {url} is a URL, Gemini takes only inline image data, "
                              "and fetching image URLs is not allowed for it")
            media_type, data = self.fetched[url]
            return {"inlineData": {"mimeType": media_type, "data": base64.b64encode(data).decode("ascii")}}
        raise _refuse(f"image source {kind!r} has no Gemini equivalent (only base64 and url)")


def _blocks(content: Any) -> list:
    """String content as the one text block it means; lists as they are."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _system(system: Any, dropped: Dropped) -> dict:
    parts = []
    for block in _blocks(system):
        if block.get("type") != "text":
            raise _refuse(f"system has a {block.get('type')!r} block; only text is allowed there")
        if "cache_control" in block:
            dropped.append("cache_control")  # Gemini caches implicitly, or by cachedContent
        # One part per block: no separator is invented between them.
        parts.append({"text": block.get("text", "")})
    return {"parts": parts}


def _document(block: dict) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64" and source.get("media_type") == "application/pdf":
        return {"inlineData": {"mimeType": "application/pdf", "data": source.get("data", "")}}
    if source.get("type") == "text":
        return {"text": source.get("data", "")}
    raise _refuse("a document must be a base64 PDF or plain text")


def _tool_result(block: dict, names: Mapping[str, str], images: _Images, dropped: Dropped) -> tuple[dict, list]:
    """A tool_result -> (the functionResponse part, image parts that follow it in the same turn:
    a Gemini 2.x functionResponse carries JSON only)."""
    tool_id = block.get("tool_use_id") or ""
    if tool_id not in names:
        # Gemini needs the function's name, which only the tool_use block of the earlier turn has.
        raise _refuse(f"tool_result {tool_id!r} answers no tool_use in an earlier assistant turn")
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
            raise _refuse(f"tool_result content {kind!r} has no Gemini equivalent")
    # Gemini's documented keys: "output" for a result, "error" for a failure.
    key = "error" if block.get("is_error") else "output"
    response: dict = {"name": names[tool_id], "response": {key: "".join(texts)}}
    if not tool_id.startswith(GENERATED_ID_PREFIX):
        response = {"id": tool_id} | response
    return {"functionResponse": response}, pictures


def _user(content: Any, names: Mapping[str, str], images: _Images, dropped: Dropped) -> dict | None:
    if isinstance(content, str):
        return {"role": "user", "parts": [{"text": content}]}
    results, moved, parts = [], [], []
    for block in content or []:
        kind = block.get("type")
        if "cache_control" in block:
            dropped.append("cache_control")
        if kind == "tool_result":
            part, pictures = _tool_result(block, names, images, dropped)
            results.append(part)
            moved.extend(pictures)
        elif kind == "text":
            parts.append({"text": block.get("text", "")})
        elif kind == "image":
            parts.append(images.part(block))
        elif kind == "document":
            if block.get("citations"):
                dropped.append("document.citations")
            parts.append(_document(block))
        else:
            raise _refuse(f"user content block {kind!r} has no Gemini equivalent")
    # Function responses first, as Gemini expects them right after the model's calls.
    out = results + moved + parts
    return {"role": "user", "parts": out} if out else None


def _assistant(content: Any, names: dict, dropped: Dropped) -> dict | None:
    """An assistant turn -> a `model` content. Thinking blocks are the ones this module's
    responses made, so they go back byte-intact: text and signature on a thought part, or, for
    a signature-only block (thinking ""), the signature on the part that follows it, which is
    where Gemini put it (or on an empty text part when nothing follows)."""
    if isinstance(content, str):
        return {"role": "model", "parts": [{"text": content}]} if content else None
    parts: list = []
    signature = None  # a signature-only thinking block's signature, waiting for its part
    for block in content or []:
        kind = block.get("type")
        if "cache_control" in block:
            dropped.append("cache_control")
        part: dict
        if kind == "text":
            part = {"text": block.get("text", "")}
        elif kind == "tool_use":
            call: dict = {"name": block.get("name"), "args": block.get("input") or {}}
            tool_id = block.get("id") or ""
            names[tool_id] = block.get("name")
            if tool_id and not tool_id.startswith(GENERATED_ID_PREFIX):
                call = {"id": tool_id} | call
            part = {"functionCall": call}
        elif kind == "thinking":
            text, sig = block.get("thinking") or "", block.get("signature") or ""
            if not text:
                if sig:
                    signature = sig
                continue
            part = {"text": text, "thought": True}
        elif kind == "redacted_thinking":
            # Anthropic's encrypted thinking: only an Anthropic model can read it.
            dropped.append("redacted_thinking")
            continue
        else:
            raise _refuse(f"assistant content block {kind!r} has no Gemini equivalent")
        if kind == "thinking" and block.get("signature"):
            part["thoughtSignature"] = block["signature"]
        elif signature is not None:
            part["thoughtSignature"] = signature
            signature = None
        parts.append(part)
    if signature is not None:
        parts.append({"text": "", "thoughtSignature": signature})
    return {"role": "model", "parts": parts} if parts else None


def _tools(tools: list, dropped: Dropped) -> tuple[list, set]:
    """(Gemini function declarations, names of the Anthropic-typed tools left out)."""
    out, left_out = [], set()
    for tool in tools:
        if tool.get("type") not in (None, "custom"):
            # web_search, web_fetch, code_execution, bash, text_editor, computer...: run by
            # Anthropic or defined by its schema, which a Gemini model does not know. The call
            # goes on without them and names them (tools[web_search_20250305]).
            dropped.append(f"tools[{tool.get('type')}]")
            left_out.add(tool.get("name"))
            continue
        fn: dict = {"name": tool.get("name")}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if tool.get("input_schema"):
            # parametersJsonSchema takes JSON Schema as is; `parameters` is an OpenAPI subset
            # that rejects keys coding agents' schemas use ($schema, additionalProperties).
            fn["parametersJsonSchema"] = tool["input_schema"]
        for key in tool:
            if key not in ("type", "name", "description", "input_schema"):
                dropped.append("cache_control" if key == "cache_control" else f"tools[].{key}")
        out.append(fn)
    return out, left_out


def _tool_config(choice: dict, dropped: Dropped) -> dict:
    kind = choice.get("type")
    if choice.get("disable_parallel_tool_use"):
        dropped.append("tool_choice.disable_parallel_tool_use")  # Gemini has no such switch
    if kind == "auto":
        return {"functionCallingConfig": {"mode": "AUTO"}}
    if kind == "any":
        return {"functionCallingConfig": {"mode": "ANY"}}
    if kind == "none":
        return {"functionCallingConfig": {"mode": "NONE"}}
    if kind == "tool":
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice.get("name")]}}
    raise _refuse(f"tool_choice {kind!r} has no Gemini equivalent")


def _thinking(doc: dict, model: str) -> dict | None:
    thinking = doc.get("thinking") or {}
    config = doc.get("output_config") or {}
    kind = thinking.get("type")
    if kind not in (None, "enabled", "disabled", "adaptive"):
        raise _refuse(f"thinking type {kind!r} has no Gemini equivalent")
    # display "omitted" asks for no thinking text: Gemini's includeThoughts false.
    include = thinking.get("display") != "omitted"
    effort = config.get("effort")
    if effort is not None:
        if effort not in EFFORT_LEVELS:
            raise _refuse(f"output_config.effort {effort!r} is not one of {list(EFFORT_LEVELS)}")
        if model.startswith(_BUDGET_ONLY_MODELS):
            return {"thinkingBudget": EFFORT_BUDGETS[effort], "includeThoughts": include}
        return {"thinkingLevel": EFFORT_LEVELS[effort], "includeThoughts": include}
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int):
            raise _refuse("thinking type enabled needs an integer budget_tokens")
        # Gemini 3 accepts thinkingBudget too, so the client's number is kept as given.
        return {"thinkingBudget": budget, "includeThoughts": include}
    if kind == "adaptive":
        return {"includeThoughts": include}  # the model's dynamic thinking, its default
    # Absent or disabled: nothing sent. Gemini 2.5 Pro and Gemini 3 cannot turn thinking off,
    # and a thinkingBudget 0 would fail the call there; the client gets no thinking blocks
    # (includeThoughts defaults to false) and the thought tokens are in the usage.
    return None


def _output_format(doc: dict, dropped: Dropped) -> dict:
    config = doc.get("output_config") or {}
    for key in config:
        if key not in ("effort", "format"):
            dropped.append(f"output_config.{key}")
    fmt = config.get("format") or doc.get("output_format")  # output_format: the beta's name
    if not fmt:
        return {}
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _refuse("an output format must be json_schema with a schema")
    # responseJsonSchema takes JSON Schema as is (responseSchema is the OpenAPI subset).
    return {"responseMimeType": "application/json", "responseJsonSchema": fmt["schema"]}


def request(doc: dict, model: str, *, inline_images_only: bool = True,
            fetched_images: Mapping[str, tuple[str, bytes]] | None = None) -> tuple[dict, list[str]]:
    """An Anthropic Messages request -> (Gemini GenerateContentRequest body, dropped field names).
    `model` goes in the path (see path()), not the body. Gemini takes images inline only, so
    `inline_images_only` is always true here (it keeps every pair's call the same); URL images
    need their bytes in `fetched_images` ({url: (media type, bytes)}), else a 400.
    Raises TranslateError(400) for what cannot be translated without changing the answer."""
    dropped: Dropped = []
    images = _Images(fetched_images)
    out: dict = {}
    contents: list = []
    names: dict = {}  # tool_use id -> function name, for the functionResponse parts
    messages = doc.get("messages") or []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            turn = _user(message.get("content"), names, images, dropped)
        elif role == "assistant":
            if i == len(messages) - 1:
                # A prefill: Anthropic continues the last assistant turn; Gemini answers anew.
                raise _refuse("a last assistant turn (prefill) has no Gemini equivalent")
            turn = _assistant(message.get("content"), names, dropped)
        else:
            raise _refuse(f"message role {role!r} is not user or assistant")
        if turn:
            contents.append(turn)
    out["contents"] = contents
    if doc.get("system"):
        out["systemInstruction"] = _system(doc["system"], dropped)

    tools, left_out = _tools(doc.get("tools") or [], dropped)
    choice = doc.get("tool_choice")
    if choice and (choice.get("type") == "tool" and choice.get("name") in left_out
                   or choice.get("type") == "any" and left_out and not tools):
        raise _refuse("tool_choice requires an Anthropic tool that has no Gemini equivalent")
    if tools:
        out["tools"] = [{"functionDeclarations": tools}]
        if choice:
            out["toolConfig"] = _tool_config(choice, dropped)
    elif choice:
        dropped.append("tool_choice")

    gen: dict = {}
    if doc.get("max_tokens") is not None:
        gen["maxOutputTokens"] = doc["max_tokens"]  # like Anthropic's, it bounds thoughts too
    for key, name in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK")):
        if doc.get(key) is not None:
            gen[name] = doc[key]
    stop = doc.get("stop_sequences")
    if stop:
        if len(stop) > MAX_STOP_SEQUENCES:
            raise _refuse(f"{len(stop)} stop_sequences (Gemini takes at most {MAX_STOP_SEQUENCES})")
        gen["stopSequences"] = list(stop)
    gen.update(_output_format(doc, dropped))
    thinking = _thinking(doc, model)
    if thinking is not None:
        gen["thinkingConfig"] = thinking
    if gen:
        out["generationConfig"] = gen
    if (doc.get("metadata") or {}).get("user_id"):
        dropped.append("metadata.user_id")  # Gemini's request has no end-user field
    for key in doc:
        if key not in _HANDLED:
            dropped.append(key)  # _DROP, and unknown fields too: the client asked for them
    return out, list(dict.fromkeys(dropped))


# ---------------------------------------------------------------- response

def usage(meta: dict) -> dict:
    """Gemini usageMetadata -> Anthropic usage. promptTokenCount includes the cached tokens
    (cachedContentTokenCount); Anthropic's input_tokens excludes them. Tool-use prompt tokens
    are input, as the Gemini adapter meters them. Output is candidates plus thoughts (both
    billed as output, as Anthropic's output_tokens includes thinking). No cache writes are
    reported per call (explicit caches are created apart)."""
    prompt = (meta.get("promptTokenCount") or 0) + (meta.get("toolUsePromptTokenCount") or 0)
    cached = meta.get("cachedContentTokenCount") or 0
    thoughts = meta.get("thoughtsTokenCount")
    out = {"input_tokens": max(prompt - cached, 0), "cache_creation_input_tokens": 0,
           "cache_read_input_tokens": cached,
           "output_tokens": (meta.get("candidatesTokenCount") or 0) + (thoughts or 0)}
    if thoughts is not None:
        out["output_tokens_details"] = {"thinking_tokens": thoughts}
    return out


def stop_reason(finish: str | None, tool_calls: bool = False) -> str | None:
    """Gemini finishReason -> Anthropic stop_reason, through STOP_REASONS."""
    reason = map_stop(STOP_REASONS, finish)
    if reason == "end_turn" and tool_calls:
        return "tool_use"
    return reason


def _tool_id(call: dict, response_id: str | None, n: int) -> str:
    if call.get("id"):
        return call["id"]
    return f"{GENERATED_ID_PREFIX}{response_id}_{n}" if response_id else f"{GENERATED_ID_PREFIX}{n}"


def _unknown_part(part: dict) -> TranslateError:
    keys = ",".join(k for k in part if k != "thoughtSignature")
    return TranslateError(502, f"the upstream sent a {keys!r} part, which has no Anthropic content block")


def response(doc: dict, created: int = 0) -> dict:
    """A Gemini GenerateContentResponse -> an Anthropic Messages JSON response. `created` is
    unused (Anthropic messages carry no timestamp); it keeps every pair's call the same."""
    candidates = doc.get("candidates") or []
    response_id = doc.get("responseId")
    content: list = []
    calls = 0
    if not candidates:
        if not (doc.get("promptFeedback") or {}).get("blockReason"):
            raise TranslateError(502, "the upstream response has no candidates")
        finish: str | None = "SAFETY"  # the prompt itself was blocked: a refusal, with no content
    else:
        candidate = candidates[0]
        finish = candidate.get("finishReason")
        for part in (candidate.get("content") or {}).get("parts") or []:
            sig = part.get("thoughtSignature")
            if part.get("thought"):
                content.append({"type": "thinking", "thinking": part.get("text", ""), "signature": sig or ""})
                continue
            if "text" not in part and "functionCall" not in part:
                raise _unknown_part(part)
            if sig:
                # A signature on an answer part: a signature-only thinking block just before
                # the part's own block carries it (request() puts it back on that part).
                content.append({"type": "thinking", "thinking": "", "signature": sig})
            if "functionCall" in part:
                call = part["functionCall"]
                content.append({"type": "tool_use", "id": _tool_id(call, response_id, calls),
                                "name": call.get("name"), "input": call.get("args") or {}})
                calls += 1
            elif part["text"]:
                content.append({"type": "text", "text": part["text"]})
    return {
        "id": response_id,
        "type": "message",
        "role": "assistant",
        "model": doc.get("modelVersion"),
        "content": content,
        "stop_reason": stop_reason(finish, calls > 0),
        "stop_sequence": None,  # Gemini says STOP, not which stop sequence matched
        "usage": usage(doc.get("usageMetadata") or {}),
    }


def _error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _bad_key(err: dict) -> bool:
    return any(isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in err.get("details") or [])


def error(status: int, doc: Any) -> tuple[int, dict]:
    """A Gemini error (status, body) -> (status, Anthropic error body)."""
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]  # the non-SSE stream wraps its error in the JSON array
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message", ""))
        if _bad_key(err):
            new_status, kind = _BAD_KEY
        elif status in _ERROR_TYPES:
            new_status, kind = _ERROR_TYPES[status]
        elif status >= 500:
            new_status, kind = status, "api_error"
        elif status >= 400:
            new_status, kind = status, "invalid_request_error"
        else:
            new_status, kind = 502, "api_error"
    else:
        # Not Gemini's documented shape: pass its text on rather than lose it.
        new_status = status if status >= 400 else 502
        kind = _ERROR_TYPES.get(new_status, (new_status, "api_error"))[1]
        message = doc if isinstance(doc, str) else json.dumps(doc)
    return new_status, _error_body(kind, message)


def _stream_error(err: Any) -> dict:
    err = err if isinstance(err, dict) else {"message": str(err)}
    if _bad_key(err):
        kind = _BAD_KEY[1]
    else:
        kind = _STREAM_ERROR_TYPES.get(err.get("status"), "api_error")
    return _error_body(kind, str(err.get("message", "")))


# ---------------------------------------------------------------- stream

def _event(kind: str, body: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


class StreamTranslator:
    """One per streamed call: Gemini `alt=sse` bytes in (split anywhere), Anthropic SSE events
    out. Each Gemini chunk is a whole GenerateContentResponse holding the new parts; function
    calls arrive whole. Keeps only the unfinished line, the open block, the finish reason and the
    last usageMetadata. `created` and `include_usage` are unused (Anthropic streams always carry
    usage); they keep every pair's constructor the same."""

    def __init__(self, created: int = 0, include_usage: bool = True) -> None:
        self._sse = SseData()  # the upstream's events, whole, from bytes split anywhere
        self._started = False
        self._id: str | None = None
        self._blocks = 0                 # content blocks opened so far (the next block's index)
        # The one open block, (kind, index): Anthropic streams one block at a time.
        self._current: tuple[str, int] | None = None
        self._calls = 0
        self._finish: str | None = None  # the upstream's finishReason, once seen
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

    def _block_delta(self, delta: dict) -> bytes:
        assert self._current is not None
        return _event("content_block_delta", {"type": "content_block_delta", "index": self._current[1],
                                              "delta": delta})

    def _thought(self, text: str, sig: str | None) -> bytes:
        out = b""
        if self._current is None or self._current[0] != "thinking":
            out = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if text:
            out += self._block_delta({"type": "thinking_delta", "thinking": text})
        if sig:
            # The signature ends its thought; more thought text opens a new block.
            out += self._block_delta({"type": "signature_delta", "signature": sig}) + self._close()
        return out

    def _signature(self, sig: str) -> bytes:
        """A signature on an answer part: a signature-only thinking block before the part."""
        out = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return out + self._block_delta({"type": "signature_delta", "signature": sig}) + self._close()

    def _text(self, text: str) -> bytes:
        out = b""
        if self._current is None or self._current[0] != "text":
            out = self._open("text", {"type": "text", "text": ""})
        return out + self._block_delta({"type": "text_delta", "text": text})

    def _call(self, call: dict) -> bytes:
        out = self._open("tool", {"type": "tool_use", "id": _tool_id(call, self._id, self._calls),
                                  "name": call.get("name") or "", "input": {}})
        self._calls += 1
        # Gemini sends the arguments whole: one input_json_delta carries them.
        args = call.get("args") or {}
        if args:
            out += self._block_delta({"type": "input_json_delta", "partial_json": orjson.dumps(args).decode()})
        return out + self._close()

    def _part(self, part: dict) -> bytes:
        sig = part.get("thoughtSignature")
        if part.get("thought"):
            return self._thought(part.get("text", ""), sig)
        if "functionCall" in part:
            return (self._signature(sig) if sig else b"") + self._call(part["functionCall"])
        if "text" in part:
            out = self._signature(sig) if sig else b""
            return out + (self._text(part["text"]) if part["text"] else b"")
        raise _unknown_part(part)

    # -- chunks

    def _message_start(self, chunk: dict) -> bytes:
        self._started = True
        self._id = chunk.get("responseId")
        # The input counts are known from the first chunk; output comes in message_delta, which
        # the anthropic SDK (and Anthropic's own streams) treat as the cumulative totals.
        first = usage(chunk.get("usageMetadata") or {})
        start = {"input_tokens": first["input_tokens"], "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": first["cache_read_input_tokens"], "output_tokens": 0}
        return _event("message_start", {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "model": chunk.get("modelVersion"),
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": start}})

    def _end(self) -> bytes:
        """message_delta with the stop reason and usage, then message_stop."""
        self._done = True
        u = usage(self._usage) if self._usage is not None else {"output_tokens": 0}
        reason = stop_reason(self._finish, self._calls > 0)
        return (_event("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": u})
                + _event("message_stop", {"type": "message_stop"}))

    def _fail(self, body: dict) -> bytes:
        self._done = True
        return self._close() + _event("error", body)

    def _chunk(self, chunk: dict) -> bytes:
        if "error" in chunk:
            return self._fail(_stream_error(chunk["error"]))
        out = b"" if self._started else self._message_start(chunk)
        if isinstance(chunk.get("usageMetadata"), dict):
            self._usage = chunk["usageMetadata"]  # each chunk's counts are the totals so far
        candidates = chunk.get("candidates") or []
        if not candidates and (chunk.get("promptFeedback") or {}).get("blockReason"):
            self._finish = self._finish or "SAFETY"  # the prompt was blocked: a refusal
        for candidate in candidates:
            if candidate.get("index", 0) != 0:
                continue  # we never ask for candidateCount > 1
            for part in (candidate.get("content") or {}).get("parts") or []:
                try:
                    out += self._part(part)
                except TranslateError as exc:
                    return out + self._fail(_error_body("api_error", exc.message))
            if candidate.get("finishReason") and self._finish is None:
                self._finish = candidate["finishReason"]
                out += self._close()
        return out

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return b""
        out = []
        for data in self._sse.feed(chunk):
            if self._done:
                break  # nothing after the stream's end reaches the client
            try:
                ev = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # not JSON: metering counts it from the upstream bytes
            if isinstance(ev, dict):
                out.append(self._chunk(ev))
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the upstream body (Gemini sends no [DONE]). After a finish reason, the
        closing events; before one, an error event, so the client never mistakes a truncated
        answer for a complete one."""
        if self._done:
            return b""
        # The last event may end with the body rather than with a blank line.
        out = self.feed(b"\n\n") if self._sse.pending else b""
        if self._done:
            return out
        if self._finish is not None:
            return out + self._close() + self._end()
        return out + self._fail(_error_body("api_error", "the upstream stream ended before its finish reason"))
