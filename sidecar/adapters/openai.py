"""The OpenAI wire format (and every OpenAI-compatible upstream): chat, responses, completions,
embeddings, images and transcriptions, as JSON or SSE."""
from __future__ import annotations

import re
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
from .framing import SseEvent

# operation names follow the OpenTelemetry GenAI values where one exists
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/responses", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/images/generations", "image_generation"),
    ("/images/edits", "image_generation"),
    ("/audio/transcriptions", "transcription"),
    ("/audio/translations", "transcription"),
)
_STREAMED_USAGE_OPTIONAL = ("/chat/completions", "/completions")
_MULTIPART_MODEL = re.compile(rb'name="model"\r\n\r\n([^\r\n]{1,200})\r\n')
_MULTIPART_STREAM = re.compile(rb'name="stream"\r\n\r\ntrue\r\n')


def describe(provider: str, path: str, body: Any, raw: bytes = b"") -> CallInfo:
    operation, suffix = "other", ""
    for suffix_, op in _OPERATIONS:
        if path.endswith(suffix_):
            operation, suffix = op, suffix_
            break
    info = CallInfo(provider=provider, operation=operation, endpoint=path,
                    input_estimate=estimate_tokens(len(raw)), priced=operation != "other")
    if isinstance(body, dict):
        model = body.get("model")
        info.request_model = model if isinstance(model, str) else None
        info.stream = body.get("stream") is True
        info.max_output_tokens = int_or_none(
            body.get("max_output_tokens") if suffix == "/responses"
            else body.get("max_completion_tokens") or body.get("max_tokens"))
        info.temperature = number_or_none(body.get("temperature"))
        info.top_p = number_or_none(body.get("top_p"))
        user = body.get("user") or body.get("safety_identifier")
        info.user_id = user if isinstance(user, str) else None
    elif operation == "transcription" and raw:
        m = _MULTIPART_MODEL.search(raw)
        info.request_model = m.group(1).decode("utf-8", "replace") if m else None
        info.stream = _MULTIPART_STREAM.search(raw) is not None
    return info


def prepare(info: CallInfo, body: Any) -> bytes | None:
    """Asks for streamed usage when the app did not, so the ledger gets exact counts."""
    if not (info.stream and isinstance(body, dict) and info.endpoint.endswith(_STREAMED_USAGE_OPTIONAL)):
        return None
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    body = dict(body)
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return orjson.dumps(body)


def observe(info: CallInfo, status: int, content_type: str, rewritten: bool) -> Observer:
    if status >= 400:
        return JsonObserver(error_observation)
    if is_sse(content_type):
        if info.endpoint.endswith("/responses"):
            return ResponsesStream()
        if info.operation == "transcription":
            return TranscriptionStream()
        return ChatStream(strip_usage=rewritten)
    if info.endpoint.endswith("/responses"):
        return JsonObserver(_responses_observation)
    if info.operation == "transcription" and not content_type.startswith("application/json"):
        return NoUsageBody()  # response_format text, srt or vtt: a transcript, not a malformed JSON
    if info.operation == "image_generation":
        return JsonObserver(_image_observation)
    if info.operation == "transcription":
        return JsonObserver(_transcription_observation)
    return JsonObserver(_chat_observation)


def error_body(status: int, message: str, kind: str) -> bytes:
    error_type = "insufficient_quota" if status == 429 else "api_error"
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": None, "code": kind}})


# --- usage in each response shape ------------------------------------------------------------

def chat_usage(u: Any) -> Usage:
    """Chat and legacy completions (and embeddings): cache and reasoning are inside the totals."""
    if not isinstance(u, dict):
        return Usage()
    usage = Usage(
        input_tokens=int_or_none(u.get("prompt_tokens")),
        output_tokens=int_or_none(u.get("completion_tokens")),
        cache_read_tokens=int_or_none(dig(u, "prompt_tokens_details", "cached_tokens")),
        cache_write_tokens=int_or_none(dig(u, "prompt_tokens_details", "cache_write_tokens")),
        reasoning_tokens=int_or_none(dig(u, "completion_tokens_details", "reasoning_tokens")),
    )
    if usage.output_tokens is None and usage.input_tokens is not None and "total_tokens" in u:
        usage.output_tokens = 0  # embeddings report input only
    _unit(usage, "input_audio_tokens", dig(u, "prompt_tokens_details", "audio_tokens"))
    _unit(usage, "output_audio_tokens", dig(u, "completion_tokens_details", "audio_tokens"))
    return usage


