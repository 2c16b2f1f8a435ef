"""Self-test of tests/fakes: the real openai / anthropic / google-genai SDKs pointed straight at the fake."""

from __future__ import annotations

import base64
import gzip
import json
import math
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import anthropic
import httpx2
import openai
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as gtypes
from openai.types import Completion, CreateEmbeddingResponse, ImagesResponse
from openai.types.audio import Transcription
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from tests.fakes import Exchange, FakeProvider, fetch_exchanges, reply_text
from tests.fakes.openai_api import wav
from tests.fakes.tokens import CACHE_READ_TOKENS, CACHE_WRITE_1H_TOKENS, CACHE_WRITE_5M_TOKENS

pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
ANTHROPIC_MODEL = "claude-haiku-4-5"


def fresh_tokens(ex: Exchange) -> int:
    """The documented formula: ceil(len(request body) / 4)."""
    return max(1, math.ceil(len(ex.request_body) / 4))


def scenario(value: str, **extra: str) -> dict[str, str]:
    return {"x-fake-scenario": value, **extra}


def data_objects(ex: Exchange) -> list[Any]:
    return [json.loads(data) for _, data in ex.sse_events() if data != "[DONE]"]


# ----- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    server = FakeProvider().start_in_thread()
    try:
        yield server
    finally:
        server.stop_thread()


@pytest.fixture(autouse=True)
def _clean(fake: FakeProvider) -> Iterator[None]:
    fake.clear()
    yield
    fake.wait_settled_sync()


@pytest.fixture
def oai(fake: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=fake.openai_base_url, max_retries=0)


