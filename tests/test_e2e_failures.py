"""End to end, when things go wrong: the app disconnects, the upstream resets or fails, the body is
malformed or compressed, the model is unknown. The app always gets what the provider sent (or an
error in the provider's own shape), and the ledger row says what happened."""
from __future__ import annotations

import gzip
import json
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2
import openai
import pytest

from tests.fakes import reply_text
from tests.fakes.tokens import CACHE_READ_TOKENS, CACHE_WRITE_1H_TOKENS, CACHE_WRITE_5M_TOKENS

if TYPE_CHECKING:
    from conftest import E2E

MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
ANTHROPIC = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": MESSAGES}
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# (sidecar path, body, auth headers) of one non-streamed call per provider
CALLS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "openai": ("/openai/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-e2e"}),
    "anthropic": ("/anthropic/v1/messages", ANTHROPIC, {"x-api-key": "sk-ant-e2e", "anthropic-version": "2023-06-01"}),
    "gemini": ("/gemini/v1beta/models/gemini-2.5-flash:generateContent", GEMINI, {"x-goog-api-key": "gm-e2e"}),
}


def provider_error_type(name: str, doc: dict[str, Any]) -> str:
    """The error type as each provider names it in its error body."""
    return doc["error"]["status"] if name == "gemini" else doc["error"]["type"]


# --- the app goes away -----------------------------------------------------------------------


def test_app_disconnect_mid_stream_is_cancelled(e2e: E2E) -> None:
    case = e2e.case("slow", chunks=200, delay_ms=25)
    stream = e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    first = next(iter(stream))
    stream.close()  # the app stops reading after one chunk

    ex = e2e.exchange(case)  # waits until the fake's side of the call ended
    assert first.id == ex.response_id
    # the sidecar dropped the upstream request with the app's: the fake could not finish its stream
    assert not ex.complete and ex.error and "disconnected" in ex.error
    assert b"[DONE]" not in ex.response_body
    row = e2e.row(case)
    e2e.expect(row, stream=True, status_code=200, outcome="cancelled", response_id=ex.response_id,
               input_tokens=None, cost_usd=None)  # OpenAI streams report usage only at their end
    assert row["ended_at"] is not None and 0 < row["response_bytes"] <= len(ex.response_body)


def test_app_disconnect_mid_anthropic_stream_keeps_usage_so_far(e2e: E2E) -> None:
    case = e2e.case("slow,cache", chunks=200, delay_ms=25)
    client = e2e.anthropic(case)
    with client.messages.stream(**ANTHROPIC) as stream:
        next(iter(stream))  # message_start
    ex = e2e.exchange(case)
    assert not ex.complete
    row = e2e.row(case)
    start = ex.usage  # message_start's usage: the input is known, one output token
    e2e.expect(row, stream=True, outcome="cancelled", response_id=ex.response_id,
               input_tokens=start["input_tokens"] + CACHE_WRITE_5M_TOKENS + CACHE_WRITE_1H_TOKENS + CACHE_READ_TOKENS,
               cache_read_tokens=CACHE_READ_TOKENS, output_tokens=1)


# --- the upstream breaks ---------------------------------------------------------------------


def test_upstream_reset_mid_stream(e2e: E2E) -> None:
    case = e2e.case("reset")
    received: list[str] = []
    with pytest.raises((openai.APIError, httpx2.HTTPError)):
        for chunk in e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    ex = e2e.exchange(case)
    assert ex.aborted and not ex.complete
    assert received == ["", "This is part 1. ", "This is part 2. "]  # what got out before the reset
    row = e2e.row(case)
    e2e.expect(row, stream=True, status_code=200, outcome="network_error", response_id=ex.response_id,
               input_tokens=None, cost_usd=None)
    assert row["error_type"]


