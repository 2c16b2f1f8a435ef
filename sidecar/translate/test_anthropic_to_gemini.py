"""Tests for the Anthropic-client to Gemini-upstream translator, over the golden corpus in
tests/golden/anthropic_to_gemini/, through the anthropic SDK's own client and stream, and with
the google-genai SDK's types checking the Gemini side."""

from __future__ import annotations

import json
import random
from pathlib import Path

import anthropic
import httpx2 as httpx
import pytest
from anthropic.types import Message
from google.genai import types as gtypes
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.translate import anthropic_to_gemini as t
from sidecar.translate.base import TranslateError

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden" / "anthropic_to_gemini"
CASES = sorted(p.name[: -len(".request.json")] for p in GOLDEN.glob("*.request.json"))
OK_CASES = [c for c in CASES if c != "error"]
# The image case's URL image, as the wiring would hand over its fetched bytes.
FETCHED = {"https://example.com/cat.jpg": ("image/jpeg", b"\xff\xd8\xff\xe0")}


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


def upstream_chunks(case: str) -> list:
    return [json.loads(f[6:]) for f in raw(case, "upstream.sse").split(b"\r\n\r\n") if f]


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


def sdk_stream_final(sse: bytes) -> Message:
    """The anthropic SDK's own MessageStream over the translated bytes, as an app would use it."""
    with sse_client(sse).messages.stream(model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
        for _ in s:
            pass
        return s.get_final_message()


def gemini_parts(doc: dict) -> list:
    return doc["candidates"][0].get("content", {}).get("parts", [])


def test_corpus_has_every_case() -> None:
    assert set(CASES) >= {"text", "multi_turn", "image", "one_tool", "parallel_tools", "tool_result",
                          "json_schema", "thinking", "refusal", "max_tokens", "error", "cache_hits"}


# ---------------------------------------------------------------- request

@pytest.mark.parametrize("case", CASES)
def test_request_golden(case: str) -> None:
    doc = load(case, "request.json")
    body, dropped = t.request(doc, doc["model"].split("/", 1)[1], fetched_images=FETCHED)
    want = load(case, "upstream_request.json")
    assert body == want["body"]
    assert dropped == want["dropped"]


def validate_request(body: dict) -> None:
    """The google-genai SDK's own types (extra fields forbidden) accept every piece of a body."""
    assert set(body) <= {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig"}
    for content in body["contents"]:
        gtypes.Content.model_validate(content)
    if "systemInstruction" in body:
        gtypes.Content.model_validate(body["systemInstruction"])
    for tool in body.get("tools", []):
        gtypes.Tool.model_validate(tool)
    if "toolConfig" in body:
        gtypes.ToolConfig.model_validate(body["toolConfig"])
    if "generationConfig" in body:
        gtypes.GenerationConfig.model_validate(body["generationConfig"])


@pytest.mark.parametrize("case", CASES)
def test_translated_request_is_valid_gemini(case: str) -> None:
    validate_request(load(case, "upstream_request.json")["body"])


@pytest.mark.parametrize("case", OK_CASES)
def test_upstream_fixtures_are_valid_gemini(case: str) -> None:
    # The hand-written upstream files are checked against the google-genai SDK's types.
    gtypes.GenerateContentResponse.model_validate(load(case, "upstream.json"))
    for chunk in upstream_chunks(case):
        gtypes.GenerateContentResponse.model_validate(chunk)


@pytest.mark.parametrize("case", OK_CASES)
def test_response_content_goes_back_byte_intact(case: str) -> None:
    # What a client sends back as the assistant turn (the translated content, thinking blocks
    # and their signatures included) must become the parts Gemini sent, in order: Gemini
    # checks thought signatures on the next turn.
    up = load(case, "upstream.json")
    content = t.response(up)["content"]
    if not content:
        return
    doc = {"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": content}, {"role": "user", "content": "r"}]}
    body, dropped = t.request(doc, "gemini-2.5-flash")
    assert body["contents"][1] == {"role": "model", "parts": gemini_parts(up)}
    assert dropped == []