@pytest.fixture
def ant(fake: FakeProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-ant-test", base_url=fake.anthropic_base_url, max_retries=0)


def gemini_client(base_url: str, api_version: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> genai.Client:
    options = gtypes.HttpOptions(
        base_url=base_url,
        api_version=api_version,
        headers=headers,
        retry_options=gtypes.HttpRetryOptions(attempts=1),
    )
    return genai.Client(api_key="gm-test", http_options=options)


@pytest.fixture
def gem(fake: FakeProvider) -> genai.Client:
    return gemini_client(fake.gemini_base_url)


def only(fake: FakeProvider) -> Exchange:
    fake.wait_settled_sync()
    items = fake.exchanges
    assert len(items) == 1, [e.path for e in items]
    return items[0]


# ----- OpenAI chat completions -------------------------------------------------------------------


def test_openai_chat_json(fake: FakeProvider, oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    ex = only(fake)
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-request-id"].startswith("req_")
    assert completion.id.startswith("chatcmpl-") and completion.id == ex.response_id
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.choices[0].message.content == reply_text(5)
    ChatCompletion.model_validate(ex.response_json())  # strict pydantic validation of the wire JSON
    p = fresh_tokens(ex)
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == ex.usage
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (p, 20, p + 20)
    assert ex.api_key == "sk-test" and ex.endpoint == "chat.completions" and ex.model == "gpt-4o-mini"
    assert ex.request_headers["authorization"] == "Bearer sk-test" and ex.method == "POST"
    assert ex.request_json["messages"] == MESSAGES


def test_openai_chat_stream_without_include_usage(fake: FakeProvider, oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    ex = only(fake)
    assert ex.response_headers["content-type"] == "text/event-stream; charset=utf-8"
    assert ex.response_body.endswith(b"data: [DONE]\n\n")
    objects = data_objects(ex)
    assert all("usage" not in obj for obj in objects)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply_text(5)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert ex.usage is None and ex.computed_usage is not None and ex.complete


def test_openai_chat_stream_include_usage(fake: FakeProvider, oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=scenario("cache,reasoning", **{"x-fake-chunks": "3"}),
        )
    )
    ex = only(fake)
    objects = data_objects(ex)
    for obj in objects:
        ChatCompletionChunk.model_validate(obj)
    assert [obj["usage"] for obj in objects[:-1]] == [None] * (len(objects) - 1)
    assert objects[-1]["choices"] == [] and objects[-1]["usage"] == ex.usage
    usage = chunks[-1].usage
    assert usage is not None and usage.model_dump(exclude_none=True) == ex.usage
    p = fresh_tokens(ex)
    assert usage.prompt_tokens == p + CACHE_READ_TOKENS  # cached tokens are part of prompt_tokens
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == CACHE_READ_TOKENS
    assert usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens == 96
    assert usage.completion_tokens == 12 + 96
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({obj["id"] for obj in objects}) == 1


# ----- OpenAI responses ------------------------------------------------------------------------

_RESPONSE_EVENT_TYPES: dict[str, type[pydantic.BaseModel]] = {
    "response.created": ResponseCreatedEvent,
    "response.in_progress": ResponseInProgressEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.completed": ResponseCompletedEvent,
}


def test_openai_responses_json(fake: FakeProvider, oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="gpt-4.1", input="hello", extra_headers=scenario("cache"))
    ex = only(fake)
    Response.model_validate(ex.response_json())
    assert response.id.startswith("resp_") and response.model == "gpt-4.1-2025-04-14"
    assert response.output_text == reply_text(5)
    assert response.usage is not None and response.usage.model_dump(exclude_none=True) == ex.usage
    assert response.usage.input_tokens == fresh_tokens(ex) + CACHE_READ_TOKENS
    assert response.usage.input_tokens_details.cached_tokens == CACHE_READ_TOKENS


def test_openai_responses_stream(fake: FakeProvider, oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="o4-mini", input="hello", stream=True, extra_headers=scenario("reasoning")))
    ex = only(fake)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert kinds.count("response.output_text.delta") == 5
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for name, data in ex.sse_events():
        obj = json.loads(data)
        assert name == obj["type"]
        _RESPONSE_EVENT_TYPES[name].model_validate(obj)
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent) and final.response.usage is not None
    assert final.response.usage.model_dump(exclude_none=True) == ex.usage
    assert final.response.output[0].type == "reasoning"
    assert final.response.usage.output_tokens_details.reasoning_tokens == 160
    assert final.response.usage.output_tokens == 20 + 160
    assert final.response.output_text == reply_text(5)


# ----- OpenAI embeddings, completions, images, transcriptions ------------------------------------


def test_openai_embeddings_base64_and_float(fake: FakeProvider, oai: openai.OpenAI) -> None:
    default = oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    floats = oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float")
    fake.wait_settled_sync()
    b64_ex, float_ex = fake.exchanges
    assert b64_ex.request_json["encoding_format"] == "base64"  # what the SDK asks for by default
    wire = b64_ex.response_json()["data"][0]["embedding"]
    assert isinstance(wire, str) and len(base64.b64decode(wire)) == 1536 * 4
    CreateEmbeddingResponse.model_validate(float_ex.response_json())
    assert len(default.data) == 2 and len(default.data[0].embedding) == 1536
    as_float32 = lambda values: struct.pack(f"<{len(values)}f", *values)  # noqa: E731
    assert as_float32(default.data[1].embedding) == as_float32(floats.data[1].embedding)
    assert default.usage.prompt_tokens == default.usage.total_tokens == fresh_tokens(b64_ex)
    assert b64_ex.usage == {"prompt_tokens": fresh_tokens(b64_ex), "total_tokens": fresh_tokens(b64_ex)}
    small = oai.embeddings.create(model="text-embedding-3-large", input="x", dimensions=8)
    assert len(small.data[0].embedding) == 8
    assert abs(sum(v * v for v in small.data[0].embedding) - 1.0) < 1e-5


def test_openai_legacy_completions(fake: FakeProvider, oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once")
    Completion.model_validate(fake.exchanges[0].response_json())
    assert completion.choices[0].text == reply_text(5)
    assert completion.usage is not None and completion.usage.model_dump(exclude_none=True) == fake.exchanges[0].usage
    chunks = list(
        oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", stream=True, stream_options={"include_usage": True})
    )
    fake.wait_settled_sync()
    ex = fake.exchanges[1]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply_text(5)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == ex.usage
    assert ex.usage["prompt_tokens"] == fresh_tokens(ex)


def test_openai_images(fake: FakeProvider, oai: openai.OpenAI) -> None:
    image = oai.images.generate(model="gpt-image-1", prompt="a meter", size="1024x1536", quality="medium")
    ex = fake.exchanges[0]
    ImagesResponse.model_validate(ex.response_json())
    assert image.usage is not None and image.usage.model_dump(exclude_none=True) == ex.usage
    assert image.usage.output_tokens == 1584 and image.usage.input_tokens_details.text_tokens == fresh_tokens(ex)
    assert image.size == "1024x1536" and image.quality == "medium"
    assert image.data and base64.b64decode(image.data[0].b64_json or "")[:4] == b"\x89PNG"
    dalle = oai.images.generate(model="dall-e-3", prompt="a meter")
    assert dalle.usage is None and dalle.data and dalle.data[0].url and dalle.data[0].revised_prompt
    assert fake.exchanges[1].usage is None
    with urllib.request.urlopen(dalle.data[0].url) as png:
        assert png.read()[:4] == b"\x89PNG"


def test_openai_transcriptions(fake: FakeProvider, oai: openai.OpenAI) -> None:
    audio = wav(2.5)
    whisper = oai.audio.transcriptions.create(model="whisper-1", file=("speech.wav", audio, "audio/wav"))
    tokens = oai.audio.transcriptions.create(model="gpt-4o-transcribe", file=("speech.wav", audio, "audio/wav"), prompt="meter")
    fake.wait_settled_sync()
    w_ex, t_ex = fake.exchanges
    Transcription.model_validate(w_ex.response_json())
    Transcription.model_validate(t_ex.response_json())
    assert whisper.text == reply_text(5).strip()
    assert w_ex.usage == {"type": "duration", "seconds": 3}
    assert whisper.usage is not None and whisper.usage.model_dump(exclude_none=True) == w_ex.usage
    assert tokens.usage is not None and tokens.usage.model_dump(exclude_none=True) == t_ex.usage
    assert t_ex.usage["input_token_details"] == {"text_tokens": 2, "audio_tokens": 25}
    assert t_ex.usage["total_tokens"] == t_ex.usage["input_tokens"] + t_ex.usage["output_tokens"]
    assert audio in t_ex.request_body and t_ex.request_json is None
    text = oai.audio.transcriptions.create(model="whisper-1", file=("speech.wav", audio, "audio/wav"), response_format="text")
    assert str(text).strip() == reply_text(5).strip()


# ----- OpenAI failure scenarios -------------------------------------------------------------------


def test_openai_errors(fake: FakeProvider, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as server_error:
        oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("error500"))
    assert server_error.value.body == {"message": server_error.value.message.split(" - ", 1)[1], "type": "server_error", "param": None, "code": None}
    with pytest.raises(openai.RateLimitError) as limited:
        oai.responses.create(model="gpt-4.1", input="x", extra_headers=scenario("error429", **{"x-fake-retry-after": "7"}))
    assert limited.value.response.headers["retry-after"] == "7"
    assert fake.exchanges[1].status == 429 and fake.exchanges[1].response_json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("no-such-token"))


def test_openai_reset_and_malformed(fake: FakeProvider, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("reset"))
    assert fake.exchanges[0].status is None and fake.exchanges[0].aborted

    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=scenario("reset")):
            received.append(chunk.choices[0].delta.content or "")
    fake.wait_settled_sync()
    ex = fake.exchanges[1]
    assert received == ["", "This is part 1. ", "This is part 2. "]
    assert ex.aborted and not ex.complete and b"[DONE]" not in ex.response_body

    with pytest.raises(ValueError):  # json.JSONDecodeError
        oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("malformed"))
    with pytest.raises(ValueError):
        list(oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=scenario("malformed")))
    fake.wait_settled_sync()
    malformed_stream = fake.exchanges[3]
    broken = [data for _, data in malformed_stream.sse_events() if data != "[DONE]" and not data.endswith("}")]
    assert len(broken) == 1

    with pytest.raises(openai.APIError, match="server had an error"):
        list(oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=scenario("stream-error")))