def responses_usage(u: Any) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        input_tokens=int_or_none(u.get("input_tokens")),
        output_tokens=int_or_none(u.get("output_tokens")),
        cache_read_tokens=int_or_none(dig(u, "input_tokens_details", "cached_tokens")),
        cache_write_tokens=int_or_none(dig(u, "input_tokens_details", "cache_write_tokens")),
        reasoning_tokens=int_or_none(dig(u, "output_tokens_details", "reasoning_tokens")),
    )


def _unit(usage: Usage, name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
        usage.units[name] = value


def _finish_reasons(choices: Any) -> str | None:
    if not isinstance(choices, list):
        return None
    reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict) and c.get("finish_reason")]
    return ",".join(dict.fromkeys(reasons)) or None


def _chat_observation(doc: Any) -> Observation:
    seen = Observation(usage=chat_usage(doc.get("usage")), response_model=doc.get("model"),
                       response_id=doc.get("id"), finish_reason=_finish_reasons(doc.get("choices")),
                       service_tier=_tier(doc))
    if seen.usage.is_empty():
        seen.anomaly = "no_usage"
    return seen


def _responses_observation(doc: Any) -> Observation:
    seen = Observation(usage=responses_usage(doc.get("usage")), response_model=doc.get("model"),
                       response_id=doc.get("id"), finish_reason=_response_status(doc), service_tier=_tier(doc))
    if seen.usage.is_empty():
        seen.anomaly = "no_usage"
    return seen


def _tier(doc: Any) -> str | None:
    tier = doc.get("service_tier")
    return tier if isinstance(tier, str) else None


def _response_status(doc: Any) -> str | None:
    reason = dig(doc, "incomplete_details", "reason")
    return reason if isinstance(reason, str) else doc.get("status")


def _image_observation(doc: Any) -> Observation:
    u = doc.get("usage")
    if isinstance(u, dict):
        usage = responses_usage(u)
        _unit(usage, "input_text_tokens", dig(u, "input_tokens_details", "text_tokens"))
        _unit(usage, "input_image_tokens", dig(u, "input_tokens_details", "image_tokens"))
        _unit(usage, "output_text_tokens", dig(u, "output_tokens_details", "text_tokens"))
        _unit(usage, "output_image_tokens", dig(u, "output_tokens_details", "image_tokens"))
    else:
        # older image models bill per image: count them
        data = doc.get("data")
        usage = Usage(units={"images": len(data)} if isinstance(data, list) else {})
    return Observation(usage=usage, response_model=doc.get("model"))


def transcription_usage(u: Any) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    if u.get("type") == "duration":
        seconds = u.get("seconds")
        # a transcription's audio is its input: genai-prices prices `audio_seconds` as neither input
        # nor output unless the input part is named too
        return Usage(units={"audio_seconds": seconds, "input_audio_seconds": seconds}
                     if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else {})
    usage = Usage(input_tokens=int_or_none(u.get("input_tokens")),
                  output_tokens=int_or_none(u.get("output_tokens")))
    _unit(usage, "input_audio_tokens", dig(u, "input_token_details", "audio_tokens"))
    _unit(usage, "input_text_tokens", dig(u, "input_token_details", "text_tokens"))
    return usage


def _transcription_observation(doc: Any) -> Observation:
    seen = Observation(usage=transcription_usage(doc.get("usage")))
    if seen.usage.is_empty():
        seen.anomaly = "no_usage"
    return seen


class NoUsageBody:
    """A body that carries no usage by design: passed through, not parsed."""

    __slots__ = ()
    done = False  # the end of the body is the end of the call

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def leftover(self) -> bytes:
        return b""

    def finish(self) -> Observation:
        return Observation(anomaly="no_usage")


