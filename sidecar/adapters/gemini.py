"""The Gemini API wire format: generateContent, streamGenerateContent (SSE and JSON array), embedContent."""
from __future__ import annotations

from typing import Any

import orjson

from ledger.records import CallInfo, Observation, Usage

from .base import (
    JsonObserver,
    Observer,
    SseObserver,
    dig,
    error_observation,
    estimate_tokens,
    int_or_none,
    is_sse,
    number_or_none,
)
from .framing import JsonArraySplitter

_OPERATIONS = {
    "generateContent": "generate_content",
    "streamGenerateContent": "generate_content",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
    "countTokens": "count_tokens",
}
_MODALITY_UNITS = {"AUDIO": "input_audio_tokens", "IMAGE": "input_image_tokens",
                   "DOCUMENT": "input_image_tokens", "VIDEO": "input_video_tokens"}


def describe(provider: str, path: str, body: Any, raw: bytes = b"") -> CallInfo:
    # .../models/{model}:{method}  (also tunedModels/{model}:{method})
    last = path.rsplit("/", 1)[-1]
    model, _, method = last.partition(":")
    operation = _OPERATIONS.get(method, "other")
    info = CallInfo(provider=provider, operation=operation, endpoint=path,
                    request_model=model or None, stream=method == "streamGenerateContent",
                    input_estimate=estimate_tokens(len(raw)),
                    priced=operation in ("generate_content", "embeddings"))
    if isinstance(body, dict):
        info.max_output_tokens = int_or_none(dig(body, "generationConfig", "maxOutputTokens"))
        info.temperature = number_or_none(dig(body, "generationConfig", "temperature"))
        info.top_p = number_or_none(dig(body, "generationConfig", "topP"))
    return info


def prepare(info: CallInfo, body: Any) -> bytes | None:
    return None  # every Gemini response carries usageMetadata


def observe(info: CallInfo, status: int, content_type: str, rewritten: bool) -> Observer:
    if status >= 400:
        return JsonObserver(error_observation)
    if is_sse(content_type):
        return ChunkStream()
    if info.stream:
        return ArrayStream()
    if info.operation == "embeddings":
        return JsonObserver(_embed_observation)
    if info.operation == "count_tokens":
        return JsonObserver(_count_observation)
    return JsonObserver(_content_observation)


def error_body(status: int, message: str, kind: str) -> bytes:
    statuses = {429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
    return orjson.dumps({"error": {"code": status, "message": message,
                                   "status": statuses.get(status, "INTERNAL")}})


def gemini_usage(meta: Any) -> Usage:
    """promptTokenCount includes cached tokens; billable output is candidates plus thoughts."""
    if not isinstance(meta, dict):
        return Usage()
    prompt = int_or_none(meta.get("promptTokenCount"))
    tool_prompt = int_or_none(meta.get("toolUsePromptTokenCount"))
    candidates = int_or_none(meta.get("candidatesTokenCount"))
    thoughts = int_or_none(meta.get("thoughtsTokenCount"))
    usage = Usage(
        input_tokens=None if prompt is None and tool_prompt is None else (prompt or 0) + (tool_prompt or 0),
        output_tokens=None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0),
        cache_read_tokens=int_or_none(meta.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )
    if usage.output_tokens is None and usage.input_tokens is not None:
        usage.output_tokens = 0
    for details in ("promptTokensDetails", "toolUsePromptTokensDetails"):
        for item in meta.get(details) or ():
            unit = _MODALITY_UNITS.get(item.get("modality"))
            count = int_or_none(item.get("tokenCount"))
            if unit and count:
                usage.units[unit] = usage.units.get(unit, 0) + count
    return usage


def _content_observation(doc: Any) -> Observation:
    seen = Observation()
    _read_chunk(seen, doc)
    if seen.usage.is_empty():
        seen.anomaly = "no_usage"
    return seen


def _embed_observation(doc: Any) -> Observation:
    # The Gemini API reports no usage for embeddings; the row keeps NULL tokens and cost.
    seen = Observation(usage=gemini_usage(doc.get("usageMetadata")))
    if seen.usage.is_empty():
        seen.anomaly = "no_usage"
    return seen


def _count_observation(doc: Any) -> Observation:
    # counting is free and consumes nothing: the count is kept as a unit (as for Anthropic), and a
    # count response carries no usageMetadata by design, so it is no anomaly
    counted = int_or_none(doc.get("totalTokens"))
    return Observation(usage=Usage(units={"counted_tokens": counted} if counted is not None else {}))


def _read_chunk(seen: Observation, doc: Any) -> None:
    if "usageMetadata" in doc:
        seen.usage = gemini_usage(doc["usageMetadata"])
    seen.response_model = doc.get("modelVersion") or seen.response_model
    seen.response_id = doc.get("responseId") or seen.response_id
    candidates = doc.get("candidates")
    if isinstance(candidates, list):
        reasons = [c.get("finishReason") for c in candidates if isinstance(c, dict) and c.get("finishReason")]
        if reasons:
            seen.finish_reason = ",".join(dict.fromkeys(reasons))
    if "error" in doc:
        seen.error_type = error_observation(doc).error_type


class ChunkStream(SseObserver):
    """`alt=sse`: every event is a whole GenerateContentResponse; the last usage wins."""

    def on_event(self, name: str | None, doc: Any) -> None:
        _read_chunk(self.seen, doc)


class ArrayStream:
    """Without `alt=sse` the stream is one JSON array, sent element by element."""

    done = False  # the end of the body is the end of the call

    def __init__(self) -> None:
        self.splitter = JsonArraySplitter()
        self.seen = Observation()
        self.bad = 0

    def feed(self, chunk: bytes) -> bytes:
        for element in self.splitter.feed(chunk):
            try:
                _read_chunk(self.seen, orjson.loads(element))
            except (orjson.JSONDecodeError, TypeError, AttributeError):
                self.bad += 1
        return chunk

    def leftover(self) -> bytes:
        return b""

    def finish(self) -> Observation:
        if self.splitter.overflow:
            self.seen.anomaly = "event_too_large"  # metering stopped there; the app still got every byte
        elif self.bad:
            self.seen.anomaly = "malformed_event"
        elif self.seen.usage.is_empty():
            self.seen.anomaly = "no_usage"
        return self.seen
