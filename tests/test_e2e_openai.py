"""End to end, OpenAI wire format: every metered operation through the real sidecar with the real SDK.

Each test checks both ends of one call: the app gets exactly what the fake sent (SDK-visible values
and the raw bytes), and the ledger row has the fake's usage, ids and a cost equal to genai-prices'
own price of that usage.
"""
from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import genai_prices
import pytest

from tests.fakes import reply_text
from tests.fakes.openai_api import wav
from tests.fakes.tokens import CACHE_READ_TOKENS

if TYPE_CHECKING:
    from conftest import E2E

MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def compact(obj: Any) -> bytes:
    """How the fake encodes stream chunks."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def without_usage(body: bytes) -> bytes:
    """The SSE body the fake sends when the app does not ask for usage: the same chunks with no
    `"usage": null` in them and no final usage chunk (built from the fake's own bytes)."""
    out = []
    blocks = body.split(b"\n\n")
    assert blocks[-1] == b"", "the fake's stream ends with a blank line"
    for block in blocks[:-1]:
        assert block.startswith(b"data: ")
        data = block[len(b"data: "):]
        if data == b"[DONE]":
            out.append(block + b"\n\n")
            continue
        obj = json.loads(data)
        if obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
            continue  # the usage chunk
        assert "usage" in obj and obj.pop("usage") is None
        out.append(b"data: " + compact(obj) + b"\n\n")
    return b"".join(out)


def sse_objects(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]


# --- chat completions ------------------------------------------------------------------------


def test_chat_json_with_cache_and_reasoning(e2e: E2E) -> None:
    case = e2e.case("cache,reasoning")
    raw = e2e.openai(case).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, user="end-user-7")
    completion = raw.parse()
    ex = e2e.exchange(case)

    # the app got the fake's response, byte for byte, headers included
    assert raw.http_response.content == ex.response_body
    assert raw.status_code == 200 and raw.headers["x-request-id"] == ex.response_headers["x-request-id"]
    assert completion.id == ex.response_id and completion.model == ex.response_model
    assert completion.choices[0].message.content == reply_text(5)
    assert completion.usage is not None and completion.usage.model_dump(exclude_none=True) == ex.usage
    assert ex.request_json["model"] == "gpt-4o-mini" and "stream_options" not in ex.request_json

    u = ex.usage
    row = e2e.row(case)
    e2e.expect(row, upstream="openai", provider="openai", operation="chat", endpoint="/v1/chat/completions",
               request_model="gpt-4o-mini", response_model=ex.response_model, response_id=ex.response_id,
               stream=False, status_code=200, outcome="ok", error_type=None, finish_reason="stop",
               input_tokens=u["prompt_tokens"], cache_read_tokens=CACHE_READ_TOKENS, cache_write_tokens=None,
               output_tokens=u["completion_tokens"], reasoning_tokens=160, user_id="end-user-7",
               request_bytes=len(ex.request_body), response_bytes=len(ex.response_body), anomaly=None)
    assert u["prompt_tokens"] > CACHE_READ_TOKENS and u["completion_tokens"] == 20 + 160
    assert row["started_at"] < row["ended_at"] and 0 < row["ttft_ms"] <= row["duration_ms"]
    assert 0 < row["overhead_ms"] <= row["duration_ms"]
    usage = e2e.extract(json.loads(ex.response_body), "openai", "chat")
    cost = e2e.expect_cost(row, usage, ex.response_model, "openai")
    # cached input is cheaper than fresh input: the cache split reached the price
    plain = e2e.calc(genai_prices.Usage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"]),
                     ex.response_model, "openai", row["started_at"])
    assert cost.input_usd < plain.input_usd