def test_gemini_tool_ids_go_back_and_made_up_ones_do_not() -> None:
    up = load("one_tool", "upstream.json")
    part = gemini_parts(up)[0]
    up_with_id = json.loads(json.dumps(up))
    gemini_parts(up_with_id)[0]["functionCall"]["id"] = "fc-1"
    for doc, want_id in ((up, None), (up_with_id, "fc-1")):
        content = t.response(doc)["content"]
        tool_id = content[-1]["id"]
        assert tool_id == (want_id or "toolu_gemini_AXQuaf7UAs-gnvgP7u2U8AY_0")
        body, _ = t.request({"model": "m", "max_tokens": 9, "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "sunny"}]}]}, "m")
        call, answer = body["contents"][1]["parts"][0], body["contents"][2]["parts"][0]
        assert call["functionCall"].get("id") == want_id and call["thoughtSignature"] == part["thoughtSignature"]
        assert answer["functionResponse"].get("id") == want_id
        assert answer["functionResponse"]["name"] == "get_weather"


# ---------------------------------------------------------------- JSON response

@pytest.mark.parametrize("case", OK_CASES)
def test_response_golden(case: str) -> None:
    got = t.response(load(case, "upstream.json"))
    assert got == load(case, "expected.json")
    Message.model_validate(got)  # the SDK's own model accepts it


@pytest.mark.parametrize("case", OK_CASES)
def test_anthropic_sdk_create_parses_the_translated_json(case: str) -> None:
    up = load(case, "upstream.json")
    msg = json_client(200, t.response(up)).messages.create(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    parts = gemini_parts(up)
    assert [(b.name, b.input) for b in msg.content if b.type == "tool_use"] == [
        (p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts if "functionCall" in p]
    assert "".join(b.text for b in msg.content if b.type == "text") == "".join(
        p["text"] for p in parts if "text" in p and not p.get("thought"))
    assert [b.signature for b in msg.content if b.type == "thinking" and b.signature] == [
        p["thoughtSignature"] for p in parts if "thoughtSignature" in p]
    # Usage arithmetic against the upstream's own numbers: Anthropic counts cache reads apart,
    # and Gemini's billable output is candidates plus thoughts.
    meta = up["usageMetadata"]
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == meta["promptTokenCount"]
    assert msg.usage.cache_read_input_tokens == meta.get("cachedContentTokenCount", 0)
    assert msg.usage.output_tokens == meta.get("candidatesTokenCount", 0) + meta.get("thoughtsTokenCount", 0)


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


# ---------------------------------------------------------------- streams

@pytest.mark.parametrize("case", CASES)
def test_stream_golden_at_fixed_splits(case: str) -> None:
    data, want = raw(case, "upstream.sse"), raw(case, "expected.sse")
    assert translate_stream(data, []) == want
    assert translate_stream(data, [1] * len(data)) == want  # one byte at a time
    for seed in range(3):
        assert translate_stream(data, splits(len(data), seed)) == want
    # LF line ends are legal SSE too (Gemini sends CRLF) and must give the same output.
    assert translate_stream(data.replace(b"\r\n", b"\n"), splits(len(data), 9)) == want
    events(want)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_stream_same_output_at_random_split_points(case: str, cuts: list[int]) -> None:
    data = raw(case, "upstream.sse")
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [b - a for a, b in zip([0] + points, points)]
    assert translate_stream(data, pieces) == raw(case, "expected.sse")


@pytest.mark.parametrize("case", OK_CASES)
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


@pytest.mark.parametrize("case", OK_CASES)
def test_sdk_assembled_stream_agrees_with_the_json_translation(case: str) -> None:
    # The stream and the JSON reply of each case carry the same answer; the anthropic SDK's
    # accumulation of the translated stream must equal the translated JSON.
    final = sdk_stream_final(raw(case, "expected.sse"))
    want = t.response(load(case, "upstream.json"))
    assert final.stop_reason == want["stop_reason"]
    assert final.id == want["id"] and final.model == want["model"]
    assert [b.model_dump(exclude_none=True) for b in final.content] == want["content"]
    assert final.usage.model_dump(exclude_none=True) == want["usage"]


def test_anthropic_sdk_assembles_the_translated_parallel_tool_stream() -> None:
    data = raw("parallel_tools", "upstream.sse")
    final = sdk_stream_final(translate_stream(data, splits(len(data), 3)))
    calls = [p["functionCall"] for p in gemini_parts(load("parallel_tools", "upstream.json")) if "functionCall" in p]
    assert final.stop_reason == "tool_use"  # Gemini said STOP
    tools = [b for b in final.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in tools] == [(c["name"], c["args"]) for c in calls]
    assert len({b.id for b in tools}) == 4
    assert (final.usage.input_tokens, final.usage.output_tokens) == (120, 61 + 88)


def test_anthropic_sdk_raises_on_a_translated_error_event() -> None:
    seen = []
    with pytest.raises(anthropic.APIStatusError, match="internal error"):
        with sse_client(raw("error", "expected.sse")).messages.stream(
                model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
            for text in s.text_stream:
                seen.append(text)
    assert seen == ["Hel"]


# ---------------------------------------------------------------- stop reasons

def test_every_gemini_finish_reason_is_in_the_table() -> None:
    # The google-genai SDK's enum is the list of documented values; none may fall to the default.
    assert {r.value for r in gtypes.FinishReason} <= set(t.STOP_REASONS)
    assert "end_turn" not in {t.STOP_REASONS[r] for r in t.STOP_REASONS if r != "STOP"}


@pytest.mark.parametrize("finish,tools,want", [
    ("STOP", False, "end_turn"), ("STOP", True, "tool_use"), ("MAX_TOKENS", False, "max_tokens"),
    ("MAX_TOKENS", True, "max_tokens"), ("SAFETY", False, "refusal"), ("RECITATION", False, "refusal"),
    ("PROHIBITED_CONTENT", False, "refusal"), ("SPII", False, "refusal"), ("BLOCKLIST", False, "refusal"),
    ("MALFORMED_FUNCTION_CALL", False, "error"), ("MISSING_THOUGHT_SIGNATURE", False, "error"),
    ("OTHER", False, "error"), ("FINISH_REASON_UNSPECIFIED", False, "error"),
    ("BRAND_NEW_REASON", False, "error"), ("BRAND_NEW_REASON", True, "error"), (None, False, None)])
def test_stop_reason_table(finish, tools, want) -> None:
    assert t.stop_reason(finish, tools) == want


def test_unknown_finish_reason_in_a_stream_is_not_end_turn() -> None:
    data = raw("text", "upstream.sse").replace(b'"finishReason": "STOP"', b'"finishReason": "BRAND_NEW_REASON"')
    assert events(translate_stream(data, []))[-2]["delta"]["stop_reason"] == "error"
    # The anthropic SDK passes the reason on rather than failing or turning it into end_turn.
    assert sdk_stream_final(translate_stream(data, [])).stop_reason == "error"
    doc = load("text", "upstream.json")
    doc["candidates"][0]["finishReason"] = "BRAND_NEW_REASON"
    assert t.response(doc)["stop_reason"] == "error"


def test_blocked_prompt_is_a_refusal() -> None:
    doc = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
           "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}, "modelVersion": "gemini-2.5-flash",
           "responseId": "r1"}
    gtypes.GenerateContentResponse.model_validate(doc)
    got = t.response(doc)
    assert got["content"] == [] and got["stop_reason"] == "refusal" and got["usage"]["input_tokens"] == 9
    data = b"data: " + json.dumps(doc).encode() + b"\r\n\r\n"
    final = sdk_stream_final(translate_stream(data, [5] * 40))
    assert final.stop_reason == "refusal" and final.content == []
    with pytest.raises(TranslateError, match="no candidates"):
        t.response({"usageMetadata": {}})


# ---------------------------------------------------------------- usage

def test_usage_with_cache_tokens() -> None:
    # promptTokenCount 2006 includes 1920 cached; Anthropic's input_tokens excludes them.
    want = {"input_tokens": 86, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1920,
            "output_tokens": 4, "output_tokens_details": {"thinking_tokens": 0}}
    assert t.response(load("cache_hits", "upstream.json"))["usage"] == want
    assert events(raw("cache_hits", "expected.sse"))[-2]["usage"] == want
    start = events(raw("cache_hits", "expected.sse"))[0]["message"]["usage"]
    assert (start["input_tokens"], start["cache_read_input_tokens"]) == (86, 1920)


def test_tool_use_prompt_tokens_are_input() -> None:
    meta = {"promptTokenCount": 10, "toolUsePromptTokenCount": 5, "candidatesTokenCount": 3}
    assert t.usage(meta) == {"input_tokens": 15, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0, "output_tokens": 3}


def test_reasoning_tokens_and_thoughts_reach_the_client() -> None:
    final = sdk_stream_final(raw("thinking", "expected.sse"))
    assert final.usage.output_tokens_details.thinking_tokens == 28
    assert final.usage.output_tokens == 9 + 28
    assert [b.type for b in final.content] == ["thinking", "text", "thinking"]
    assert final.content[0].thinking.endswith("91 = 7 x 13.")
    assert final.content[2].signature == gemini_parts(load("thinking", "upstream.json"))[2]["thoughtSignature"]


# ---------------------------------------------------------------- broken streams

def test_stream_cut_before_finish_reason_ends_in_an_error() -> None:
    data = raw("text", "upstream.sse")
    cut = data[: data.index(b'"finishReason"') - 20]
    evs = events(translate_stream(cut, [7] * 400))
    assert evs[-1]["type"] == "error" and evs[-2]["type"] == "content_block_stop"
    assert not any(e["type"] == "message_delta" for e in evs)


def test_stream_whose_last_event_lacks_its_blank_line_still_ends_properly() -> None:
    data = raw("text", "upstream.sse").rstrip(b"\r\n")
    evs = events(translate_stream(data, [11] * 200))
    assert [e["type"] for e in evs[-2:]] == ["message_delta", "message_stop"]
    assert evs[-2]["usage"]["output_tokens"] == 24


def test_stream_without_usage_reports_zero_output_not_garbage() -> None:
    chunks = [c | {"usageMetadata": None} for c in upstream_chunks("text")]
    data = b"".join(b"data: " + json.dumps({k: v for k, v in c.items() if v is not None}).encode() + b"\r\n\r\n"
                    for c in chunks)
    assert events(translate_stream(data, []))[-2]["usage"] == {"output_tokens": 0}


def test_a_part_with_no_anthropic_block_fails_loudly() -> None:
    part = {"inlineData": {"mimeType": "image/png", "data": "iVBO"}}
    doc = load("text", "upstream.json")
    doc["candidates"][0]["content"]["parts"].append(part)
    with pytest.raises(TranslateError, match="inlineData") as info:
        t.response(doc)
    assert info.value.status == 502
    chunk = upstream_chunks("text")[0]
    chunk["candidates"][0]["content"]["parts"] = [part]
    evs = events(translate_stream(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n", []))
    assert evs[-1]["type"] == "error" and "inlineData" in evs[-1]["error"]["message"]


def test_text_after_a_signature_opens_a_new_block() -> None:
    # A signature on a text part mid-answer: the signature-only thinking block sits before that
    # part's text, so sending the blocks back puts it on the same part.
    rid, meta = "r2", {"promptTokenCount": 3, "candidatesTokenCount": 4}
    chunks = [{"candidates": [{"content": {"parts": [p], "role": "model"}, "index": 0} | f], "usageMetadata": meta,
               "responseId": rid} for p, f in [({"text": "Hel"}, {}), ({"text": "lo", "thoughtSignature": "QUJD"}, {}),
                                               ({"text": "!"}, {"finishReason": "STOP"})]]
    data = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks)
    final = sdk_stream_final(translate_stream(data, [4] * 200))
    blocks = [b.model_dump(exclude_none=True) for b in final.content]
    assert blocks == [{"type": "text", "text": "Hel"}, {"type": "thinking", "thinking": "", "signature": "QUJD"},
                      {"type": "text", "text": "lo!"}]
    body, _ = t.request({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": blocks}, {"role": "user", "content": "r"}]}, "m")
    assert body["contents"][1]["parts"] == [{"text": "Hel"}, {"text": "lo!", "thoughtSignature": "QUJD"}]


# ---------------------------------------------------------------- request mapping

BASE = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("doc,needle", [
    ({"stop_sequences": ["a", "b", "c", "d", "e", "f"]}, "at most 5"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "tool_choice": {"type": "tool", "name": "web_search"}}, "Anthropic tool"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}], "tool_choice": {"type": "any"}}, "Anthropic tool"),
    ({"thinking": {"type": "enabled"}}, "budget_tokens"),
    ({"thinking": {"type": "sometimes"}}, "thinking type"),
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
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
     "answers no tool_use"),
    ({"system": [{"type": "image", "source": {}}]}, "system"),
])
def test_refused_with_400(doc, needle) -> None:
    with pytest.raises(TranslateError, match=needle) as info:
        t.request(BASE | doc, "gemini-2.5-flash")
    assert info.value.status == 400


def test_dropped_fields_are_named() -> None:
    doc = BASE | {"service_tier": "auto", "tool_choice": {"type": "auto"}, "metadata": {"user_id": "u"},
                  "thinking": {"type": "enabled", "budget_tokens": 1024},
                  "output_config": {"task_budget": 3}, "some_future_field": 1}
    body, dropped = t.request(doc, "gemini-2.5-flash")
    assert dropped == ["tool_choice", "output_config.task_budget", "metadata.user_id", "service_tier",
                       "some_future_field"]
    assert body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}
    assert set(body) == {"contents", "generationConfig"}


def test_anthropic_tools_and_server_features_are_dropped_and_named() -> None:
    doc = BASE | {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                            {"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"},
                             "strict": True}],
                  "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, "container": "c_1",
                  "context_management": {"edits": []}, "mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}
    body, dropped = t.request(doc, "m")
    assert body["tools"] == [{"functionDeclarations": [{"name": "f", "parametersJsonSchema": {"type": "object"}}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert dropped == ["tools[web_search_20250305]", "cache_control", "tools[].strict",
                       "tool_choice.disable_parallel_tool_use", "container", "context_management", "mcp_servers"]
    validate_request(body)


def test_tool_choice_mapping() -> None:
    base = BASE | {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]}
    for choice, want in [({"type": "auto"}, {"mode": "AUTO"}), ({"type": "any"}, {"mode": "ANY"}),
                         ({"type": "none"}, {"mode": "NONE"}),
                         ({"type": "tool", "name": "f"}, {"mode": "ANY", "allowedFunctionNames": ["f"]})]:
        body = t.request(base | {"tool_choice": choice}, "m")[0]
        assert body["toolConfig"] == {"functionCallingConfig": want}
        validate_request(body)


@pytest.mark.parametrize("model,thinking,config,want", [
    ("gemini-2.5-flash", {"type": "enabled", "budget_tokens": 31999}, {}, {"thinkingBudget": 31999, "includeThoughts": True}),
    ("gemini-3-pro-preview", {"type": "enabled", "budget_tokens": 4096}, {}, {"thinkingBudget": 4096, "includeThoughts": True}),
    ("gemini-2.5-flash", {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}, {},
     {"thinkingBudget": 1024, "includeThoughts": False}),
    ("gemini-3-pro-preview", {"type": "adaptive"}, {"effort": "low"}, {"thinkingLevel": "LOW", "includeThoughts": True}),
    ("gemini-3-flash-preview", None, {"effort": "medium"}, {"thinkingLevel": "MEDIUM", "includeThoughts": True}),
    ("gemini-3-pro-preview", None, {"effort": "max"}, {"thinkingLevel": "HIGH", "includeThoughts": True}),
    ("gemini-2.5-pro", {"type": "enabled", "budget_tokens": 2048}, {"effort": "high"},
     {"thinkingBudget": 24576, "includeThoughts": True}),
    ("gemini-2.5-flash", {"type": "adaptive"}, {}, {"includeThoughts": True}),
    ("gemini-2.5-flash", {"type": "disabled"}, {}, None),
    ("gemini-2.5-flash", None, {}, None)])
def test_thinking_config(model, thinking, config, want) -> None:
    doc = BASE | ({"thinking": thinking} if thinking else {}) | ({"output_config": config} if config else {})
    body, dropped = t.request(doc, model)
    assert body.get("generationConfig", {}).get("thinkingConfig") == want
    assert dropped == []
    validate_request(body)


def test_image_url_needs_its_fetched_bytes() -> None:
    doc = load("image", "request.json")
    with pytest.raises(TranslateError, match="https://example.com/cat.jpg") as info:
        t.request(doc, "m")
    assert info.value.status == 400
    parts = t.request(doc, "m", fetched_images=FETCHED)[0]["contents"][0]["parts"]
    assert parts[1] == {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4A=="}}
    assert parts[0]["inlineData"]["data"].startswith("iVBOR")


def test_pdf_document_and_tool_result_images() -> None:
    doc = BASE | {"messages": [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "shot", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [
                {"type": "text", "text": "done"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
            {"type": "text", "text": "Summarise"}]}]}
    body = t.request(doc, "m")[0]
    validate_request(body)
    assert body["contents"][1]["parts"] == [{"functionCall": {"id": "toolu_01", "name": "shot", "args": {}}}]
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"id": "toolu_01", "name": "shot", "response": {"output": "done"}}},
        {"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}},
        {"text": "Summarise"}]


def test_redacted_thinking_is_dropped_and_named() -> None:
    doc = BASE | {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "redacted_thinking", "data": "EmwKAhgB"}, {"type": "text", "text": "b"}]}, {"role": "user", "content": "c"}]}
    body, dropped = t.request(doc, "m")
    assert body["contents"][1]["parts"] == [{"text": "b"}] and dropped == ["redacted_thinking"]


