"""Translate an OpenAI Chat Completions client to a Gemini generateContent upstream: request,
JSON response, SSE stream (streamGenerateContent?alt=sse) and error body. A pure library; the
tables are in docs/one-api.md."""

from __future__ import annotations

import base64
import json
from typing import Any, Mapping

import orjson

from sidecar.translate.base import Dropped, SseData, TranslateError, map_stop, openai_error

# reasoning_effort -> thinkingConfig.thinkingBudget for Gemini 2.5 and older (0 turns thinking
# off). low/medium/high are the budgets Google's own OpenAI compatibility layer uses; 24576 is
# the largest budget every 2.5 model accepts (Flash's maximum), so xhigh stays there.
THINKING_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576,
                    "xhigh": 24576}
# Gemini 3 takes thinkingConfig.thinkingLevel instead and cannot turn thinking off: "none"
# becomes "minimal", the level Google describes as closest to no thinking.
THINKING_LEVELS = {"none": "minimal", "minimal": "minimal", "low": "low", "medium": "medium",
                   "high": "high", "xhigh": "xhigh"}

# Gemini finishReason -> OpenAI finish_reason. STOP with a functionCall in the answer becomes
# tool_calls (Gemini reports STOP for both). Every output filter becomes content_filter: the
# answer was cut or withheld, which "stop" would hide. Failed tool calls, malformed output and
# unknown reasons map to "error", never "stop".
STOP_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "CONTINUATION": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
    "ESCALATION": "content_filter",
    "MALFORMED_FUNCTION_CALL": "error",
    "UNEXPECTED_TOOL_CALL": "error",
    "TOO_MANY_TOOL_CALLS": "error",
    "MISSING_THOUGHT_SIGNATURE": "error",
    "MALFORMED_RESPONSE": "error",
    "NO_IMAGE": "error",
    "IMAGE_OTHER": "error",
    "PUP_LIMITED_DISABLED": "error",  # the account is limited: no answer, and not a content filter
    "OTHER": "error",
    "FINISH_REASON_UNSPECIFIED": "error",
}

# Request fields with no Gemini equivalent whose loss leaves the answer's meaning intact: named
# in x-meterline-dropped (as is any field not in _HANDLED). Listed for the docs' table.
_DROP = ("logprobs", "top_logprobs", "logit_bias", "store", "metadata", "service_tier",
         "prompt_cache_key", "safety_identifier", "verbosity", "prediction", "user")
_HANDLED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "stop", "seed", "frequency_penalty", "presence_penalty", "tools", "tool_choice",
            "response_format", "reasoning_effort", "n", "stream", "stream_options", "modalities",
            "parallel_tool_calls"}

_ERROR_STATUS = {  # Gemini (google.rpc) status -> (status for the OpenAI client, OpenAI error type)
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "server_error"),
    "INTERNAL": (500, "server_error"),
    "UNKNOWN": (500, "server_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
}

# Where Google's own OpenAI compatibility layer carries a Gemini thoughtSignature on a tool call
# (and where we carry the one on a text part, on the message): {"google": {"thought_signature": S}}.
_EXTRA = "extra_content"


def _refuse(message: str) -> TranslateError:
    return TranslateError(400, f"meterline cannot translate this request to Gemini generateContent: {message}")


def upstream_path(model: str, stream: bool) -> str:
    """The path (under /v1beta) the translated body goes to: Gemini names the model in the URL,
    and streams are asked for by method and `alt=sse`, not by a body field."""
    model = model.removeprefix("models/")
    if stream:
        return f"/models/{model}:streamGenerateContent?alt=sse"
    return f"/models/{model}:generateContent"


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


def image_urls(doc: dict) -> list[str]:
    """The http(s) image URLs in a request, in order, once each: Gemini takes images inline
    only, so the caller fetches these (when its config allows) and passes the bytes to request()."""
    urls: list[str] = []
    for msg in doc.get("messages") or []:
        content = msg.get("content")
        if msg.get("role") != "user" or isinstance(content, str):
            continue
        for part in content or []:
            if part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if url.startswith(("http://", "https://")) and not _is_gemini_file(url):
                    urls.append(url)
    return list(dict.fromkeys(urls))


def _is_gemini_file(url: str) -> bool:
    # A file uploaded through Gemini's Files API is referenced, not inlined.
    return url.startswith("https://generativelanguage.googleapis.com/") and "/files/" in url


