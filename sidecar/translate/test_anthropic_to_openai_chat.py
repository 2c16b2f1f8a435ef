"""Tests for the Anthropic-client to OpenAI-chat-upstream translator, over the golden corpus in
tests/golden/anthropic_to_openai_chat/ and through the anthropic SDK's own client and stream."""

from __future__ import annotations

import json
import random
from pathlib import Path

import anthropic
import httpx2 as httpx
import pytest
from anthropic.types import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.translate import anthropic_to_openai_chat as t
from sidecar.translate.base import TranslateError

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden" / "anthropic_to_openai_chat"
CASES = sorted(p.name[: -len(".request.json")] for p in GOLDEN.glob("*.request.json"))


def load(case: str, suffix: str):
    return json.loads((GOLDEN / f"{case}.{suffix}").read_text())


def raw(case: str, suffix: str) -> bytes:
    return (GOLDEN / f"{case}.{suffix}").read_bytes()


def translate_stream(data: bytes, pieces: list[int]) -> bytes:
    st_ = t.StreamTranslator()
    out, at = [], 0
    for size in pieces:
        out.append(st_.feed(data[at:at + size]))
        at += size
    out.append(st_.feed(data[at:]))
    return b"".join(out) + st_.finish()


def splits(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out, total = [], 0
    while total < n:
        out.append(rng.randint(1, 40))
        total += out[-1]
    return out


def events(sse: bytes) -> list:
    """The events of a client stream, checking Anthropic's framing byte for byte on the way:
    `event: T\\ndata: {...}\\n\\n` with T equal to the data's own type."""
    frames = sse.split(b"\n\n")
    assert frames[-1] == b""
    out = []
    for frame in frames[:-1]:
        head, data = frame.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: "), frame
        ev = json.loads(data[6:])
        assert head[7:].decode() == ev["type"]
        out.append(ev)
    return out


def client(handler) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="x", base_url="http://meterline.test", max_retries=0,
                               http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def sse_client(body: bytes) -> anthropic.Anthropic:
    return client(lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body))


def json_client(status: int, body: dict) -> anthropic.Anthropic:
    return client(lambda request: httpx.Response(status, json=body))


def sdk_stream_final(case: str, sse: bytes) -> Message:
    """The anthropic SDK's own MessageStream over the translated bytes, as an app would use it."""
    req = load(case, "request.json")
    with sse_client(sse).messages.stream(model="m", max_tokens=req["max_tokens"], messages=req["messages"]) as s:
        for _ in s:
            pass
        return s.get_final_message()


def test_corpus_has_every_case() -> None:
    assert set(CASES) >= {"text", "multi_turn", "image", "one_tool", "parallel_tools", "tool_result",
                          "json_schema", "thinking", "refusal", "max_tokens", "error", "cache_hits"}


@pytest.mark.parametrize("case", CASES)
def test_request_golden(case: str) -> None:
    doc = load(case, "request.json")
    body, dropped = t.request(doc, doc["model"].split("/", 1)[1])
    want = load(case, "upstream_request.json")
    assert body == want["body"]
    assert dropped == want["dropped"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "error"])
def test_response_golden(case: str) -> None:
    got = t.response(load(case, "upstream.json"))
    assert got == load(case, "expected.json")
    Message.model_validate(got)  # the SDK's own model accepts it