def test_upstream_reset_mid_anthropic_stream_keeps_usage_from_message_start(e2e: E2E) -> None:
    case = e2e.case("reset,cache")
    with pytest.raises((anthropic.APIError, httpx2.HTTPError)):
        with e2e.anthropic(case).messages.stream(**ANTHROPIC) as stream:
            for _ in stream.text_stream:
                pass
    ex = e2e.exchange(case)
    assert ex.aborted and ex.usage is not None and ex.usage["output_tokens"] == 1  # only message_start got out

    u = ex.usage
    row = e2e.row(case)
    e2e.expect(row, stream=True, status_code=200, outcome="network_error", response_id=ex.response_id,
               response_model=ex.response_model, finish_reason=None,
               input_tokens=u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"],
               cache_read_tokens=CACHE_READ_TOKENS, cache_write_tokens=CACHE_WRITE_5M_TOKENS + CACHE_WRITE_1H_TOKENS,
               output_tokens=1)
    # what was consumed so far is priced: the input (with its cache writes) and one output token
    e2e.expect_cost(row, e2e.extract({"usage": u, "model": ex.response_model}, "anthropic"),
                    ex.response_model, "anthropic")


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_upstream_reset_before_response_is_a_502_in_the_provider_shape(e2e: E2E, provider: str) -> None:
    path, body, auth = CALLS[provider]
    case = e2e.case("reset")
    got = e2e.raw(path, body, auth, case=case)
    ex = e2e.exchange(case)
    assert ex.aborted and ex.status is None
    assert got.status == 502 and got.headers["content-type"].startswith("application/json")
    doc = json.loads(got.body)
    if provider == "openai":
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    elif provider == "anthropic":
        assert doc["type"] == "error" and set(doc["error"]) == {"type", "message"}
    else:
        assert doc["error"]["code"] == 502 and doc["error"]["status"] == "UNAVAILABLE"
    row = e2e.row(case)
    e2e.expect(row, status_code=None, outcome="network_error", input_tokens=None, output_tokens=None)
    e2e.expect_unpriced(row, source=None)
    assert row["error_type"]


def test_upstream_reset_before_response_through_the_sdk(e2e: E2E) -> None:
    case = e2e.case("reset")
    with pytest.raises(openai.InternalServerError) as failed:
        e2e.openai(case).chat.completions.create(**CHAT)
    assert failed.value.status_code == 502 and isinstance(failed.value.body, dict)
    assert "meterline" in failed.value.body["message"]
    assert e2e.row(case)["outcome"] == "network_error"


@pytest.mark.parametrize("status", [500, 429])
@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_upstream_errors_pass_through_unchanged(e2e: E2E, provider: str, status: int) -> None:
    path, body, auth = CALLS[provider]
    case = e2e.case(f"error{status}", x_fake_retry_after="7")
    got = e2e.raw(path, body, auth, case=case)
    ex = e2e.exchange(case)
    assert (got.status, got.body) == (status, ex.response_body)
    assert got.headers["content-type"] == ex.response_headers["content-type"]
    if status == 429:
        assert got.headers["retry-after"] == ex.response_headers["retry-after"] == "7"
    for name in ("x-should-retry", "x-ratelimit-remaining-requests"):
        assert got.headers.get(name) == ex.response_headers.get(name)

    row = e2e.row(case)
    e2e.expect(row, status_code=status, outcome="upstream_error",
               error_type=provider_error_type(provider, json.loads(ex.response_body)),
               input_tokens=None, output_tokens=None, response_bytes=len(ex.response_body))
    e2e.expect_unpriced(row, source=None)


def test_rate_limit_through_the_sdk(e2e: E2E) -> None:
    case = e2e.case("error429", x_fake_retry_after="3")
    with pytest.raises(openai.RateLimitError) as limited:
        e2e.openai(case).responses.create(model="gpt-4.1", input="x")
    ex = e2e.exchange(case)
    assert limited.value.response.headers["retry-after"] == "3"
    assert limited.value.body == json.loads(ex.response_body)["error"]
    e2e.expect(e2e.row(case), outcome="upstream_error", status_code=429, error_type="requests")


