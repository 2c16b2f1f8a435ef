"""Fake OpenAI API under /v1: chat completions, responses, embeddings, completions, images, transcriptions.

Usage convention (see ``tokens.py`` for the counts): ``prompt_tokens = fresh + cache_read``
with ``prompt_tokens_details.cached_tokens = cache_read`` (cached tokens are INSIDE the prompt
tokens), ``completion_tokens = output + reasoning`` with
``completion_tokens_details.reasoning_tokens = reasoning``; the Responses API reports the same
numbers as ``input_tokens`` / ``output_tokens`` with ``*_details``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import random
import struct
import time
import wave
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from . import naming
from .scenarios import Scenario
from .tools import argument_pieces, first_tool
from .tokens import Counts, reply_parts, reply_text, text_tokens
from .wire import BadRequest, Ctx, Provider, SseFraming, dumps_pretty

JSON_CT = "application/json"
SSE_CT = "text/event-stream; charset=utf-8"

_ERRORS = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country, region, or territory not supported."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 1s.",
    ),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


class OpenAIProvider(Provider):
    name = "openai"

    def error_payload(self, status: int, message: Optional[str], scenario: Scenario) -> tuple[bytes, str, dict[str, str]]:
        err_type, code, default_message = _ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None, f"Error {status}."))
        body = {"error": {"message": message or default_message, "type": err_type, "param": None, "code": code}}
        headers: dict[str, str] = {}
        if status == 429:
            headers = {
                "retry-after": scenario.retry_after,
                "x-ratelimit-limit-requests": "3",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{scenario.retry_after}s",
            }
        return dumps_pretty(body), JSON_CT, headers

    def auth_problem(self, request: web.Request) -> Optional[tuple[int, str]]:
        if self.api_key(request):
            return None
        return (
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )

    def api_key(self, request: web.Request) -> Optional[str]:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer ") and auth[7:].strip():
            return auth[7:].strip()
        return None

    def response_headers(self) -> dict[str, str]:
        return {"x-request-id": naming.openai_request_id(), "openai-version": "2020-10-01", "openai-processing-ms": "42"}


PROVIDER = OpenAIProvider()


# ----- usage ---------------------------------------------------------------------------------


def chat_usage(c: Counts) -> dict[str, Any]:
    prompt = c.fresh + c.cache_read
    completion = c.output + c.reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": c.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": c.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def legacy_usage(c: Counts) -> dict[str, Any]:
    prompt = c.fresh + c.cache_read
    completion = c.output + c.reasoning
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def responses_usage(c: Counts) -> dict[str, Any]:
    prompt = c.fresh + c.cache_read
    completion = c.output + c.reasoning
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": c.cache_read, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": c.reasoning},
        "total_tokens": prompt + completion,
    }


def _stream_error_event() -> tuple[dict[str, Any], Optional[str]]:
    error = {"message": _ERRORS[500][2], "type": "server_error", "param": None, "code": None}
    return {"error": error}, None


# ----- /v1/chat/completions -----------------------------------------------------------------


async def chat_completions(ctx: Ctx) -> web.StreamResponse:
    body = ctx.json_body()
    model = ctx.require_model(body)
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage"))
    include_obfuscation = options.get("include_obfuscation", True) is not False
    usage = chat_usage(ctx.counts)
    cid = naming.openai_chat_id()
    created = int(time.time())
    rmodel = naming.dated_model(model)
    fingerprint = naming.system_fingerprint()
    ctx.describe(model=model, response_model=rmodel, response_id=cid, stream=stream, computed_usage=usage)

    tool = first_tool(body) if ctx.scenario.has("tool-call") else None
    call_id = f"call_{cid[-24:]}"
    if not stream:
        message = {"role": "assistant", "content": reply_text(ctx.scenario.chunks), "refusal": None, "annotations": []}
        if tool:
            message["content"] = None
            message["tool_calls"] = [{"id": call_id, "type": "function",
                                      "function": {"name": tool, "arguments": "".join(argument_pieces())}}]
        obj = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": rmodel,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if tool else "stop"}],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": fingerprint,
        }
        return await ctx.send_json(obj, pretty=True, usage=usage)

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": rmodel,
            "service_tier": "default",
            "system_fingerprint": fingerprint,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = None
        if include_obfuscation:
            out["obfuscation"] = naming.obfuscation()
        return out

    def choice(delta: dict[str, Any], finish: Optional[str] = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    s = await ctx.open_stream(content_type=SSE_CT, framing=SseFraming(), error_event=_stream_error_event)
    await s.send(chunk(choice({"role": "assistant", "content": "", "refusal": None})))
    if tool:
        await s.content(chunk(choice({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                                      "function": {"name": tool, "arguments": ""}}]})))
        for piece in argument_pieces():
            await s.content(chunk(choice({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})))
    else:
        for part in reply_parts(ctx.scenario.chunks):
            await s.content(chunk(choice({"content": part})))
    await s.send(chunk(choice({}, "tool_calls" if tool else "stop")))
    if include_usage:
        final = chunk([])
        final["usage"] = usage
        await s.send(final)
        s.note_usage(usage)
    return await s.finish(b"data: [DONE]\n\n")


# ----- /v1/completions (legacy) ---------------------------------------------------------------


async def completions(ctx: Ctx) -> web.StreamResponse:
    body = ctx.json_body()
    model = ctx.require_model(body)
    stream = bool(body.get("stream"))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    usage = legacy_usage(ctx.counts)
    cid = naming.openai_completion_id()
    created = int(time.time())
    rmodel = naming.dated_model(model)
    ctx.describe(model=model, response_model=rmodel, response_id=cid, stream=stream, computed_usage=usage)

    if not stream:
        obj = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": rmodel,
            "choices": [{"text": reply_text(ctx.scenario.chunks), "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage,
        }
        return await ctx.send_json(obj, pretty=True, usage=usage)

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "choices": choices, "model": rmodel}
        if include_usage:
            out["usage"] = None
        return out

    s = await ctx.open_stream(content_type=SSE_CT, framing=SseFraming(), error_event=_stream_error_event)
    for part in reply_parts(ctx.scenario.chunks):
        await s.content(chunk([{"text": part, "index": 0, "logprobs": None, "finish_reason": None}]))
    await s.send(chunk([{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]))
    if include_usage:
        final = chunk([])
        final["usage"] = usage
        await s.send(final)
        s.note_usage(usage)
    return await s.finish(b"data: [DONE]\n\n")


# ----- /v1/responses -------------------------------------------------------------------------


async def responses(ctx: Ctx) -> web.StreamResponse:
    body = ctx.json_body()
    model = ctx.require_model(body)
    stream = bool(body.get("stream"))
    usage = responses_usage(ctx.counts)
    rid = naming.openai_response_id()
    rmodel = naming.dated_model(model)
    created = int(time.time())
    ctx.describe(model=model, response_model=rmodel, response_id=rid, stream=stream, computed_usage=usage)

    reasoning_item: Optional[dict[str, Any]] = None
    if ctx.scenario.reasoning:
        reasoning_item = {"id": naming.openai_item_id("rs"), "type": "reasoning", "summary": []}
    msg_id = naming.openai_item_id("msg")
    text = reply_text(ctx.scenario.chunks)

    def output_text(value: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": value}

    def message(status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": msg_id, "type": "message", "status": status, "content": content, "role": "assistant"}

    def response_obj(status: str, output: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        reasoning_cfg = body.get("reasoning") or {}
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": rmodel,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {
                "effort": reasoning_cfg.get("effort", "medium" if ctx.scenario.reasoning else None),
                "summary": reasoning_cfg.get("summary"),
            },
            "safety_identifier": None,
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage if with_usage else None,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    final_output = ([reasoning_item] if reasoning_item else []) + [message("completed", [output_text(text)])]
    if not stream:
        return await ctx.send_json(response_obj("completed", final_output, True), pretty=True, usage=usage)

    seq = 0

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal seq
        out = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return out

    def error_event() -> tuple[dict[str, Any], Optional[str]]:
        return event("error", code="server_error", message=_ERRORS[500][2], param=None), "error"

    s = await ctx.open_stream(content_type=SSE_CT, framing=SseFraming(), error_event=error_event)

    async def send(kind: str, **fields: Any) -> None:
        await s.send(event(kind, **fields), event=kind)

    await send("response.created", response=response_obj("in_progress", [], False))
    await send("response.in_progress", response=response_obj("in_progress", [], False))
    index = 0
    if reasoning_item:
        await send("response.output_item.added", output_index=0, item=reasoning_item)
        await send("response.output_item.done", output_index=0, item=reasoning_item)
        index = 1
    where = {"item_id": msg_id, "output_index": index, "content_index": 0}
    await send("response.output_item.added", output_index=index, item=message("in_progress", []))
    await send("response.content_part.added", **where, part=output_text(""))
    for part in reply_parts(ctx.scenario.chunks):
        kind = "response.output_text.delta"
        await s.content(event(kind, **where, delta=part, logprobs=[], obfuscation=naming.obfuscation()), event=kind)
    await send("response.output_text.done", **where, text=text, logprobs=[])
    await send("response.content_part.done", **where, part=output_text(text))
    await send("response.output_item.done", output_index=index, item=message("completed", [output_text(text)]))
    await send("response.completed", response=response_obj("completed", final_output, True))
    s.note_usage(usage)
    return await s.finish()


# ----- /v1/embeddings ------------------------------------------------------------------------

_EMBEDDING_DIMS = {"text-embedding-3-large": 3072, "text-embedding-3-small": 1536, "text-embedding-ada-002": 1536}


def embedding_vector(seed_text: str, dims: int) -> list[float]:
    """A deterministic unit vector, already rounded to float32 precision (9 significant digits)."""
    rng = random.Random(hashlib.sha256(seed_text.encode("utf-8")).digest())
    raw = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    floats32 = struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in raw)))
    return [float(f"{v:.9g}") for v in floats32]


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [repr(value)]
    if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        return [v if isinstance(v, str) else repr(v) for v in value]
    raise BadRequest(400, "'input' must be a string, an array of strings or an array of token arrays.")


async def embeddings(ctx: Ctx) -> web.StreamResponse:
    body = ctx.json_body()
    model = ctx.require_model(body)
    inputs = _embedding_inputs(body.get("input"))
    dims = int(body.get("dimensions") or _EMBEDDING_DIMS.get(model, 1536))
    as_base64 = body.get("encoding_format") == "base64"
    prompt = ctx.counts.fresh
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    ctx.describe(model=model, response_model=model, computed_usage=usage)
    data = []
    for i, text in enumerate(inputs):
        vector = embedding_vector(f"{model}\n{text}", dims)
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    obj = {"object": "list", "data": data, "model": model, "usage": usage}
    return await ctx.send_json(obj, pretty=True, usage=usage)


# ----- /v1/images/generations ----------------------------------------------------------------

# A valid 1x1 transparent PNG.
TINY_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)

# gpt-image-1 output tokens per image, by quality and size.
_IMAGE_OUTPUT_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}


async def image_generations(ctx: Ctx) -> web.StreamResponse:
    body = ctx.json_body()
    model = str(body.get("model") or "dall-e-2")
    n = int(body.get("n") or 1)
    created = int(time.time())
    prompt = str(body.get("prompt") or "")
    if model.startswith("gpt-image"):
        size = body.get("size") or "auto"
        size = "1024x1024" if size == "auto" else size
        quality = body.get("quality") or "auto"
        quality = "high" if quality == "auto" else quality
        per_image = _IMAGE_OUTPUT_TOKENS.get(quality, _IMAGE_OUTPUT_TOKENS["high"]).get(size, 4160)
        text_in = ctx.counts.fresh
        usage = {
            "input_tokens": text_in,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": text_in},
            "output_tokens": per_image * n,
            "total_tokens": text_in + per_image * n,
        }
        ctx.describe(model=model, response_model=model, computed_usage=usage)
        obj = {
            "created": created,
            "background": body.get("background") if body.get("background") in ("transparent", "opaque") else "opaque",
            "data": [{"b64_json": TINY_PNG_B64} for _ in range(n)],
            "output_format": body.get("output_format") or "png",
            "quality": quality,
            "size": size,
            "usage": usage,
        }
        return await ctx.send_json(obj, pretty=True, usage=usage)

    ctx.describe(model=model, response_model=model, computed_usage=None)
    as_b64 = body.get("response_format") == "b64_json"
    base = f"{ctx.request.scheme}://{ctx.request.host}"
    items = []
    for i in range(n):
        item: dict[str, Any] = {}
        if model == "dall-e-3":
            item["revised_prompt"] = f"A detailed rendering of: {prompt}"
        if as_b64:
            item["b64_json"] = TINY_PNG_B64
        else:
            item["url"] = f"{base}/_fake/images/img-{i}.png"
        items.append(item)
    return await ctx.send_json({"created": created, "data": items}, pretty=True, usage=None)


# ----- /v1/audio/transcriptions --------------------------------------------------------------


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[Optional[str], bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes)."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequest(400, "Expected a multipart/form-data body.")
    fields: dict[str, tuple[Optional[str], bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def wav(seconds: float, rate: int = 8000) -> bytes:
    """A silent mono 16-bit WAV file of `seconds` (what audio_seconds reads back), for tests to upload."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(rate * seconds))
    return buffer.getvalue()