def test_openai_gzip_and_slow(fake: FakeProvider, oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("gzip"))
    ex = fake.exchanges[0]
    assert raw.headers["content-encoding"] == "gzip"
    assert gzip.decompress(ex.response_body) == ex.response_body_decoded
    assert raw.parse().usage.model_dump(exclude_none=True) == ex.usage  # type: ignore[union-attr]
    status, headers, body = _post(  # urllib sends no Accept-Encoding: no compression then
        fake.openai_base_url + "/chat/completions",
        {"model": "gpt-4o-mini", "messages": MESSAGES},
        {"Authorization": "Bearer k", "x-fake-scenario": "gzip"},
    )
    assert status == 200 and "Content-Encoding" not in headers and json.loads(body)["usage"] == fake.exchanges[1].usage
    fake.clear()

    start = time.monotonic()
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers=scenario("slow", **{"x-fake-chunk-delay-ms": "30", "x-fake-chunks": "4"}),
        )
    )
    assert time.monotonic() - start >= 0.09
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply_text(4)


# ----- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_message_json_cache(fake: FakeProvider, ant: anthropic.Anthropic) -> None:
    message = ant.messages.create(model=ANTHROPIC_MODEL, max_tokens=256, messages=MESSAGES, extra_headers=scenario("cache"))
    ex = only(fake)
    Message.model_validate(ex.response_json())
    assert ex.response_headers["content-type"] == "application/json"
    assert message.id.startswith("msg_01") and message.model == "claude-haiku-4-5-20251001"
    assert message.content[0].type == "text" and message.content[0].text == reply_text(5)
    assert message.usage.model_dump(exclude_none=True) == ex.usage
    assert message.usage.input_tokens == fresh_tokens(ex)  # cache tokens sit beside input_tokens
    assert message.usage.cache_read_input_tokens == CACHE_READ_TOKENS
    assert message.usage.cache_creation_input_tokens == CACHE_WRITE_5M_TOKENS + CACHE_WRITE_1H_TOKENS
    assert message.usage.cache_creation is not None
    assert message.usage.cache_creation.ephemeral_5m_input_tokens == CACHE_WRITE_5M_TOKENS
    assert message.usage.cache_creation.ephemeral_1h_input_tokens == CACHE_WRITE_1H_TOKENS
    assert message.usage.output_tokens == 20 and message.stop_reason == "end_turn"