def _data_url(url: str, what: str) -> dict:
    head, _, data = url.partition(",")
    media_type, _, encoding = head[5:].partition(";")
    if encoding != "base64" or not data or not media_type:
        raise _refuse(f"a {what} data: URL must be base64 with a media type (data:image/png;base64,...)")
    return {"inlineData": {"mimeType": media_type, "data": data}}


def _image(part: dict, fetched: Mapping[str, tuple[str, bytes]]) -> dict:
    url = (part.get("image_url") or {}).get("url", "")
    if url.startswith("data:"):
        return _data_url(url, "image")
    if _is_gemini_file(url):
        return {"fileData": {"fileUri": url}}
    if url.startswith(("http://", "https://")):
        if url not in fetched:
            raise _refuse(f"image URL {url!r}: Gemini takes images inline only, and this upstream "
                          "is not configured to let meterline fetch image URLs; send the image as "
                          "a base64 data: URL")
        mime, data = fetched[url]
        return {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode("ascii")}}
    raise _refuse("an image_url must be an http(s) URL or a base64 data: URL")


_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}


def _user_parts(content: Any, fetched: Mapping[str, tuple[str, bytes]]) -> list:
    if isinstance(content, str):
        return [{"text": content}]
    parts: list = []
    for part in content or []:
        kind = part.get("type")
        if kind == "text":
            parts.append({"text": part.get("text", "")})
        elif kind == "image_url":
            parts.append(_image(part, fetched))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            mime = _AUDIO_TYPES.get(audio.get("format"))
            if mime is None or not audio.get("data"):
                raise _refuse("input_audio needs base64 data and a format of wav or mp3")
            parts.append({"inlineData": {"mimeType": mime, "data": audio["data"]}})
        elif kind == "file":
            data = (part.get("file") or {}).get("file_data")
            if not isinstance(data, str) or not data.startswith("data:"):
                raise _refuse("a file part needs file_data as a base64 data: URL (file_id has no Gemini equivalent)")
            parts.append(_data_url(data, "file"))
        else:
            raise _refuse(f"user content part {kind!r} has no Gemini equivalent")
    return parts


def _signature(obj: dict) -> str | None:
    sig = ((obj.get(_EXTRA) or {}).get("google") or {}).get("thought_signature")
    return sig if isinstance(sig, str) and sig else None


def _model_parts(msg: dict) -> list:
    parts: list = []
    content = msg.get("content")
    texts = [content] if isinstance(content, str) else []
    for part in [] if isinstance(content, str) else content or []:
        if part.get("type") not in ("text", "refusal"):
            raise _refuse(f"assistant content part {part.get('type')!r} has no Gemini equivalent")
        texts.append(part.get("text") if part.get("type") == "text" else part.get("refusal"))
    text = "".join(t for t in texts if t)
    if text:
        parts.append({"text": text})
    sig = _signature(msg)
    if sig is not None:
        # The signature of a text answer goes back on its (last) text part, where Gemini put it.
        if parts:
            parts[-1]["thoughtSignature"] = sig
        else:
            parts.append({"text": "", "thoughtSignature": sig})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise _refuse(f"tool call {call.get('id')!r} has arguments that are not JSON") from None
        if not isinstance(args, dict):
            raise _refuse(f"tool call {call.get('id')!r} has arguments that are not a JSON object")
        fc: dict = {"name": fn.get("name"), "args": args}
        if call.get("id"):
            # Gemini's documented way to pair a call with its response (parallel calls of one
            # function too); the functionResponse carries the same id.
            fc = {"id": call["id"], **fc}
        item: dict = {"functionCall": fc}
        sig = _signature(call)
        if sig is not None:
            # Gemini 3 refuses a function-call turn whose signature did not come back byte-intact.
            item["thoughtSignature"] = sig
        parts.append(item)
    return parts


def _tool_name(history: list, call_id: Any) -> str:
    # OpenAI tool messages carry only the call id; Gemini's functionResponse needs the name.
    # The nearest earlier assistant call with that id is the one answered.
    for msg in reversed(history):
        if msg.get("role") != "assistant":
            continue
        for call in msg.get("tool_calls") or []:
            if call.get("id") == call_id:
                return (call.get("function") or {}).get("name")
    raise _refuse(f"tool message for tool_call_id {call_id!r} answers no earlier assistant tool call "
                  "(Gemini needs the function's name)")


