"""End to end, Anthropic Messages: JSON and SSE (with cache creation and cache reads), thinking, count_tokens.

Anthropic reports cache tokens beside `input_tokens`; the ledger counts them inside it
(input = input + cache creation + cache read), and the cost is genai-prices' price of the usage.
"""
from __future__ import annotations

import json
from decimal import Decimal
from typing import TYPE_CHECKING

import pytest

from tests.fakes import reply_text
from tests.fakes.tokens import CACHE_READ_TOKENS, CACHE_WRITE_1H_TOKENS, CACHE_WRITE_5M_TOKENS

if TYPE_CHECKING:
    from conftest import E2E

MODEL = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
CACHE_WRITE = CACHE_WRITE_5M_TOKENS + CACHE_WRITE_1H_TOKENS
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_message_json_with_cache(e2e: E2E) -> None:
    case = e2e.case("cache")
    raw = e2e.anthropic(case).messages.with_raw_response.create(
        model=MODEL, max_tokens=256, messages=MESSAGES, metadata={"user_id": "anthropic-user-1"})
    message = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body
    assert raw.headers["request-id"] == ex.response_headers["request-id"]
    assert message.id == ex.response_id and message.model == ex.response_model
    assert message.content[0].text == reply_text(5)  # type: ignore[union-attr]
    assert message.usage.model_dump(exclude_none=True) == ex.usage

    u = ex.usage
    row = e2e.row(case)
    e2e.expect(row, upstream="anthropic", provider="anthropic", operation="chat", endpoint="/v1/messages",
               request_model=MODEL, response_model="claude-haiku-4-5-20251001", response_id=ex.response_id,
               stream=False, status_code=200, outcome="ok", error_type=None, finish_reason="end_turn",
               input_tokens=u["input_tokens"] + CACHE_WRITE + CACHE_READ_TOKENS,
               cache_read_tokens=CACHE_READ_TOKENS, cache_write_tokens=CACHE_WRITE, output_tokens=20,
               user_id="anthropic-user-1", request_bytes=len(ex.request_body),
               response_bytes=len(ex.response_body), anomaly=None)
    assert row["units"] == {"cache_write_5m_tokens": CACHE_WRITE_5M_TOKENS, "cache_write_1h_tokens": CACHE_WRITE_1H_TOKENS}
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body), "anthropic"), ex.response_model, "anthropic")


def test_message_stream_with_cache(e2e: E2E) -> None:
    case = e2e.case("cache")
    raw = e2e.anthropic(case).messages.with_raw_response.create(
        model=MODEL, max_tokens=256, messages=MESSAGES, stream=True)
    body = raw.http_response.read()
    events = list(raw.parse())
    ex = e2e.exchange(case)
    assert body == ex.response_body
    assert [e.type for e in events][0] == "message_start" and events[-1].type == "message_stop"
    assert events[0].message.id == ex.response_id  # type: ignore[union-attr]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")  # type: ignore[union-attr]
    assert text == reply_text(5)

    u = ex.usage  # message_start's usage merged with message_delta's, as the SDK does
    row = e2e.row(case)
    e2e.expect(row, operation="chat", stream=True, status_code=200, outcome="ok", response_id=ex.response_id,
               response_model=ex.response_model, finish_reason="end_turn",
               input_tokens=u["input_tokens"] + CACHE_WRITE + CACHE_READ_TOKENS,
               cache_read_tokens=CACHE_READ_TOKENS, cache_write_tokens=CACHE_WRITE, output_tokens=20,
               response_bytes=len(ex.response_body), anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usage": u, "model": ex.response_model}, "anthropic"),
                    ex.response_model, "anthropic")


def test_message_stream_with_thinking_and_output_only_delta(e2e: E2E) -> None:
    case = e2e.case("reasoning,delta-output-only")
    with e2e.anthropic(case).messages.stream(model=MODEL, max_tokens=512, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    ex = e2e.exchange(case)
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.usage.model_dump(exclude_none=True) == ex.usage

    u = ex.usage
    row = e2e.row(case)
    # input survives from message_start; output (with thinking) comes from message_delta
    e2e.expect(row, stream=True, outcome="ok", input_tokens=u["input_tokens"], cache_read_tokens=0,
               cache_write_tokens=0, output_tokens=20 + 160, reasoning_tokens=160, finish_reason="end_turn",
               anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usage": u, "model": ex.response_model}, "anthropic"),
                    ex.response_model, "anthropic")


def test_message_json_with_thinking(e2e: E2E) -> None:
    case = e2e.case("reasoning")
    message = e2e.anthropic(case).messages.create(model=MODEL, max_tokens=512, messages=MESSAGES)
    ex = e2e.exchange(case)
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 160
    row = e2e.row(case)
    e2e.expect(row, stream=False, outcome="ok", output_tokens=20 + 160, reasoning_tokens=160)
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body), "anthropic"), ex.response_model, "anthropic")


def test_count_tokens_is_recorded_free(e2e: E2E) -> None:
    case = e2e.case()
    raw = e2e.anthropic(case).messages.with_raw_response.count_tokens(model=MODEL, messages=MESSAGES)
    counted = raw.parse()
    ex = e2e.exchange(case)
    assert raw.http_response.content == ex.response_body and counted.input_tokens == ex.usage["input_tokens"]

    row = e2e.row(case)
    e2e.expect(row, provider="anthropic", operation="count_tokens", endpoint="/v1/messages/count_tokens",
               request_model=MODEL, status_code=200, outcome="ok", input_tokens=None, output_tokens=None,
               price_source="free", units={"counted_tokens": counted.input_tokens}, anomaly=None)
    assert [Decimal(row[k]) for k in ("input_cost_usd", "output_cost_usd", "cost_usd")] == [0, 0, 0]
