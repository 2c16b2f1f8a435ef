"""Translate an OpenAI Chat Completions client to an Anthropic Messages upstream: request, JSON
response, SSE stream and error body. A pure library; the tables are in docs/one-api.md."""

from __future__ import annotations

import json
from typing import Any

import orjson

from sidecar.translate.base import Dropped, SseData, TranslateError, map_stop, openai_error

# Anthropic requires max_tokens; OpenAI does not. Used when the client sends neither
# max_completion_tokens nor max_tokens (plus the thinking budget, which counts toward it).
DEFAULT_MAX_TOKENS = 4096

# reasoning_effort -> thinking.budget_tokens (Anthropic's minimum is 1024; LiteLLM's table).
# "none" turns thinking off: no `thinking` field is sent.
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096, "xhigh": 8192}

# Anthropic stop_reason -> OpenAI finish_reason. An unknown reason maps to "error", never "stop".
# refusal -> content_filter: the output was cut by Anthropic's safety classifiers, which is what
# content_filter means to OpenAI clients; "stop" would present a cut answer as complete.
# pause_turn (a server-tool turn to resume) passes as-is: it is not a finished answer.
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "pause_turn",
}

# Request fields with no Anthropic equivalent whose loss leaves the answer's meaning intact:
# named in x-meterline-dropped (as is any field not in _HANDLED). Listed for the docs' table.
_DROP = ("seed", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
         "logit_bias", "store", "metadata", "service_tier", "prompt_cache_key",
         "safety_identifier", "verbosity", "prediction")
# Fields consumed here or by the stream translator, not forwarded as such.
_HANDLED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "stop", "tools", "tool_choice", "parallel_tool_calls", "response_format",
            "reasoning_effort", "user", "n", "stream", "stream_options", "modalities"}

_ERROR_STATUS = {  # Anthropic error type -> (status for the OpenAI client, OpenAI error type)
    "invalid_request_error": (400, "invalid_request_error"),
    "authentication_error": (401, "authentication_error"),
    "billing_error": (402, "billing_error"),
    "permission_error": (403, "permission_error"),
    "not_found_error": (404, "not_found_error"),
    "request_too_large": (413, "invalid_request_error"),
    "rate_limit_error": (429, "rate_limit_error"),
    "api_error": (500, "server_error"),
    "timeout_error": (504, "server_error"),
    # 529 is Anthropic's own code; OpenAI clients and HTTP stacks know 503 "Service
    # Unavailable", which they retry like 529 would be retried.
    "overloaded_error": (503, "server_error"),
}


def _refuse(message: str) -> TranslateError:
    return TranslateError(400, f"meterline cannot translate this request to Anthropic Messages: {message}")


# ---------------------------------------------------------------- request