def test_error_event_in_a_stream(e2e: E2E) -> None:
    case = e2e.case("stream-error")
    with pytest.raises(openai.APIError, match="server had an error"):
        list(e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    row = e2e.row(case)
    e2e.expect(row, status_code=200, error_type="server_error")


def test_error_event_in_a_stream_is_an_upstream_error(e2e: E2E) -> None:
    case = e2e.case("stream-error")
    with pytest.raises(openai.APIError):
        list(e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert e2e.row(case)["outcome"] == "upstream_error"


# --- metering faults never break the call ------------------------------------------------------


def test_unknown_model_is_unpriced_not_free(e2e: E2E) -> None:
    case = e2e.case()
    completion = e2e.openai(case).chat.completions.create(model="gpt-nonexistent-9", messages=MESSAGES)
    ex = e2e.exchange(case)
    assert completion.choices[0].message.content == reply_text(5)
    row = e2e.row(case)
    e2e.expect(row, outcome="ok", request_model="gpt-nonexistent-9", response_model=ex.response_model,
               input_tokens=ex.usage["prompt_tokens"], output_tokens=20, anomaly=None)
    e2e.expect_unpriced(row)


def test_malformed_body_reaches_the_app_and_is_counted(e2e: E2E) -> None:
    before = e2e.anomalies().get("malformed_json", 0)
    case = e2e.case("malformed")
    got = e2e.raw(*CALLS["openai"][:2], CALLS["openai"][2], case=case)
    ex = e2e.exchange(case)
    assert (got.status, got.body) == (200, ex.response_body)
    with pytest.raises(ValueError):
        json.loads(got.body)
    sdk_case = e2e.case("malformed")
    with pytest.raises(ValueError):  # the SDK fails on it as it would without the sidecar
        e2e.openai(sdk_case).chat.completions.create(**CHAT)

    for c in (case, sdk_case):
        row = e2e.row(c)
        e2e.expect(row, status_code=200, outcome="ok", anomaly="malformed_json", input_tokens=None)
        e2e.expect_unpriced(row, source=None)
    assert e2e.anomalies().get("malformed_json", 0) == before + 2


def test_malformed_stream_event_is_counted_and_usage_still_read(e2e: E2E) -> None:
    before = e2e.anomalies().get("malformed_event", 0)
    case = e2e.case("malformed")
    got = e2e.raw("/openai/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                  CALLS["openai"][2], case=case)
    ex = e2e.exchange(case)
    assert (got.status, got.body) == (200, ex.response_body)
    row = e2e.row(case)
    e2e.expect(row, stream=True, outcome="ok", anomaly="malformed_event", input_tokens=ex.usage["prompt_tokens"],
               output_tokens=20)
    e2e.expect_cost(row, e2e.extract({"usage": ex.usage, "model": ex.response_model}, "openai", "chat"),
                    ex.response_model, "openai")
    assert e2e.anomalies().get("malformed_event", 0) == before + 1


def test_gzip_body_reaches_the_app_compressed_and_is_metered(e2e: E2E) -> None:
    case = e2e.case("gzip")
    got = e2e.raw(*CALLS["openai"][:2], {**CALLS["openai"][2], "Accept-Encoding": "gzip"}, case=case)
    ex = e2e.exchange(case)
    assert got.status == 200 and got.headers["content-encoding"] == "gzip"
    assert got.body == ex.response_body  # the compressed bytes as the fake sent them
    assert gzip.decompress(got.body) == ex.response_body_decoded
    assert int(got.headers["content-length"]) == len(ex.response_body)

    row = e2e.row(case)
    e2e.expect(row, outcome="ok", response_id=ex.response_id, input_tokens=ex.usage["prompt_tokens"],
               output_tokens=20, response_bytes=len(ex.response_body), anomaly=None)
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body_decoded), "openai", "chat"),
                    ex.response_model, "openai")

    sdk_case = e2e.case("gzip")  # the SDK asks for gzip and decompresses it itself
    raw = e2e.openai(sdk_case).chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["content-encoding"] == "gzip"
    assert raw.parse().usage.model_dump(exclude_none=True) == e2e.exchange(sdk_case).usage  # type: ignore[union-attr]
    assert e2e.row(sdk_case)["input_tokens"] == e2e.exchange(sdk_case).usage["prompt_tokens"]