def test_json_schema_output() -> None:
    body = t.request(load("json_schema", "request.json"), "m")[0]
    schema = load("json_schema", "request.json")["output_config"]["format"]["schema"]
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert body["generationConfig"]["responseJsonSchema"] == schema


def test_path() -> None:
    assert t.path("gemini-2.5-flash", True) == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert t.path("gemini-2.5-flash", False) == "/v1beta/models/gemini-2.5-flash:generateContent"


# ---------------------------------------------------------------- errors

BAD_KEY = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
                     "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                                  "domain": "googleapis.com"}]}}


@pytest.mark.parametrize("status,body,want_status,want_type", [
    (400, {"error": {"code": 400, "message": "m", "status": "INVALID_ARGUMENT"}}, 400, "invalid_request_error"),
    (400, {"error": {"code": 400, "message": "m", "status": "FAILED_PRECONDITION"}}, 400, "invalid_request_error"),
    (400, BAD_KEY, 401, "authentication_error"),
    (403, {"error": {"code": 403, "message": "m", "status": "PERMISSION_DENIED"}}, 403, "permission_error"),
    (404, {"error": {"code": 404, "message": "m", "status": "NOT_FOUND"}}, 404, "not_found_error"),
    (429, {"error": {"code": 429, "message": "m", "status": "RESOURCE_EXHAUSTED"}}, 429, "rate_limit_error"),
    (500, {"error": {"code": 500, "message": "m", "status": "INTERNAL"}}, 500, "api_error"),
    (503, {"error": {"code": 503, "message": "m", "status": "UNAVAILABLE"}}, 529, "overloaded_error"),
    (504, {"error": {"code": 504, "message": "m", "status": "DEADLINE_EXCEEDED"}}, 504, "timeout_error"),
    (418, {"error": {"code": 418, "message": "m"}}, 418, "invalid_request_error"),
    (502, {"error": {"message": "m"}}, 502, "api_error"),
    (200, {"error": {"message": "m"}}, 502, "api_error"),
    (429, [{"error": {"code": 429, "message": "m", "status": "RESOURCE_EXHAUSTED"}}], 429, "rate_limit_error")])
def test_error_status(status, body, want_status, want_type) -> None:
    got, out = t.error(status, body)
    want_message = BAD_KEY["error"]["message"] if body is BAD_KEY else "m"
    assert (got, out) == (want_status, {"type": "error", "error": {"type": want_type, "message": want_message}})


def test_error_not_in_gemini_shape_keeps_its_text() -> None:
    got, body = t.error(502, "<html>bad gateway</html>")
    assert got == 502 and body["error"] == {"type": "api_error", "message": "<html>bad gateway</html>"}


@pytest.mark.parametrize("status,want", [("RESOURCE_EXHAUSTED", "rate_limit_error"), ("UNAVAILABLE", "overloaded_error"),
                                         ("PERMISSION_DENIED", "permission_error"), ("SOMETHING_NEW", "api_error")])
def test_stream_error_types(status, want) -> None:
    data = b'data: {"error": {"code": 1, "message": "m", "status": "' + status.encode() + b'"}}\r\n\r\n'
    assert events(translate_stream(data, []))[-1] == {"type": "error", "error": {"type": want, "message": "m"}}