def test_anthropic_stream(fake: FakeProvider, ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model=ANTHROPIC_MODEL, max_tokens=256, messages=MESSAGES, extra_headers=scenario("cache")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    ex = only(fake)
    assert ex.response_headers["content-type"] == "text/event-stream; charset=utf-8"
    assert text == reply_text(5)
    names = [name for name, _ in ex.sse_events()]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    adapter = pydantic.TypeAdapter(RawMessageStreamEvent)
    for name, data in ex.sse_events():
        obj = json.loads(data)
        assert obj["type"] == name
        if name != "ping":
            adapter.validate_python(obj)
    start = json.loads(ex.sse_events()[0][1])
    assert start["message"]["usage"]["output_tokens"] == 1
    delta = json.loads(ex.sse_events()[-2][1])
    assert delta["usage"]["output_tokens"] == 20 and delta["delta"]["stop_reason"] == "end_turn"
    assert final.usage.model_dump(exclude_none=True) == ex.usage
    assert final.usage.cache_read_input_tokens == CACHE_READ_TOKENS and final.usage.input_tokens == fresh_tokens(ex)


def test_anthropic_stream_reasoning_and_delta_output_only(fake: FakeProvider, ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=MESSAGES, extra_headers=scenario("reasoning,delta-output-only")
    ) as stream:
        final = stream.get_final_message()
    ex = only(fake)
    assert [block.type for block in final.content] == ["thinking", "text"]
    delta = json.loads(ex.sse_events()[-2][1])
    assert set(delta["usage"]) == {"output_tokens", "output_tokens_details"}
    assert final.usage.output_tokens == 20 + 160
    assert final.usage.output_tokens_details is not None and final.usage.output_tokens_details.thinking_tokens == 160
    assert final.usage.input_tokens == fresh_tokens(ex)  # survives from message_start
    assert final.usage.model_dump(exclude_none=True) == ex.usage


def test_anthropic_count_tokens_and_errors(fake: FakeProvider, ant: anthropic.Anthropic) -> None:
    counted = ant.messages.count_tokens(model=ANTHROPIC_MODEL, messages=MESSAGES)
    assert counted.input_tokens == fresh_tokens(fake.exchanges[0]) and fake.exchanges[0].endpoint == "messages.count_tokens"
    with pytest.raises(anthropic.InternalServerError):
        ant.messages.create(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, extra_headers=scenario("error500"))
    with pytest.raises(anthropic.RateLimitError) as limited:
        ant.messages.create(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, extra_headers=scenario("error429"))
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body["type"] == "error" and limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.OverloadedError):
        ant.messages.create(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, extra_headers=scenario("error529"))
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        with ant.messages.stream(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, extra_headers=scenario("stream-error")) as s:
            s.get_final_message()
    # The anthropic SDK lets the transport error of a cut stream through unwrapped.
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        with ant.messages.stream(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, extra_headers=scenario("reset")) as s:
            s.get_final_message()
    fake.wait_settled_sync()
    reset = fake.exchanges[-1]
    assert reset.aborted and reset.usage is not None and reset.usage["output_tokens"] == 1  # only message_start got out