@pytest.mark.parametrize("case", [c for c in CASES if c != "error"])
def test_anthropic_sdk_create_parses_the_translated_json(case: str) -> None:
    req = load(case, "request.json")
    msg = json_client(200, t.response(load(case, "upstream.json"))).messages.create(
        model="m", max_tokens=req["max_tokens"], messages=req["messages"])
    upstream = load(case, "upstream.json")
    message, usage = upstream["choices"][0]["message"], upstream["usage"]
    calls = message.get("tool_calls") or []
    assert [(b.id, b.name, b.input) for b in msg.content if b.type == "tool_use"] == [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert text == (message.get("content") or "") + (message.get("refusal") or "")
    # Usage arithmetic against the upstream's own numbers: Anthropic counts cache reads apart.
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == usage["prompt_tokens"]
    assert msg.usage.cache_read_input_tokens == cached
    assert msg.usage.output_tokens == usage["completion_tokens"]


def test_error_golden() -> None:
    status = int((GOLDEN / "error.upstream.status").read_text())
    got_status, body = t.error(status, load("error", "upstream.json"))
    assert {"status": got_status, "body": body} == load("error", "expected.json")


def test_anthropic_sdk_raises_the_translated_error_status() -> None:
    want = load("error", "expected.json")
    with pytest.raises(anthropic.APIStatusError, match="overloaded") as info:
        json_client(want["status"], want["body"]).messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("case", CASES)
def test_stream_golden_at_fixed_splits(case: str) -> None:
    data, want = raw(case, "upstream.sse"), raw(case, "expected.sse")
    assert translate_stream(data, []) == want
    assert translate_stream(data, [1] * len(data)) == want  # one byte at a time
    for seed in range(3):
        assert translate_stream(data, splits(len(data), seed)) == want
    # CRLF line ends are legal SSE and must give the same output.
    assert translate_stream(data.replace(b"\n", b"\r\n"), splits(len(data), 9)) == want
    events(want)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_stream_same_output_at_random_split_points(case: str, cuts: list[int]) -> None:
    data = raw(case, "upstream.sse")
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [b - a for a, b in zip([0] + points, points)]
    assert translate_stream(data, pieces) == raw(case, "expected.sse")


@pytest.mark.parametrize("case", [c for c in CASES if c != "error"])
def test_stream_events_follow_anthropics_sequence(case: str) -> None:
    evs = events(raw(case, "expected.sse"))
    assert evs[0]["type"] == "message_start" and evs[-1] == {"type": "message_stop"}
    assert evs[-2]["type"] == "message_delta"
    # One block at a time: each start is followed by its deltas and its stop, indexes 0, 1, ...
    open_, seen = None, 0
    for ev in evs[1:-2]:
        if ev["type"] == "content_block_start":
            assert open_ is None and ev["index"] == seen
            open_, seen = ev["index"], seen + 1
        elif ev["type"] == "content_block_delta":
            assert ev["index"] == open_
        else:
            assert ev == {"type": "content_block_stop", "index": open_}
            open_ = None
    assert open_ is None


@pytest.mark.parametrize("case", [c for c in CASES if c != "error"])
def test_sdk_assembled_stream_agrees_with_the_json_translation(case: str) -> None:
    # The stream and the JSON reply of each case carry the same answer; the anthropic SDK's
    # accumulation of the translated stream must equal the translated JSON.
    final = sdk_stream_final(case, raw(case, "expected.sse"))
    want = t.response(load(case, "upstream.json"))
    assert final.stop_reason == want["stop_reason"]
    assert final.id == want["id"] and final.model == want["model"]
    assert [b.model_dump(exclude_none=True) for b in final.content] == want["content"]
    assert final.usage.model_dump(exclude_none=True) == want["usage"]


def test_anthropic_sdk_assembles_the_translated_parallel_tool_stream() -> None:
    data = raw("parallel_tools", "upstream.sse")
    final = sdk_stream_final("parallel_tools", translate_stream(data, splits(len(data), 3)))
    upstream = load("parallel_tools", "upstream.json")["choices"][0]["message"]["tool_calls"]
    assert final.stop_reason == "tool_use"
    assert [(b.id, b.name, b.input) for b in final.content] == [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in upstream]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (120, 61)


def test_anthropic_sdk_raises_on_a_translated_error_event() -> None:
    seen = []
    with pytest.raises(anthropic.APIStatusError, match="server had an error"):
        with sse_client(raw("error", "expected.sse")).messages.stream(
                model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
            for text in s.text_stream:
                seen.append(text)
    assert seen == ["Hel"]


@pytest.mark.parametrize("finish,tools,refusal,want", [
    ("stop", False, False, "end_turn"), ("length", False, False, "max_tokens"),
    ("tool_calls", True, False, "tool_use"), ("function_call", True, False, "tool_use"),
    ("content_filter", False, False, "refusal"), ("stop", True, False, "tool_use"),
    ("stop", False, True, "refusal"), ("brand_new_reason", False, False, "error"),
    ("brand_new_reason", True, False, "error"), (None, False, False, None)])
def test_stop_reason_table(finish, tools, refusal, want) -> None:
    assert t.stop_reason(finish, tools, refusal) == want


def test_unknown_finish_reason_in_a_stream_is_not_end_turn() -> None:
    data = raw("text", "upstream.sse").replace(b'"finish_reason":"stop"', b'"finish_reason":"brand_new_reason"')
    assert events(translate_stream(data, []))[-2]["delta"]["stop_reason"] == "error"
    # The anthropic SDK passes the reason on rather than failing or turning it into end_turn.
    assert sdk_stream_final("text", translate_stream(data, [])).stop_reason == "error"
    doc = load("text", "upstream.json")
    doc["choices"][0]["finish_reason"] = "brand_new_reason"
    assert t.response(doc)["stop_reason"] == "error"


def test_stop_with_tool_calls_is_tool_use_in_streams_too() -> None:
    # Some OpenAI-compatible servers finish a tool-calling turn with "stop".
    data = raw("one_tool", "upstream.sse").replace(b'"finish_reason":"tool_calls"', b'"finish_reason":"stop"')
    assert events(translate_stream(data, []))[-2]["delta"]["stop_reason"] == "tool_use"


def test_usage_with_cache_tokens() -> None:
    # prompt_tokens 2006 includes 1920 cached; Anthropic's input_tokens excludes them.
    want = {"input_tokens": 86, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1920,
            "output_tokens": 4, "output_tokens_details": {"thinking_tokens": 0}}
    assert t.response(load("cache_hits", "upstream.json"))["usage"] == want
    assert events(raw("cache_hits", "expected.sse"))[-2]["usage"] == want


def test_reasoning_tokens_reach_the_client() -> None:
    final = sdk_stream_final("thinking", raw("thinking", "expected.sse"))
    assert final.usage.output_tokens_details.thinking_tokens == 28
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "91 = 7 x 13."


def test_stream_cut_before_finish_reason_ends_in_an_error() -> None:
    data = raw("text", "upstream.sse")
    cut = data[: data.index(b'"finish_reason":"stop"') - 300]
    evs = events(translate_stream(cut, [7] * 400))
    assert evs[-1]["type"] == "error" and evs[-2]["type"] == "content_block_stop"
    assert not any(e["type"] == "message_delta" for e in evs)


def test_stream_cut_after_finish_reason_still_ends_properly() -> None:
    data = raw("text", "upstream.sse")
    cut = data[: data.index(b"data: [DONE]")]  # the usage chunk arrived, [DONE] did not
    evs = events(translate_stream(cut, []))
    assert [e["type"] for e in evs[-2:]] == ["message_delta", "message_stop"]
    assert evs[-2]["usage"]["input_tokens"] == 14


def test_stream_without_usage_chunk_reports_zero_output_not_garbage() -> None:
    data = raw("text", "upstream.sse")
    lines = [f for f in data.split(b"\n\n") if b'"choices":[]' not in f]
    evs = events(translate_stream(b"\n\n".join(lines), []))
    assert evs[-2]["usage"] == {"output_tokens": 0}


def test_ollama_style_parallel_calls_at_one_index_stay_apart() -> None:
    chunks = [{"id": "c", "model": "m", "choices": [{"index": 0, "delta": d, "finish_reason": f}]} for d, f in [
        ({"role": "assistant", "tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"x":1}'}}]}, None),
        ({"tool_calls": [{"index": 0, "id": "b", "function": {"name": "g", "arguments": '{"y":2}'}}]}, None),
        ({}, "tool_calls")]]
    data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    final = sdk_stream_final("text", translate_stream(data, [3] * 200))
    assert [(b.id, b.name, b.input) for b in final.content] == [("a", "f", {"x": 1}), ("b", "g", {"y": 2})]


def test_interleaved_tool_fragments_end_in_an_error_not_a_corrupt_input() -> None:
    chunks = [{"id": "c", "model": "m", "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in [
        {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"x":'}}]},
        {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}]]
    data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    evs = events(translate_stream(data, []))
    assert evs[-1]["type"] == "error" and "after another call" in evs[-1]["error"]["message"]


def test_truncated_tool_arguments_in_json() -> None:
    doc = load("one_tool", "upstream.json")
    doc["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"city":"Pa'
    doc["choices"][0]["finish_reason"] = "length"
    got = t.response(doc)
    assert got["stop_reason"] == "max_tokens" and [b["type"] for b in got["content"]] == ["text"]
    doc["choices"][0]["finish_reason"] = "tool_calls"
    with pytest.raises(TranslateError, match="not a JSON object") as info:
        t.response(doc)
    assert info.value.status == 502


BASE = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("doc,needle", [
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "tool_choice": {"type": "tool", "name": "web_search"}}, "Anthropic tool"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}], "tool_choice": {"type": "any"}}, "Anthropic tool"),
    ({"thinking": {"type": "enabled"}}, "budget_tokens"),
    ({"output_config": {"effort": "ultra"}}, "effort"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "json_schema"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]}, "prefill"),
    ({"messages": [{"role": "user", "content": [{"type": "search_result", "source": "s"}]}]}, "search_result"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "image source"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://x"}}]}]},
     "document"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]}, {"role": "user", "content": "b"}]},
     "server_tool_use"),
    ({"system": [{"type": "image", "source": {}}]}, "system"),
])
def test_refused_with_400(doc, needle) -> None:
    with pytest.raises(TranslateError, match=needle) as info:
        t.request(BASE | doc, "gpt-4o-mini")
    assert info.value.status == 400