def _contents(doc: dict, dropped: Dropped, fetched: Mapping[str, tuple[str, bytes]]) -> tuple[list, list]:
    system: list = []
    turns: list = []

    def add(role: str, parts: list) -> None:
        # Consecutive messages of one role (parallel tool results, a user message right after
        # them) become one Gemini turn, so the function responses sit together in call order.
        if turns and turns[-1]["role"] == role:
            turns[-1]["parts"].extend(parts)
        else:
            turns.append({"role": role, "parts": parts})

    history: list = []
    for msg in doc.get("messages") or []:
        role = msg.get("role")
        if "name" in msg and role != "tool":
            dropped.append("messages[].name")
        if role in ("system", "developer"):
            system.append({"text": _text_of(msg.get("content"), f"a {role} message")})
        elif role == "user":
            content = msg.get("content")
            if not isinstance(content, str) and any(
                    (p.get("image_url") or {}).get("detail") not in (None, "auto") for p in content or []):
                dropped.append("image_url.detail")  # Gemini's mediaResolution is per request, not per image
            add("user", _user_parts(content, fetched))
        elif role == "assistant":
            if msg.get("reasoning_content"):
                # Thought summaries are not sent back to Gemini; the signatures carry the context.
                dropped.append("messages[].reasoning_content")
            parts = _model_parts(msg)
            if parts:
                add("model", parts)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            answer: dict = {"name": _tool_name(history, call_id),
                            # Gemini wants an object; "output" is its documented key for a result.
                            "response": {"output": _text_of(msg.get("content"), "a tool message")}}
            add("user", [{"functionResponse": {"id": call_id, **answer} if call_id else answer}])
        else:
            raise _refuse(f"message role {role!r} has no Gemini equivalent")
        history.append(msg)
    return system, turns


def _tools(doc: dict, dropped: Dropped) -> list:
    decls = []
    for tool in doc.get("tools") or []:
        if tool.get("type") != "function":
            raise _refuse(f"tool type {tool.get('type')!r} has no Gemini equivalent")
        fn = tool.get("function") or {}
        item: dict = {"name": fn.get("name")}
        if fn.get("description"):
            item["description"] = fn["description"]
        if fn.get("parameters"):
            # parametersJsonSchema takes JSON Schema as OpenAI clients write it; `parameters`
            # would take only Gemini's OpenAPI subset.
            item["parametersJsonSchema"] = fn["parameters"]
        if fn.get("strict"):
            dropped.append("tools[].function.strict")
        decls.append(item)
    return [{"functionDeclarations": decls}] if decls else []