def _text_of(content: Any, where: str) -> str:
    """Text of a string or a list of text parts (system, developer and tool messages)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise _refuse(f"{where} has a {part.get('type')!r} part; only text is allowed there")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _image(part: dict) -> dict:
    url = (part.get("image_url") or {}).get("url", "")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media_type, _, encoding = head[5:].partition(";")
        if encoding != "base64" or not data:
            raise _refuse("an image data: URL must be base64 (data:image/png;base64,...)")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _refuse("an image_url must be an http(s) URL or a base64 data: URL")


def _user_blocks(content: Any) -> str | list:
    if isinstance(content, str):
        return content
    blocks: list = []
    for part in content or []:
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            blocks.append(_image(part))
        else:
            raise _refuse(f"user content part {kind!r} has no Anthropic equivalent here")
    return blocks


def _assistant_blocks(msg: dict) -> list:
    blocks: list = []
    # Thinking blocks from an earlier Anthropic turn go back first and byte-intact (their
    # signature must match); `thinking_blocks` is the field our responses carry them in.
    for block in msg.get("thinking_blocks") or []:
        if block.get("type") in ("thinking", "redacted_thinking"):
            blocks.append(block)
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    else:
        for part in content or []:
            text = part.get("text") if part.get("type") == "text" else part.get("refusal")
            if part.get("type") not in ("text", "refusal"):
                raise _refuse(f"assistant content part {part.get('type')!r} has no Anthropic equivalent")
            if text:
                blocks.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise _refuse(f"tool call {call.get('id')!r} has arguments that are not JSON") from None
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": args})
    return blocks


def _messages(doc: dict, dropped: Dropped) -> tuple[list, list]:
    system: list = []
    turns: list = []

    def add(role: str, blocks: str | list) -> None:
        # Anthropic turns alternate; consecutive tool results (and a user message right after
        # them) become one user turn, the tool results first as Anthropic requires.
        if turns and turns[-1]["role"] == role:
            prev = turns[-1]["content"]
            if isinstance(prev, str):
                prev = turns[-1]["content"] = [{"type": "text", "text": prev}]
            prev.extend([{"type": "text", "text": blocks}] if isinstance(blocks, str) else blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for msg in doc.get("messages") or []:
        role = msg.get("role")
        if "name" in msg and role != "tool":
            dropped.append("messages[].name")
        if role in ("system", "developer"):
            system.append({"type": "text", "text": _text_of(msg.get("content"), f"a {role} message")})
        elif role == "user":
            content = msg.get("content")
            if not isinstance(content, str) and any(
                    (p.get("image_url") or {}).get("detail") not in (None, "auto") for p in content or []):
                dropped.append("image_url.detail")  # Anthropic picks the resolution itself
            add("user", _user_blocks(content))
        elif role == "assistant":
            blocks = _assistant_blocks(msg)
            if blocks:
                add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": msg.get("tool_call_id"),
                          "content": _text_of(msg.get("content"), "a tool message")}])
        else:
            raise _refuse(f"message role {role!r} has no Anthropic equivalent")
    return system, turns


def _tools(doc: dict) -> list:
    out = []
    for tool in doc.get("tools") or []:
        if tool.get("type") != "function":
            raise _refuse(f"tool type {tool.get('type')!r} has no Anthropic equivalent")
        fn = tool.get("function") or {}
        item: dict = {"name": fn.get("name")}
        if fn.get("description"):
            item["description"] = fn["description"]
        item["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
        if fn.get("strict"):
            item["strict"] = True
        out.append(item)
    return out


def _tool_choice(choice: Any) -> dict | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    raise _refuse(f"tool_choice {choice!r} has no Anthropic equivalent")


def request(doc: dict, model: str) -> tuple[dict, list[str]]:
    """An OpenAI chat completions request -> (Anthropic Messages request body, dropped field names).
    Raises TranslateError when a field cannot be dropped without changing the answer."""
    dropped: Dropped = []
    if (doc.get("n") or 1) != 1:
        raise _refuse("n > 1 (Anthropic returns one choice per call)")
    if doc.get("modalities") not in (None, ["text"]):
        raise _refuse("modalities other than text")
    for key in ("audio", "web_search_options", "functions", "function_call"):
        if key in doc:
            raise _refuse(f"{key!r} is not supported")

    system, turns = _messages(doc, dropped)
    out: dict = {"model": model}
    if system:
        out["system"] = system
    out["messages"] = turns

    budget = 0
    effort = doc.get("reasoning_effort")
    if effort is not None and effort != "none":
        if effort not in THINKING_BUDGETS:
            raise _refuse(f"reasoning_effort {effort!r} is not one of {sorted(THINKING_BUDGETS)}")
        budget = THINKING_BUDGETS[effort]
    limit = doc.get("max_completion_tokens", doc.get("max_tokens"))
    if limit is None:
        limit = DEFAULT_MAX_TOKENS + budget
    elif budget and budget >= limit:
        raise _refuse(f"reasoning_effort {effort!r} needs a thinking budget of {budget} tokens, "
                      f"which must be below max_tokens ({limit})")
    out["max_tokens"] = limit
    if budget:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}

    if "temperature" in doc and doc["temperature"] is not None:
        if doc["temperature"] > 1:
            raise _refuse("temperature above 1 (Anthropic's range is 0 to 1)")
        out["temperature"] = doc["temperature"]
    if doc.get("top_p") is not None:
        out["top_p"] = doc["top_p"]
    stop = doc.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)

    tools = _tools(doc)
    choice = _tool_choice(doc.get("tool_choice"))
    if tools:
        out["tools"] = tools
        if doc.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
            choice = dict(choice or {"type": "auto"}, disable_parallel_tool_use=True)
        if choice:
            out["tool_choice"] = choice
    elif choice or "parallel_tool_calls" in doc:
        dropped.extend(k for k in ("tool_choice", "parallel_tool_calls") if k in doc)

    fmt = doc.get("response_format")
    if fmt:
        kind = fmt.get("type")
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise _refuse("response_format json_schema without a schema")
            out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        elif kind == "json_object":
            # "some JSON object" is itself a JSON schema.
            out["output_config"] = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
        elif kind != "text":
            raise _refuse(f"response_format {kind!r}")

    if doc.get("user"):
        out["metadata"] = {"user_id": doc["user"]}
    if doc.get("stream"):
        out["stream"] = True
    for key in doc:
        if key in _HANDLED:
            continue
        dropped.append(key)  # _DROP, and unknown fields too: the client asked for them
    return out, list(dict.fromkeys(dropped))


# ---------------------------------------------------------------- response

def usage(u: dict) -> dict:
    """Anthropic usage -> OpenAI usage. Anthropic's input_tokens excludes cache reads and writes;
    OpenAI's prompt_tokens includes them, with the reads repeated in cached_tokens."""
    read = u.get("cache_read_input_tokens") or 0
    write = u.get("cache_creation_input_tokens") or 0
    prompt = (u.get("input_tokens") or 0) + read + write
    completion = u.get("output_tokens") or 0
    out = {"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": read}}
    thinking = (u.get("output_tokens_details") or {}).get("thinking_tokens")
    if thinking is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return out


def finish_reason(stop_reason: str | None) -> str | None:
    return map_stop(STOP_REASONS, stop_reason)