def test_dropped_fields_are_named() -> None:
    doc = BASE | {"top_k": 5, "service_tier": "auto", "tool_choice": {"type": "auto"},
                  "thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
                  "output_config": {"task_budget": 3}, "some_future_field": 1}
    body, dropped = t.request(doc, "gpt-4o-mini")
    assert dropped == ["tool_choice", "thinking.display", "output_config.task_budget",
                       "top_k", "service_tier", "some_future_field"]
    assert body["reasoning_effort"] == "low"
    assert not {"tool_choice", "top_k", "service_tier", "some_future_field"} & set(body)


def test_anthropic_tools_and_server_features_are_dropped_and_named() -> None:
    doc = BASE | {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                            {"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
                  "tool_choice": {"type": "any"}, "container": "c_1", "context_management": {"edits": []},
                  "mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}
    body, dropped = t.request(doc, "m")
    assert [tool["function"]["name"] for tool in body["tools"]] == ["f"]
    assert body["tool_choice"] == "required"
    assert dropped == ["tools[web_search_20250305]", "cache_control", "container", "context_management",
                       "mcp_servers"]


def test_long_user_id_is_dropped_not_sent() -> None:
    long_id = "user_" + "a" * 64 + "_account__session_0f0e"
    body, dropped = t.request(BASE | {"metadata": {"user_id": long_id}}, "m")
    assert "user" not in body and dropped == ["metadata.user_id"]
    assert t.request(BASE | {"metadata": {"user_id": "u-1"}}, "m")[0]["user"] == "u-1"


def test_tool_choice_mapping() -> None:
    base = BASE | {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}, "strict": True}]}
    for choice, want in [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
                         ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}})]:
        assert t.request(base | {"tool_choice": choice}, "m")[0]["tool_choice"] == want
    body = t.request(base | {"tool_choice": {"type": "any", "disable_parallel_tool_use": True}}, "m")[0]
    assert body["parallel_tool_calls"] is False
    assert body["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}}, "strict": True}}]


@pytest.mark.parametrize("thinking,config,want", [
    ({"type": "enabled", "budget_tokens": 1024}, {}, "low"),
    ({"type": "enabled", "budget_tokens": 2048}, {}, "medium"),
    ({"type": "enabled", "budget_tokens": 4096}, {}, "high"),
    ({"type": "enabled", "budget_tokens": 31999}, {}, "high"),
    ({"type": "adaptive"}, {"effort": "xhigh"}, "xhigh"),
    ({"type": "adaptive"}, {}, None),
    ({"type": "disabled"}, {}, None),
    (None, {"effort": "max"}, "max")])
def test_reasoning_effort(thinking, config, want) -> None:
    doc = BASE | ({"thinking": thinking} if thinking else {}) | ({"output_config": config} if config else {})
    body, _ = t.request(doc, "m")
    assert body.get("reasoning_effort") == want


def test_image_url_for_an_inline_only_upstream() -> None:
    doc = load("image", "request.json")
    with pytest.raises(TranslateError, match="https://example.com/cat.jpg") as info:
        t.request(doc, "m", inline_images_only=True)
    assert info.value.status == 400
    body, _ = t.request(doc, "m", inline_images_only=True,
                        fetched_images={"https://example.com/cat.jpg": ("image/jpeg", b"\xff\xd8\xff")})
    urls = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    assert urls[1] == "data:image/jpeg;base64,/9j/"
    assert urls[0].startswith("data:image/png;base64,iVBOR")


def test_pdf_document_becomes_a_file_part() -> None:
    doc = BASE | {"messages": [{"role": "user", "content": [
        {"type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
        {"type": "text", "text": "Summarise"}]}]}
    part = t.request(doc, "m")[0]["messages"][0]["content"][0]
    assert part == {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"}}


@pytest.mark.parametrize("status,body,want_status,want_type", [
    (400, {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}},
     400, "invalid_request_error"),
    (401, {"error": {"message": "m", "type": "invalid_request_error", "code": "invalid_api_key"}}, 401, "authentication_error"),
    (403, {"error": {"message": "m", "type": "invalid_request_error"}}, 403, "permission_error"),
    (404, {"error": {"message": "m", "type": "invalid_request_error", "code": "model_not_found"}}, 404, "not_found_error"),
    (429, {"error": {"message": "m", "type": "requests", "code": "rate_limit_exceeded"}}, 429, "rate_limit_error"),
    (429, {"error": {"message": "m", "type": "insufficient_quota", "code": "insufficient_quota"}}, 402, "billing_error"),
    (500, {"error": {"message": "m", "type": "server_error"}}, 500, "api_error"),
    (503, {"error": {"message": "m", "type": "server_error"}}, 529, "overloaded_error"),
    (418, {"error": {"message": "m", "type": "teapot"}}, 418, "invalid_request_error"),
    (502, {"error": {"message": "m"}}, 502, "api_error"),
    (200, {"error": {"message": "m"}}, 502, "api_error")])
def test_error_status(status, body, want_status, want_type) -> None:
    got, out = t.error(status, body)
    assert (got, out) == (want_status, {"type": "error", "error": {"type": want_type, "message": "m"}})


def test_error_not_in_openai_shape_keeps_its_text() -> None:
    got, body = t.error(502, "<html>bad gateway</html>")
    assert got == 502 and body["error"] == {"type": "api_error", "message": "<html>bad gateway</html>"}