def _tool_config(choice: Any) -> dict | None:
    if choice is None:
        return None
    if choice == "auto":
        mode: dict = {"mode": "AUTO"}
    elif choice == "required":
        mode = {"mode": "ANY"}
    elif choice == "none":
        mode = {"mode": "NONE"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        mode = {"mode": "ANY", "allowedFunctionNames": [(choice.get("function") or {}).get("name")]}
    else:
        raise _refuse(f"tool_choice {choice!r} has no Gemini equivalent")
    return {"functionCallingConfig": mode}


def _thinking(effort: Any, model: str) -> dict | None:
    if effort is None:
        return None
    if effort not in THINKING_BUDGETS:
        raise _refuse(f"reasoning_effort {effort!r} is not one of {sorted(THINKING_BUDGETS)}")
    if model.removeprefix("models/").startswith("gemini-3"):
        return {"thinkingLevel": THINKING_LEVELS[effort], "includeThoughts": True}
    budget = THINKING_BUDGETS[effort]
    # includeThoughts asks for thought summaries, which come back as reasoning_content.
    return {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}


def request(doc: dict, model: str,
            fetched: Mapping[str, tuple[str, bytes]] | None = None) -> tuple[dict, list[str]]:
    """An OpenAI chat completions request -> (Gemini GenerateContentRequest body, dropped field
    names). `fetched` maps the image URLs of image_urls(doc) to (mime type, bytes) when the caller
    may fetch them; an http(s) image URL not in it is refused. The body names no model and no
    stream flag: see upstream_path(). Raises TranslateError when a field cannot be dropped
    without changing the answer."""
    dropped: Dropped = []
    if (doc.get("n") or 1) != 1:
        raise _refuse("n > 1 (meterline translates one candidate per call)")
    if doc.get("modalities") not in (None, ["text"]):
        raise _refuse("modalities other than text")
    for key in ("audio", "web_search_options", "functions", "function_call"):
        if key in doc:
            raise _refuse(f"{key!r} is not supported")

    system, turns = _contents(doc, dropped, fetched or {})
    out: dict = {"contents": turns}
    if system:
        out["systemInstruction"] = {"parts": system}

    tools = _tools(doc, dropped)
    tool_config = _tool_config(doc.get("tool_choice"))
    if tools:
        out["tools"] = tools
        if tool_config:
            out["toolConfig"] = tool_config
    elif tool_config:
        dropped.append("tool_choice")
    if doc.get("parallel_tool_calls") is False:
        # Gemini may always answer with several calls at once; true is what it does anyway.
        dropped.append("parallel_tool_calls")

    gen: dict = {}
    limit = doc.get("max_completion_tokens", doc.get("max_tokens"))
    if limit is not None:
        gen["maxOutputTokens"] = limit
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                         ("presence_penalty", "presencePenalty"),
                         ("frequency_penalty", "frequencyPenalty")):
        if doc.get(ours) is not None:
            gen[theirs] = doc[ours]
    stop = doc.get("stop")
    if stop:
        gen["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = doc.get("response_format")
    if fmt:
        kind = fmt.get("type")
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise _refuse("response_format json_schema without a schema")
            gen["responseMimeType"] = "application/json"
            gen["responseJsonSchema"] = schema  # full JSON Schema, unlike responseSchema's subset
        elif kind == "json_object":
            gen["responseMimeType"] = "application/json"
        elif kind != "text":
            raise _refuse(f"response_format {kind!r}")
    thinking = _thinking(doc.get("reasoning_effort"), model)
    if thinking:
        gen["thinkingConfig"] = thinking
    if gen:
        out["generationConfig"] = gen

    for key in doc:
        if key in _HANDLED:
            continue
        dropped.append(key)  # _DROP, and unknown fields too: the client asked for them
    return out, list(dict.fromkeys(dropped))


# ---------------------------------------------------------------- response

def usage(meta: dict) -> dict:
    """Gemini usageMetadata -> OpenAI usage. Gemini's promptTokenCount already includes the cached
    tokens (as OpenAI's prompt_tokens does); tool-use prompt tokens are input too. Thoughts are
    reported beside candidates, while OpenAI's completion_tokens includes reasoning."""
    prompt = (meta.get("promptTokenCount") or 0) + (meta.get("toolUsePromptTokenCount") or 0)
    thoughts = meta.get("thoughtsTokenCount")
    completion = (meta.get("candidatesTokenCount") or 0) + (thoughts or 0)
    out = {"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": meta.get("cachedContentTokenCount") or 0}}
    if thoughts is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return out


def finish_reason(reason: str | None, has_tool_calls: bool = False) -> str | None:
    mapped = map_stop(STOP_REASONS, reason)
    return "tool_calls" if mapped == "stop" and has_tool_calls else mapped


def _call_id(call: dict, response_id: Any, index: int) -> str:
    # Gemini may leave functionCall.id out; OpenAI clients need one to answer the call. The
    # response id makes it unique across turns, the index within the answer.
    return call.get("id") or f"call_{response_id or 'gemini'}_{index}"


def _tool_call(part: dict, response_id: Any, index: int) -> dict:
    call = part.get("functionCall") or {}
    out: dict = {"id": _call_id(call, response_id, index), "type": "function",
                 "function": {"name": call.get("name"),
                              "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)}}
    if part.get("thoughtSignature"):
        out[_EXTRA] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return out


def _blocked(doc: dict) -> bool:
    # A prompt Gemini refused outright: no candidates, promptFeedback.blockReason set.
    return not doc.get("candidates") and bool((doc.get("promptFeedback") or {}).get("blockReason"))


def response(doc: dict, created: int) -> dict:
    """A Gemini GenerateContentResponse (JSON) -> an OpenAI chat.completion object."""
    candidate = (doc.get("candidates") or [{}])[0]
    response_id = doc.get("responseId")
    texts, thoughts, calls = [], [], []
    text_sig = None
    for part in (candidate.get("content") or {}).get("parts") or []:
        if "functionCall" in part:
            calls.append(_tool_call(part, response_id, len(calls)))
            continue
        if part.get("thought"):
            thoughts.append(part.get("text", ""))
        elif "text" in part:
            texts.append(part["text"])
        # Gemini documents one signature outside function calls (on the answer's last part);
        # the first is kept, as the stream keeps it (see StreamTranslator._signature_delta).
        text_sig = text_sig or part.get("thoughtSignature")
    message: dict = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thoughts:
        # Not in OpenAI's schema; the de-facto field (LiteLLM, DeepSeek) for reasoning text.
        message["reasoning_content"] = "".join(thoughts)
    if text_sig:
        message[_EXTRA] = {"google": {"thought_signature": text_sig}}
    reason = "content_filter" if _blocked(doc) else finish_reason(candidate.get("finishReason"), bool(calls))
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": doc.get("modelVersion"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
        "usage": usage(doc.get("usageMetadata") or {}),
    }


def error(status: int, doc: Any) -> tuple[int, dict]:
    """A Gemini error (status, body) -> (status, OpenAI error body)."""
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]  # streamGenerateContent without alt=sse wraps its error in a JSON array
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("status"), str):
        kind = err["status"]
        return openai_error(status, kind, str(err.get("message", "")), _ERROR_STATUS, kind.lower())
    return openai_error(status, None, doc if isinstance(doc, str) else json.dumps(doc), _ERROR_STATUS)