def test_chat_stream_with_include_usage_is_passed_through(e2e: E2E) -> None:
    case = e2e.case("cache,reasoning", chunks=3)
    raw = e2e.openai(case).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    body = raw.http_response.read()
    chunks = list(raw.parse())
    ex = e2e.exchange(case)

    assert body == ex.response_body  # untouched: the app asked for usage itself
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_text(3)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == ex.usage
    assert {c.id for c in chunks} == {ex.response_id}

    row = e2e.row(case)
    assert row["request_bytes"] == len(ex.request_body)  # the request was not rewritten
    e2e.expect(row, operation="chat", stream=True, status_code=200, outcome="ok", response_id=ex.response_id,
               response_model=ex.response_model, finish_reason="stop",
               input_tokens=ex.usage["prompt_tokens"], cache_read_tokens=CACHE_READ_TOKENS,
               output_tokens=12 + 96, reasoning_tokens=96, response_bytes=len(ex.response_body), anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usage": ex.usage, "model": ex.response_model}, "openai", "chat"),
                    ex.response_model, "openai")


def test_chat_stream_without_include_usage_is_unchanged_for_the_app(e2e: E2E) -> None:
    case = e2e.case()
    raw = e2e.openai(case).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)
    body = raw.http_response.read()
    chunks = list(raw.parse())
    ex = e2e.exchange(case)

    # the sidecar asked upstream for usage ...
    assert ex.request_json["stream_options"] == {"include_usage": True}
    assert ex.usage is not None and sse_objects(ex.response_body)[-1]["usage"] == ex.usage
    # ... and the app's stream is what the fake sends without it: no usage chunk, no "usage": null
    assert body == without_usage(ex.response_body)
    assert b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n")
    assert len(chunks) == 7 and all("usage" not in c.model_fields_set for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply_text(5)
    assert chunks[-1].choices[0].finish_reason == "stop"

    # cross-check against the fake answering the same app directly: the same chunks, key for key
    direct = e2e.raw("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                     {"Authorization": "Bearer sk-direct"}, base=e2e.fake.base_url)
    assert [list(o) for o in sse_objects(direct.body)] == [list(o) for o in sse_objects(body)]

    row = e2e.row(case)
    e2e.expect(row, stream=True, outcome="ok", response_id=ex.response_id, finish_reason="stop",
               input_tokens=ex.usage["prompt_tokens"], output_tokens=20, cache_read_tokens=0, reasoning_tokens=0,
               response_bytes=len(ex.response_body), anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usage": ex.usage, "model": ex.response_model}, "openai", "chat"),
                    ex.response_model, "openai")


# --- responses API ---------------------------------------------------------------------------


def test_responses_json(e2e: E2E) -> None:
    case = e2e.case("cache")
    raw = e2e.openai(case).responses.with_raw_response.create(model="gpt-4.1", input="hello")
    response = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert response.id == ex.response_id and response.output_text == reply_text(5)
    assert response.usage is not None and response.usage.model_dump(exclude_none=True) == ex.usage

    row = e2e.row(case)
    e2e.expect(row, operation="chat", endpoint="/v1/responses", request_model="gpt-4.1",
               response_model="gpt-4.1-2025-04-14", response_id=ex.response_id, stream=False, status_code=200,
               outcome="ok", finish_reason="completed", input_tokens=ex.usage["input_tokens"],
               cache_read_tokens=CACHE_READ_TOKENS, cache_write_tokens=0, output_tokens=20, reasoning_tokens=0,
               anomaly=None)
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body), "openai", "responses"), ex.response_model, "openai")


def test_responses_stream(e2e: E2E) -> None:
    case = e2e.case("reasoning")
    raw = e2e.openai(case).responses.with_raw_response.create(model="o4-mini", input="hello", stream=True)
    body = raw.http_response.read()
    events = list(raw.parse())
    ex = e2e.exchange(case)
    assert body == ex.response_body
    assert events[-1].type == "response.completed" and events[-1].response.id == ex.response_id
    assert events[-1].response.usage.model_dump(exclude_none=True) == ex.usage
    assert events[-1].response.output_text == reply_text(5)

    row = e2e.row(case)
    e2e.expect(row, operation="chat", endpoint="/v1/responses", request_model="o4-mini",
               response_model=ex.response_model, response_id=ex.response_id, stream=True, outcome="ok",
               finish_reason="completed", input_tokens=ex.usage["input_tokens"], cache_read_tokens=0,
               output_tokens=20 + 160, reasoning_tokens=160, anomaly=None)
    assert row["request_bytes"] == len(ex.request_body)  # Responses streams are not rewritten
    e2e.expect_cost(row, e2e.extract({"usage": ex.usage, "model": ex.response_model}, "openai", "responses"),
                    ex.response_model, "openai")