def response(doc: dict, created: int) -> dict:
    """An Anthropic Messages JSON response -> an OpenAI chat.completion object."""
    texts, calls, thinking, thinking_blocks = [], [], [], []
    for block in doc.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        elif kind in ("thinking", "redacted_thinking"):
            if kind == "thinking":
                thinking.append(block.get("thinking", ""))
            thinking_blocks.append(block)
    message: dict = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking_blocks:
        # Not in OpenAI's schema; the de-facto fields (LiteLLM, DeepSeek). thinking_blocks keep
        # the signatures so the client can send them back byte-intact on the next turn.
        message["reasoning_content"] = "".join(thinking)
        message["thinking_blocks"] = thinking_blocks
    return {
        "id": doc.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": doc.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(doc.get("stop_reason"))}],
        "usage": usage(doc.get("usage") or {}),
    }


def error(status: int, doc: Any) -> tuple[int, dict]:
    """An Anthropic error (status, body) -> (status, OpenAI error body)."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("type"), str):
        kind = err["type"]
        return openai_error(status, kind, str(err.get("message", "")), _ERROR_STATUS, kind)
    return openai_error(status, None, doc if isinstance(doc, str) else json.dumps(doc), _ERROR_STATUS)


# ---------------------------------------------------------------- stream

class StreamTranslator:
    """One per streamed call: Anthropic SSE bytes in (split anywhere), OpenAI chunk SSE bytes out.
    Keeps only the unfinished line, ids, the open tool blocks and the latest usage between feeds."""

    def __init__(self, created: int, include_usage: bool) -> None:
        self.created = created
        self.include_usage = include_usage
        self._sse = SseData()  # the upstream's events, whole, from bytes split anywhere
        self._id = None
        self._model = None
        self._usage: dict = {}
        self._tools = 0          # tool_use blocks seen so far (their OpenAI index)
        self._open: dict = {}    # open tool_use blocks: Anthropic block index -> [OpenAI index, fragments seen]
        self._finished = False   # a finish_reason chunk was sent
        self._done = False       # message_stop or error: nothing more is translated

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        body = {"id": self._id, "object": "chat.completion.chunk", "created": self.created,
                "model": self._model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _usage_chunk(self) -> bytes:
        body = {"id": self._id, "object": "chat.completion.chunk", "created": self.created,
                "model": self._model, "choices": [], "usage": usage(self._usage)}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _merge_usage(self, u: dict | None) -> None:
        # message_delta usage is cumulative; keep the latest non-null value of each field.
        for key, value in (u or {}).items():
            if value is not None:
                self._usage[key] = value

    def _event(self, ev: dict) -> bytes:
        kind = ev.get("type")
        if kind == "message_start":
            msg = ev.get("message") or {}
            self._id, self._model = msg.get("id"), msg.get("model")
            self._merge_usage(msg.get("usage"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            btype = block.get("type")
            if btype == "tool_use":
                index = self._tools
                self._tools += 1
                initial = block.get("input")
                self._open[ev.get("index")] = [index, bool(initial)]
                return self._chunk({"tool_calls": [{
                    "index": index, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"),
                                 "arguments": json.dumps(initial, ensure_ascii=False) if initial else ""}}]})
            if btype == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "content_block_delta":
            delta = ev.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            tool = self._open.get(ev.get("index"))
            if dtype == "input_json_delta" and tool is not None:
                fragment = delta.get("partial_json", "")
                if not fragment:
                    return b""
                tool[1] = True
                return self._chunk({"tool_calls": [{"index": tool[0], "function": {"arguments": fragment}}]})
            if dtype == "thinking_delta":
                return self._chunk({"reasoning_content": delta.get("thinking", "")})
            return b""  # signature_delta, citations_delta: no OpenAI chunk field
        if kind == "content_block_stop":
            tool = self._open.pop(ev.get("index"), None)
            if tool is not None and not tool[1]:
                # A tool with no input fragments still has arguments: "{}", never "".
                return self._chunk({"tool_calls": [{"index": tool[0], "function": {"arguments": "{}"}}]})
            return b""
        if kind == "message_delta":
            self._merge_usage(ev.get("usage"))
            reason = (ev.get("delta") or {}).get("stop_reason")
            if reason is not None and not self._finished:  # one finish chunk per stream
                self._finished = True
                return self._chunk({}, finish_reason(reason))
            return b""
        if kind == "message_stop":
            self._done = True
            return self._usage_chunk() if self.include_usage else b""
        if kind == "error":
            self._done = True
            _, body = error(500, ev)
            return b"data: " + orjson.dumps(body) + b"\n\n"
        return b""  # ping and event types added later

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
                out.append(self._event(ev))
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the client stream. A stream cut before its stop reason ends in an error
        chunk, so the client never mistakes a truncated answer for a complete one."""
        tail = b""
        if not self._done and not self._finished:
            body = {"error": {"message": "the upstream stream ended before its stop reason",
                              "type": "server_error", "param": None, "code": "incomplete_stream"}}
            tail = b"data: " + orjson.dumps(body) + b"\n\n"
        self._done = True
        return tail + b"data: [DONE]\n\n"