# ----- Gemini ------------------------------------------------------------------------------------


def test_gemini_generate_content(fake: FakeProvider, gem: genai.Client) -> None:
    config = gtypes.GenerateContentConfig(http_options=gtypes.HttpOptions(headers=scenario("cache,reasoning")))
    response = gem.models.generate_content(model="gemini-2.5-flash", contents="hello", config=config)
    ex = only(fake)
    assert ex.path.endswith("/models/gemini-2.5-flash:generateContent") and ex.endpoint == "generateContent"
    assert ex.response_headers["content-type"] == "application/json; charset=UTF-8"
    assert ex.api_key == "gm-test"
    gtypes.GenerateContentResponse.model_validate(ex.response_json())  # extra="forbid": no unknown fields
    assert response.text == reply_text(5) and response.model_version == "gemini-2.5-flash"
    usage = response.usage_metadata
    assert usage is not None and ex.usage is not None
    p = fresh_tokens(ex)
    assert usage.prompt_token_count == p + CACHE_READ_TOKENS  # cached content is part of the prompt
    assert usage.cached_content_token_count == CACHE_READ_TOKENS
    assert usage.candidates_token_count == 20 and usage.thoughts_token_count == 160
    assert usage.total_token_count == p + CACHE_READ_TOKENS + 20 + 160
    assert ex.usage["totalTokenCount"] == usage.total_token_count


def test_gemini_stream_sse(fake: FakeProvider, gem: genai.Client) -> None:
    chunks = list(gem.models.generate_content_stream(model="gemini-2.5-flash", contents="hello"))
    ex = only(fake)
    assert ex.query_string == "alt=sse" and ex.stream
    assert ex.response_headers["content-type"] == "text/event-stream"
    assert ex.response_body.count(b"\r\n\r\n") == 5 and ex.response_body.startswith(b"data: {")
    assert "".join(c.text or "" for c in chunks) == reply_text(5)
    for _, data in ex.sse_events():
        gtypes.GenerateContentResponse.model_validate(json.loads(data))
    assert [c.usage_metadata.candidates_token_count for c in chunks] == [None, None, None, None, 20]  # type: ignore[union-attr]
    assert all(c.usage_metadata.prompt_token_count == fresh_tokens(ex) for c in chunks)  # type: ignore[union-attr]
    assert chunks[-1].usage_metadata.model_dump(by_alias=True, exclude_none=True, mode="json") == ex.usage  # type: ignore[union-attr]