# --- embeddings and legacy completions -------------------------------------------------------


def test_embeddings(e2e: E2E) -> None:
    case = e2e.case()
    raw = e2e.openai(case).embeddings.with_raw_response.create(model="text-embedding-3-small",
                                                               input=["alpha", "beta", "gamma"])
    result = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert len(result.data) == 3 and len(result.data[2].embedding) == 1536
    assert result.usage.model_dump(exclude_none=True) == ex.usage

    row = e2e.row(case)
    e2e.expect(row, operation="embeddings", endpoint="/v1/embeddings", request_model="text-embedding-3-small",
               response_model="text-embedding-3-small", response_id=None, stream=False, outcome="ok",
               input_tokens=ex.usage["prompt_tokens"], output_tokens=0, finish_reason=None, anomaly=None)
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body), "openai", "embeddings"),
                    "text-embedding-3-small", "openai")


def test_legacy_completions_json(e2e: E2E) -> None:
    case = e2e.case()
    raw = e2e.openai(case).completions.with_raw_response.create(model="gpt-3.5-turbo-instruct", prompt="Once")
    completion = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert completion.id == ex.response_id and completion.choices[0].text == reply_text(5)

    row = e2e.row(case)
    e2e.expect(row, operation="text_completion", endpoint="/v1/completions", request_model="gpt-3.5-turbo-instruct",
               response_model=ex.response_model, response_id=ex.response_id, stream=False, outcome="ok",
               finish_reason="stop", input_tokens=ex.usage["prompt_tokens"], output_tokens=20, anomaly=None)
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body), "openai", "chat"), ex.response_model, "openai")


@pytest.mark.parametrize("app_asks_usage", [True, False])
def test_legacy_completions_stream(e2e: E2E, app_asks_usage: bool) -> None:
    case = e2e.case(chunks=4)
    extra = {"stream_options": {"include_usage": True}} if app_asks_usage else {}
    raw = e2e.openai(case).completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Once", stream=True, **extra)
    body = raw.http_response.read()
    chunks = list(raw.parse())
    ex = e2e.exchange(case)
    assert ex.request_json["stream_options"] == {"include_usage": True}
    if app_asks_usage:
        assert body == ex.response_body
        assert chunks[-1].usage is not None and chunks[-1].usage.model_dump(exclude_none=True) == ex.usage
    else:
        assert body == without_usage(ex.response_body) and b'"usage"' not in body
        assert all("usage" not in c.model_fields_set for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply_text(4)

    row = e2e.row(case)
    e2e.expect(row, operation="text_completion", stream=True, outcome="ok", response_id=ex.response_id,
               finish_reason="stop", input_tokens=ex.usage["prompt_tokens"], output_tokens=16, anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usage": ex.usage, "model": ex.response_model}, "openai", "chat"),
                    ex.response_model, "openai")


# --- images ----------------------------------------------------------------------------------


def test_image_generation_with_token_usage(e2e: E2E) -> None:
    case = e2e.case()
    raw = e2e.openai(case).images.with_raw_response.generate(model="gpt-image-1", prompt="a meter",
                                                             size="1024x1536", quality="medium", n=2)
    image = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert len(image.data) == 2 and image.usage is not None
    assert image.usage.model_dump(exclude_none=True) == ex.usage

    row = e2e.row(case)
    text_in = ex.usage["input_tokens_details"]["text_tokens"]
    e2e.expect(row, operation="image_generation", endpoint="/v1/images/generations", request_model="gpt-image-1",
               stream=False, outcome="ok", input_tokens=text_in, output_tokens=2 * 1584, anomaly=None)
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body), "openai", "images"), "gpt-image-1", "openai")