# --- streams ---------------------------------------------------------------------------------

_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')
# While rewriting, at most this much of an incomplete event is held back from the app.
STRIP_HOLD = 256 * 1024


class ChatStream(SseObserver):
    """Chat and legacy completion chunks; usage comes in a last chunk with empty `choices`.

    With `strip_usage`, the sidecar asked for that chunk itself: it is removed, together with the
    `"usage": null` that the request made appear in every other chunk, so the app's stream is as
    it would have been.
    """

    def __init__(self, strip_usage: bool = False) -> None:
        super().__init__()
        self.strip_usage = strip_usage
        self.gave_up = False  # an event outgrew STRIP_HOLD: the stream went on unrewritten
        self.reasons: dict[str, None] = {}

    def feed(self, chunk: bytes) -> bytes:
        if not self.strip_usage:
            return super().feed(chunk)
        out: list[bytes] = []
        for event in self.splitter.feed(chunk):
            keep = self._handle_stripping(event)
            if keep is not None:
                out.append(keep)
        if self.done:
            # nothing is stripped after [DONE]: what follows passes as it comes
            self.strip_usage = False
            out.append(self.splitter.held())
        elif len(self.splitter.tail) > STRIP_HOLD:
            # an event this long is no usage chunk: the app gets what is held now and the rest as it
            # comes (the splitter keeps its copy, to meter the event if it ever ends)
            self.strip_usage = False
            self.gave_up = True
            out.append(self.splitter.held())
        return b"".join(out)

    def leftover(self) -> bytes:
        return self.splitter.held() if self.strip_usage else b""

    def _handle_stripping(self, event: SseEvent) -> bytes | None:
        if not event.data:
            return event.raw
        if event.data == b"[DONE]":
            self.done = True
            return event.raw
        try:
            doc = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            self.bad_events += 1
            return event.raw
        try:
            self.on_event(event.event, doc)
        except (TypeError, ValueError, AttributeError, KeyError):
            self.bad_events += 1
            return event.raw
        if isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict):
            return None
        return _USAGE_NULL.sub(b"", event.raw, count=1)

    def on_event(self, name: str | None, doc: Any) -> None:
        seen = self.seen
        if seen.response_id is None:
            seen.response_id = doc.get("id")
            seen.response_model = doc.get("model")
        if seen.service_tier is None:
            seen.service_tier = _tier(doc)
        for choice in doc.get("choices") or ():
            reason = choice.get("finish_reason")
            if reason:
                self.reasons[reason] = None
        if isinstance(doc.get("usage"), dict):
            seen.usage = chat_usage(doc["usage"])
        if "error" in doc:
            seen.error_type = error_observation(doc).error_type

    def finish(self) -> Observation:
        seen = super().finish()
        seen.finish_reason = ",".join(self.reasons) or None
        if self.gave_up and seen.anomaly in (None, "no_usage"):
            seen.anomaly = "usage_not_stripped"
        return seen


class ResponsesStream(SseObserver):
    """Responses API events; the final `response.completed|incomplete|failed` carries usage."""

    def on_event(self, name: str | None, doc: Any) -> None:
        kind = doc.get("type") or name
        response = doc.get("response")
        if not isinstance(response, dict):
            if kind == "error":
                self.seen.error_type = doc.get("code") or "error"
            return
        seen = self.seen
        seen.response_id = response.get("id") or seen.response_id
        seen.response_model = response.get("model") or seen.response_model
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.done = True
            seen.usage = responses_usage(response.get("usage"))
            seen.service_tier = _tier(response)
            seen.finish_reason = _response_status(response)
            if kind == "response.failed":
                seen.error_type = dig(response, "error", "code") or "failed"


class TranscriptionStream(SseObserver):
    """Streamed transcriptions: `transcript.text.done` carries the usage."""

    def on_event(self, name: str | None, doc: Any) -> None:
        if isinstance(doc.get("usage"), dict):
            self.seen.usage = transcription_usage(doc["usage"])