def audio_seconds(audio: bytes) -> float:
    """Duration of a WAV file from its header; otherwise assume 128 kbit/s compressed audio."""
    if len(audio) >= 44 and audio[:4] == b"RIFF" and audio[8:12] == b"WAVE":
        pos = 12
        byte_rate = 0
        while pos + 8 <= len(audio):
            chunk_id, size = audio[pos : pos + 4], struct.unpack("<I", audio[pos + 4 : pos + 8])[0]
            if chunk_id == b"fmt " and size >= 16:
                byte_rate = struct.unpack("<I", audio[pos + 16 : pos + 20])[0]
            elif chunk_id == b"data" and byte_rate:
                return min(size, len(audio) - pos - 8) / byte_rate
            pos += 8 + size + (size & 1)
    return len(audio) / 16000.0


async def audio_transcriptions(ctx: Ctx) -> web.StreamResponse:
    content_type = ctx.request.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest(400, "Expected a multipart/form-data body.")
    form = parse_multipart(content_type, ctx.body)
    model = form.get("model", (None, b""))[1].decode("utf-8")
    if not model:
        raise BadRequest(400, "you must provide a model parameter")
    if "file" not in form:
        raise BadRequest(400, "you must provide a file parameter")
    audio = form["file"][1]
    response_format = form.get("response_format", (None, b"json"))[1].decode("utf-8") or "json"
    prompt = form.get("prompt", (None, b""))[1].decode("utf-8")
    seconds = audio_seconds(audio)
    text = reply_text(ctx.scenario.chunks).strip()

    usage: dict[str, Any]
    if model.startswith("whisper"):
        usage = {"type": "duration", "seconds": max(1, math.ceil(seconds))}
    else:
        audio_tokens = max(1, math.ceil(seconds * 10))
        prompt_tokens = text_tokens(prompt) if prompt else 0
        output = text_tokens(text)
        usage = {
            "type": "tokens",
            "input_tokens": audio_tokens + prompt_tokens,
            "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": audio_tokens},
            "output_tokens": output,
            "total_tokens": audio_tokens + prompt_tokens + output,
        }
    ctx.describe(model=model, response_model=model, computed_usage=usage)

    if response_format == "text":
        return await ctx.send_bytes((text + "\n").encode(), content_type="text/plain; charset=utf-8", usage=None)
    if response_format in ("srt", "vtt"):
        cue = f"00:00:00{',' if response_format == 'srt' else '.'}000 --> 00:00:0{min(9, math.ceil(seconds))}{',' if response_format == 'srt' else '.'}000"
        doc = f"1\n{cue}\n{text}\n\n" if response_format == "srt" else f"WEBVTT\n\n{cue}\n{text}\n\n"
        return await ctx.send_bytes(doc.encode(), content_type="text/plain; charset=utf-8", usage=None)
    obj: dict[str, Any] = {"text": text, "usage": usage}
    if response_format == "verbose_json":
        obj = {
            "task": "transcribe",
            "language": "english",
            "duration": round(seconds, 2),
            "text": text,
            "segments": [
                {
                    "id": 0,
                    "seek": 0,
                    "start": 0.0,
                    "end": round(seconds, 2),
                    "text": " " + text,
                    "tokens": [50364, 400, 318, 50414],
                    "temperature": 0.0,
                    "avg_logprob": -0.25,
                    "compression_ratio": 1.2,
                    "no_speech_prob": 0.01,
                }
            ],
            "usage": usage,
        }
    return await ctx.send_json(obj, pretty=True, usage=usage)


ROUTES: list[tuple[str, str, str, Callable[[Ctx], Awaitable[web.StreamResponse]]]] = [
    ("POST", "/v1/chat/completions", "chat.completions", chat_completions),
    ("POST", "/v1/completions", "completions", completions),
    ("POST", "/v1/responses", "responses", responses),
    ("POST", "/v1/embeddings", "embeddings", embeddings),
    ("POST", "/v1/images/generations", "images.generations", image_generations),
    ("POST", "/v1/audio/transcriptions", "audio.transcriptions", audio_transcriptions),
]