def test_image_generation_per_image_model_is_counted_and_unpriced(e2e: E2E) -> None:
    case = e2e.case()
    raw = e2e.openai(case).images.with_raw_response.generate(model="dall-e-3", prompt="a meter")
    image = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert image.usage is None and image.data and image.data[0].revised_prompt

    row = e2e.row(case)
    e2e.expect(row, operation="image_generation", request_model="dall-e-3", outcome="ok", units={"images": 1},
               input_tokens=None, output_tokens=None)
    e2e.expect_unpriced(row)  # no catalogue price and no config price: NULL, never zero


# --- audio transcription ---------------------------------------------------------------------


def test_transcription_with_token_usage(e2e: E2E) -> None:
    case = e2e.case()
    audio = wav(2.5)
    raw = e2e.openai(case).audio.transcriptions.with_raw_response.create(
        model="gpt-4o-mini-transcribe", file=("speech.wav", audio, "audio/wav"), prompt="meter")
    result = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert result.text == reply_text(5).strip() and result.usage.model_dump(exclude_none=True) == ex.usage
    assert audio in ex.request_body

    u = ex.usage
    row = e2e.row(case)
    e2e.expect(row, operation="transcription", endpoint="/v1/audio/transcriptions",
               request_model="gpt-4o-mini-transcribe", stream=False, outcome="ok",
               input_tokens=u["input_tokens"], output_tokens=u["output_tokens"], anomaly=None,
               request_bytes=len(ex.request_body))
    assert row["units"]["input_audio_tokens"] == u["input_token_details"]["audio_tokens"] == 25
    usage = genai_prices.Usage(input_tokens=u["input_tokens"], output_tokens=u["output_tokens"],
                               input_audio_tokens=u["input_token_details"]["audio_tokens"],
                               input_text_tokens=u["input_token_details"]["text_tokens"])
    cost = e2e.expect_cost(row, usage, "gpt-4o-mini-transcribe", "openai")
    # audio input is dearer than text input: the audio split reached the price
    text_only = e2e.calc(genai_prices.Usage(input_tokens=u["input_tokens"], output_tokens=u["output_tokens"]),
                         "gpt-4o-mini-transcribe", "openai", row["started_at"])
    assert cost.input_usd > text_only.input_usd


def test_transcription_with_duration_usage(e2e: E2E) -> None:
    case = e2e.case()
    raw = e2e.openai(case).audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("speech.wav", wav(2.5), "audio/wav"))
    result = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert ex.usage == {"type": "duration", "seconds": 3}
    assert result.usage is not None and result.usage.model_dump(exclude_none=True) == ex.usage

    row = e2e.row(case)
    e2e.expect(row, operation="transcription", request_model="whisper-1", outcome="ok",
               input_tokens=None, output_tokens=None, anomaly=None)
    assert row["units"]["audio_seconds"] == 3
    # genai-prices' own reading of a duration usage, and its price: whisper-1 bills audio time
    usage = e2e.extract({"usage": ex.usage, "model": "whisper-1"}, "openai", "live")
    price = genai_prices.calc_price(usage, "whisper-1", provider_id="openai",
                                    genai_request_timestamp=datetime.fromisoformat(row["started_at"]))
    total = price.total_price.quantize(Decimal("0.000000000001"))
    assert total == Decimal("0.0003")  # $0.36 an hour, 3 seconds
    assert Decimal(row["cost_usd"]) == total, row
    assert Decimal(row["input_cost_usd"]) == total and Decimal(row["output_cost_usd"]) == 0  # audio is input
    assert row["price_source"].startswith("genai-prices ")


def test_transcription_as_text_is_passed_through_without_usage(e2e: E2E) -> None:
    before = e2e.anomalies()
    case = e2e.case()
    raw = e2e.openai(case).audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("speech.wav", wav(1.0), "audio/wav"), response_format="text")
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body == (reply_text(5).strip() + "\n").encode()
    row = e2e.row(case)
    # a plain-text transcript carries no usage by design: that is no_usage, not a malformed body
    e2e.expect(row, operation="transcription", outcome="ok", anomaly="no_usage", units=None)
    e2e.expect_unpriced(row, source=None)
    after = e2e.anomalies()
    assert after.get("malformed_json", 0) == before.get("malformed_json", 0)
    assert after.get("no_usage", 0) == before.get("no_usage", 0) + 1