def _post(url: str, body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_gemini_json_array_stream_and_query_key(fake: FakeProvider) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    status, headers, raw = _post(f"{fake.base_url}/v1beta/models/gemini-2.0-flash:streamGenerateContent?key=qk", body)
    ex = only(fake)
    assert status == 200 and headers["Content-Type"] == "application/json; charset=UTF-8"
    assert raw == ex.response_body and raw.startswith(b"[{") and raw.endswith(b"}]") and raw.count(b"},\r\n{") == 4
    elements = json.loads(raw)
    assert len(elements) == 5 and elements[-1]["usageMetadata"] == ex.usage
    assert ex.api_key == "qk" and ex.query["key"] == "qk"
    status, _, raw = _post(f"{fake.base_url}/v1beta/models/gemini-2.0-flash:generateContent", body)
    assert status == 403 and json.loads(raw)["error"]["status"] == "PERMISSION_DENIED"


def test_gemini_embeddings(fake: FakeProvider, gem: genai.Client) -> None:
    old = gem.models.embed_content(model="gemini-embedding-001", contents=["alpha", "beta"])
    assert old.embeddings and len(old.embeddings) == 2 and len(old.embeddings[0].values or []) == 3072
    assert old.usage_metadata is None and fake.exchanges[0].endpoint == "batchEmbedContents"
    new = gem.models.embed_content(
        model="gemini-embedding-2", contents="alpha", config=gtypes.EmbedContentConfig(output_dimensionality=16)
    )
    fake.wait_settled_sync()
    assert new.embeddings and len(new.embeddings[0].values or []) == 16
    assert new.usage_metadata is not None and new.usage_metadata.prompt_token_count == fresh_tokens(fake.exchanges[1])
    status, _, raw = _post(
        f"{fake.base_url}/v1beta/models/gemini-embedding-001:embedContent",
        {"content": {"parts": [{"text": "alpha"}]}},
        {"x-goog-api-key": "k"},
    )
    assert status == 200 and list(json.loads(raw)) == ["embedding"]
    assert json.loads(raw)["embedding"]["values"] == old.embeddings[0].values


def test_gemini_errors_and_v1(fake: FakeProvider) -> None:
    failing = gemini_client(fake.gemini_base_url, headers=scenario("error500"))
    with pytest.raises(genai_errors.ServerError) as server_error:
        failing.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert server_error.value.code == 500 and server_error.value.status == "INTERNAL"
    limited = gemini_client(fake.gemini_base_url, headers=scenario("error429"))
    with pytest.raises(genai_errors.ClientError) as client_error:
        limited.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert client_error.value.code == 429 and client_error.value.status == "RESOURCE_EXHAUSTED"
    assert fake.exchanges[1].response_headers["retry-after"] == "1"
    v1 = gemini_client(fake.gemini_base_url, api_version="v1")
    assert v1.models.generate_content(model="gemini-2.5-flash", contents="x").text == reply_text(5)
    assert fake.exchanges[2].path == "/v1/models/gemini-2.5-flash:generateContent"


# ----- in-loop server, async SDKs, subprocess CLI -----------------------------------------------------


@pytest.mark.asyncio
async def test_in_loop_server_with_async_clients() -> None:
    async with FakeProvider(default_scenario="cache") as server:
        client = openai.AsyncOpenAI(api_key="k", base_url=server.openai_base_url, max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        last = None
        async for chunk in stream:
            last = chunk
        await server.wait_settled()
        assert last is not None and last.usage is not None
        assert last.usage.prompt_tokens_details and last.usage.prompt_tokens_details.cached_tokens == CACHE_READ_TOKENS
        assert server.exchanges[0].scenario == ("cache",)
        await client.close()

        gclient = gemini_client(server.gemini_base_url)  # async google-genai uses aiohttp
        text = ""
        async for piece in await gclient.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"):
            text += piece.text or ""
        assert text == reply_text(5)
        await gclient.aio.aclose()


def test_cli_subprocess() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes", "--port", "0", "--chunks", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        base_url = line.strip().rsplit(" ", 1)[-1]
        assert base_url.startswith("http://127.0.0.1:")
        client = anthropic.Anthropic(api_key="k", base_url=base_url, max_retries=0)
        message = client.messages.create(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES)
        records = fetch_exchanges(base_url)
        assert len(records) == 1 and records[0].usage == message.usage.model_dump(exclude_none=True)
        assert records[0].request_body and message.content[0].text == reply_text(2)  # type: ignore[union-attr]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