# ---------------------------------------------------------------- stream

class StreamTranslator:
    """One per streamed call: Gemini `alt=sse` bytes in (split anywhere), OpenAI chunk SSE bytes
    out. Each Gemini event is a whole GenerateContentResponse holding the next parts; Gemini sends
    a function call whole, so its arguments go out as one fragment. Keeps only the unfinished
    line, the ids, the tool-call count and the latest usage between feeds."""

    def __init__(self, created: int, include_usage: bool) -> None:
        self.created = created
        self.include_usage = include_usage
        self._sse = SseData()
        self._id = None
        self._model = None
        self._usage: dict = {}
        self._started = False    # the role chunk was sent
        self._signed = False     # a text or thought signature was sent
        self._tools = 0          # function calls seen so far (their OpenAI index)
        self._finished = False   # a finish_reason chunk was sent
        self._done = False       # an error event: nothing more is translated

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        body = {"id": self._id, "object": "chat.completion.chunk", "created": self.created,
                "model": self._model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _signature_delta(self, part: dict) -> dict:
        # Clients such as the openai SDK join a field's string deltas: a second signature would
        # be glued to the first and break both, so only the first one goes out.
        sig = part.get("thoughtSignature")
        if not sig or self._signed:
            return {}
        self._signed = True
        return {_EXTRA: {"google": {"thought_signature": sig}}}

    def _event(self, ev: dict) -> bytes:
        if "error" in ev:
            self._done = True
            _, body = error(500, ev)
            return b"data: " + orjson.dumps(body) + b"\n\n"
        out = []
        if not self._started:
            self._started = True
            self._id, self._model = ev.get("responseId"), ev.get("modelVersion")
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if ev.get("usageMetadata"):
            # Each event's usageMetadata is the whole count so far: the latest one wins.
            self._usage = ev["usageMetadata"]
        candidate = (ev.get("candidates") or [{}])[0]
        for part in (candidate.get("content") or {}).get("parts") or []:
            if "functionCall" in part:
                call = _tool_call(part, self._id, self._tools)
                out.append(self._chunk({"tool_calls": [{"index": self._tools, **call}]}))
                self._tools += 1
            else:
                key = "reasoning_content" if part.get("thought") else "content"
                delta: dict = {key: part["text"]} if part.get("text") else {}
                delta.update(self._signature_delta(part))
                if delta:
                    out.append(self._chunk(delta))
        reason = candidate.get("finishReason")
        if not self._finished and (reason is not None or _blocked(ev)):  # one finish chunk per stream
            self._finished = True
            mapped = "content_filter" if _blocked(ev) else finish_reason(reason, self._tools > 0)
            out.append(self._chunk({}, mapped))
        return b"".join(out)

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return b""
        out = []
        for data in self._sse.feed(chunk):
            try:
                ev = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # not JSON: metering counts it from the upstream bytes
            if isinstance(ev, dict):
                out.append(self._event(ev))
            if self._done:
                break
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the client stream. Gemini has no end event: usage (with include_usage) goes
        out here, from the last usageMetadata. A stream cut before its finishReason ends in an
        error chunk, so the client never mistakes a truncated answer for a complete one."""
        tail = b""
        if not self._done:
            if not self._finished:
                body = {"error": {"message": "the upstream stream ended before its finish reason",
                                  "type": "server_error", "param": None, "code": "incomplete_stream"}}
                tail = b"data: " + orjson.dumps(body) + b"\n\n"
            elif self.include_usage:
                body = {"id": self._id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self._model, "choices": [], "usage": usage(self._usage)}
                tail = b"data: " + orjson.dumps(body) + b"\n\n"
        self._done = True
        return tail + b"data: [DONE]\n\n"
