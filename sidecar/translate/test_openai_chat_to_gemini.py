"""Tests for the OpenAI-chat-client to Gemini-upstream translator, over the golden corpus in
tests/golden/openai_chat_to_gemini/ and through the openai SDK's own stream classes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.translate import openai_chat_to_gemini as t
from sidecar.translate.base import SseData, TranslateError

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden" / "openai_chat_to_gemini"
CASES = sorted(p.name[: -len(".request.json")] for p in GOLDEN.glob("*.request.json"))
CREATED = 1764633600
MODEL = "gemini-2.5-flash"


def load(case: str, suffix: str):
    return json.loads((GOLDEN / f"{case}.{suffix}").read_text())


def raw_sse(case: str) -> bytes:
    return (GOLDEN / f"{case}.upstream.sse").read_bytes()


def want_sse(case: str) -> bytes:
    return (GOLDEN / f"{case}.expected.sse").read_bytes()


def include_usage(case: str) -> bool:
    return bool((load(case, "request.json").get("stream_options") or {}).get("include_usage"))


def fetched(case: str) -> dict | None:
    path = GOLDEN / f"{case}.fetched.json"
    if not path.exists():
        return None
    return {url: (mime, base64.b64decode(data)) for url, (mime, data) in json.loads(path.read_text()).items()}


def translate_stream(raw: bytes, pieces: list[int], usage: bool = True) -> bytes:
    st_ = t.StreamTranslator(CREATED, usage)
    out, at = [], 0
    for size in pieces:
        out.append(st_.feed(raw[at:at + size]))
        at += size
    out.append(st_.feed(raw[at:]))
    return b"".join(out) + st_.finish()


def chunks(sse: bytes) -> list:
    """The data: payloads of a client stream, checking its framing byte for byte on the way."""
    assert sse.endswith(b"data: [DONE]\n\n")
    frames = sse.split(b"\n\n")
    assert frames[-1] == b""
    out = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        if frame != b"data: [DONE]":
            out.append(json.loads(frame[6:]))
    return out


def sdk_stream(sse: bytes) -> openai.Stream:
    client = openai.OpenAI(api_key="x", base_url="http://localhost/v1")
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse,
                              request=httpx.Request("POST", "http://localhost/v1/chat/completions"))
    return openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client)


def sdk_snapshot(sse: bytes):
    state = ChatCompletionStreamState()
    for chunk in sdk_stream(sse):
        state.handle_chunk(chunk)
    # The snapshot, not get_final_completion(): the SDK's parse helper raises on "length" and
    # "content_filter" by design (LengthFinishReasonError, ContentFilterFinishReasonError).
    return state.current_completion_snapshot


def upstream_calls(case: str) -> list:
    parts = load(case, "upstream.json")["candidates"][0]["content"]["parts"]
    return [p["functionCall"] for p in parts if "functionCall" in p]


def test_corpus_has_every_case() -> None:
    assert set(CASES) >= {"text", "multi_turn", "image", "one_tool", "parallel_tools", "tool_result",
                          "json_schema", "thinking", "refusal", "max_tokens", "error", "cache_hits"}


# ---------------------------------------------------------------- golden

@pytest.mark.parametrize("case", CASES)
def test_request_golden(case: str) -> None:
    doc = load(case, "request.json")
    body, dropped = t.request(doc, MODEL, fetched(case))
    want = load(case, "upstream_request.json")
    assert body == want["body"]
    assert dropped == want["dropped"]
    assert t.upstream_path(MODEL, bool(doc.get("stream"))) == want["path"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "error"])
def test_response_golden(case: str) -> None:
    got = t.response(load(case, "upstream.json"), CREATED)
    assert got == load(case, "expected.json")
    ChatCompletion.model_validate(got)  # the SDK's own model accepts it


def test_error_golden() -> None:
    status = int((GOLDEN / "error.upstream.status").read_text())
    got_status, body = t.error(status, load("error", "upstream.json"))
    assert {"status": got_status, "body": body} == load("error", "expected.json")


@pytest.mark.parametrize("case", CASES)
def test_stream_golden_whole_bytewise_and_lf(case: str) -> None:
    raw, want, usage = raw_sse(case), want_sse(case), include_usage(case)
    assert translate_stream(raw, [], usage) == want
    assert translate_stream(raw, [1] * len(raw), usage) == want  # one byte at a time
    # Gemini frames events with CRLF; LF line ends are legal SSE too and must give the same output.
    assert b"\r\n\r\n" in raw
    assert translate_stream(raw.replace(b"\r\n", b"\n"), [3] * len(raw), usage) == want
    chunks(want)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(CASES), pieces=st.lists(st.integers(1, 80), max_size=60))
def test_stream_golden_at_random_splits(case: str, pieces: list[int]) -> None:
    assert translate_stream(raw_sse(case), pieces, include_usage(case)) == want_sse(case)


# ---------------------------------------------------------------- google-genai's own types

# The REST fields of a GenerateContentRequest (ai.google.dev/api/generate-content).
_REQUEST_FIELDS = {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig",
                   "safetySettings", "cachedContent"}


def _gemini_types():
    # google-genai's pydantic models forbid unknown fields and take the REST camelCase names,
    # so they catch a misspelt or misplaced field in the corpus or in our requests.
    from google.genai import types
    return types


@pytest.mark.parametrize("case", CASES)
def test_upstream_files_parse_as_google_genai_responses(case: str) -> None:
    types = _gemini_types()
    events = [json.loads(d) for d in SseData().feed(raw_sse(case))]
    assert events
    for ev in events if case != "error" else events[:-1]:
        types.GenerateContentResponse.model_validate(ev)
    if case != "error":
        types.GenerateContentResponse.model_validate(load(case, "upstream.json"))


@pytest.mark.parametrize("case", CASES)
def test_translated_requests_fit_google_genai_types(case: str) -> None:
    types = _gemini_types()
    body = load(case, "upstream_request.json")["body"]
    assert set(body) <= _REQUEST_FIELDS
    for content in body["contents"]:
        assert content["role"] in ("user", "model")
        types.Content.model_validate(content)
    if "systemInstruction" in body:
        types.Content.model_validate(body["systemInstruction"])
    for tool in body.get("tools", []):
        types.Tool.model_validate(tool)
    if "toolConfig" in body:
        types.ToolConfig.model_validate(body["toolConfig"])
    if "generationConfig" in body:
        types.GenerationConfig.model_validate(body["generationConfig"])


# ---------------------------------------------------------------- independent checks

def test_stream_first_chunk_is_assistant_role_and_ids_are_stable() -> None:
    out = chunks(want_sse("text"))
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in out} == {load("text", "upstream.json")["responseId"]}
    assert {c["created"] for c in out} == {CREATED}
    assert {c["model"] for c in out} == {"gemini-2.5-flash"}


@pytest.mark.parametrize("case", ["one_tool", "parallel_tools"])
def test_tool_argument_fragments_reassemble_to_upstream_args(case: str) -> None:
    calls: dict = {}
    for c in chunks(want_sse(case)):
        for choice in c["choices"]:
            for tc in choice["delta"].get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                if "id" in tc:
                    assert slot["id"] is None, "id sent twice"
                    slot["id"], slot["name"] = tc["id"], tc["function"]["name"]
                slot["arguments"] += tc["function"]["arguments"]
    upstream = upstream_calls(case)
    assert sorted(calls) == list(range(len(upstream)))
    for i, call in enumerate(upstream):
        assert calls[i]["name"] == call["name"]
        assert json.loads(calls[i]["arguments"]) == call.get("args", {})
        assert calls[i]["id"] == call.get("id", f"call_{load(case, 'upstream.json')['responseId']}_{i}")


def test_stream_and_json_give_the_same_tool_call_ids() -> None:
    # A client may answer a streamed call or a JSON one: both must name it the same way.
    for case in ("one_tool", "parallel_tools"):
        json_ids = [c["id"] for c in t.response(load(case, "upstream.json"), CREATED)
                    ["choices"][0]["message"]["tool_calls"]]
        stream_ids = [tc["id"] for c in chunks(want_sse(case)) for ch in c["choices"]
                      for tc in ch["delta"].get("tool_calls") or [] if "id" in tc]
        assert json_ids == stream_ids


@pytest.mark.parametrize("reason,tools,want", [
    ("STOP", False, "stop"), ("STOP", True, "tool_calls"), ("MAX_TOKENS", True, "length"),
    ("SAFETY", False, "content_filter"), ("RECITATION", False, "content_filter"),
    ("PROHIBITED_CONTENT", False, "content_filter"), ("SPII", False, "content_filter"),
    ("BLOCKLIST", False, "content_filter"), ("MALFORMED_FUNCTION_CALL", False, "error"),
    ("OTHER", False, "error"), ("FINISH_REASON_UNSPECIFIED", False, "error"),
    ("BRAND_NEW_REASON", False, "error"), ("BRAND_NEW_REASON", True, "error"), (None, False, None)])
def test_stop_reason_table(reason, tools, want) -> None:
    assert t.finish_reason(reason, tools) == want
    case = "one_tool" if tools else "text"
    doc = load(case, "upstream.json")
    doc["candidates"][0]["finishReason"] = reason
    assert t.response(doc, CREATED)["choices"][0]["finish_reason"] == want


def test_every_documented_finish_reason_is_in_the_table() -> None:
    # google-genai's FinishReason enum is Gemini's documented list; none may fall to the default.
    from google.genai.types import FinishReason
    assert {r.value for r in FinishReason} - set(t.STOP_REASONS) == set()
    assert "stop" not in {v for k, v in t.STOP_REASONS.items() if k != "STOP"}


def test_unknown_stop_reason_in_a_stream_is_not_stop() -> None:
    raw = raw_sse("text").replace(b'"STOP"', b'"BRAND_NEW_REASON"')
    finishes = [c["choices"][0]["finish_reason"] for c in chunks(translate_stream(raw, [], False))
                if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["error"]


def test_blocked_prompt_is_content_filter_in_json_and_stream() -> None:
    blocked = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
               "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
               "modelVersion": MODEL, "responseId": "blk"}
    got = t.response(blocked, CREATED)
    assert got["choices"][0]["finish_reason"] == "content_filter"
    assert got["choices"][0]["message"]["content"] is None
    out = chunks(translate_stream(f"data: {json.dumps(blocked)}\r\n\r\n".encode(), [], True))
    assert [c["choices"][0]["finish_reason"] for c in out if c["choices"]] == [None, "content_filter"]
    assert out[-1]["usage"]["prompt_tokens"] == 7


def test_usage_with_cache_and_thought_tokens() -> None:
    # promptTokenCount 1709 already includes the 1500 cached tokens, as prompt_tokens does.
    want = {"prompt_tokens": 1709, "completion_tokens": 5, "total_tokens": 1714,
            "prompt_tokens_details": {"cached_tokens": 1500}}
    assert t.response(load("cache_hits", "upstream.json"), CREATED)["usage"] == want
    last = chunks(want_sse("cache_hits"))[-1]
    assert last["choices"] == [] and last["usage"] == want
    # Thoughts are reported beside candidates; OpenAI counts reasoning inside completion_tokens.
    meta = load("thinking", "upstream.json")["usageMetadata"]
    u = t.response(load("thinking", "upstream.json"), CREATED)["usage"]
    assert u["completion_tokens"] == meta["candidatesTokenCount"] + meta["thoughtsTokenCount"]
    assert u["completion_tokens_details"] == {"reasoning_tokens": meta["thoughtsTokenCount"]}
    assert u["total_tokens"] == meta["totalTokenCount"]
    # Tool-use prompt tokens are input, as the metering adapter counts them.
    assert t.usage({"promptTokenCount": 10, "toolUsePromptTokenCount": 4})["prompt_tokens"] == 14


def test_stream_usage_is_the_last_usage_metadata_and_omitted_without_include_usage() -> None:
    raw = raw_sse("thinking")  # its events carry growing thoughtsTokenCount: 120, then 211
    last = chunks(translate_stream(raw, [], True))[-1]
    assert last["usage"]["completion_tokens_details"] == {"reasoning_tokens": 211}
    assert all("usage" not in c for c in chunks(translate_stream(raw, [], False)))
    # A final event with usage only (no candidates) still counts.
    tail = b'data: {"usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 9, "totalTokenCount": 49}}\r\n\r\n'
    assert chunks(translate_stream(raw + tail, [], True))[-1]["usage"]["completion_tokens"] == 9


def test_stream_cut_before_finish_reason_ends_in_an_error() -> None:
    raw = raw_sse("text")
    cut = raw[: raw.index(b'"finishReason"') - 200]
    out = chunks(translate_stream(cut, [7] * 50, True))
    assert out[-1]["error"]["code"] == "incomplete_stream"
    assert all("usage" not in c for c in out)


def test_sse_reader_keeps_multiline_data_and_skips_comments() -> None:
    reader = SseData()
    assert reader.feed(b": keep-alive\r\n\r\ndata: {\"a\":\r\ndata: 1}\r\n") == []
    assert reader.feed(b"\r\n") == [b'{"a":\n1}']


# ---------------------------------------------------------------- the openai SDK parses it

def test_openai_sdk_assembles_the_translated_parallel_tool_stream() -> None:
    raw = raw_sse("parallel_tools")
    final = sdk_snapshot(translate_stream(raw, [11] * 200, True))
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        (c["id"], c["name"], c["args"]) for c in upstream_calls("parallel_tools")]
    assert final.usage.prompt_tokens == 410 and final.usage.completion_tokens == 90
    assert final.usage.completion_tokens_details.reasoning_tokens == 50


def test_openai_sdk_raises_on_a_translated_error_event() -> None:
    seen = []
    with pytest.raises(openai.APIError, match="overloaded"):
        for chunk in sdk_stream(want_sse("error")):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "Hel"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "error"])
def test_sdk_assembled_stream_agrees_with_the_json_translation(case: str) -> None:
    # The stream and the JSON reply of each case carry the same answer; the openai SDK's
    # accumulation of the translated stream must equal the translated JSON. (A SAFETY stop keeps
    # the text streamed before it; Gemini's JSON reply to a blocked answer has no content.)
    final = sdk_snapshot(want_sse(case))
    want = t.response(load(case, "upstream.json"), CREATED)
    got, expect = final.choices[0], want["choices"][0]
    assert got.finish_reason == expect["finish_reason"]
    if case != "refusal":
        assert (got.message.content or None) == expect["message"]["content"]
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in got.message.tool_calls or []] == [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in expect["message"].get("tool_calls", [])]
    if include_usage(case):
        assert final.usage.model_dump(exclude_none=True) == want["usage"]


def test_thought_signatures_survive_the_round_trip_byte_intact() -> None:
    # Gemini's signature on a function call goes to the client on the tool call and, when the
    # client sends the history back, onto the same functionCall part, unchanged.
    reply = t.response(load("one_tool", "upstream.json"), CREATED)
    message = reply["choices"][0]["message"]
    # Through the SDK's own model, as an app would hold it, and back to a dict.
    parsed = ChatCompletion.model_validate(reply).choices[0].message.model_dump(exclude_none=True)
    for msg in (message, parsed):
        history = [{"role": "user", "content": "Weather in Paris?"}, msg,
                   {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "18C"}]
        body, _ = t.request({"messages": history, "tools": load("one_tool", "request.json")["tools"]}, MODEL)
        sent = body["contents"][1]["parts"]
        upstream = load("one_tool", "upstream.json")["candidates"][0]["content"]["parts"]
        assert sent == [{"text": "Let me check."},
                        {"functionCall": {"id": message["tool_calls"][0]["id"], **upstream[1]["functionCall"]},
                         "thoughtSignature": upstream[1]["thoughtSignature"]}]
        assert body["contents"][2]["parts"][0]["functionResponse"]["name"] == "get_weather"
    # And through a stream the SDK assembled: the signature rides on the tool-call delta.
    final = sdk_snapshot(want_sse("one_tool"))
    call = final.choices[0].message.tool_calls[0].model_dump()
    assert call["extra_content"] == {"google": {"thought_signature": upstream[1]["thoughtSignature"]}}


def test_a_second_text_signature_is_not_glued_to_the_first() -> None:
    # The SDK joins string deltas of one field; two signatures must not become one broken string.
    parts = [{"text": "Thinking", "thought": True, "thoughtSignature": "SIGA"},
             {"text": "Answer", "thoughtSignature": "SIGB"}]
    doc = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}],
           "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
           "modelVersion": MODEL, "responseId": "r"}
    want = {"google": {"thought_signature": "SIGA"}}
    assert t.response(doc, CREATED)["choices"][0]["message"]["extra_content"] == want
    events = [dict(doc, candidates=[{"content": {"role": "model", "parts": [p]}}]) for p in parts]
    events[-1]["candidates"][0]["finishReason"] = "STOP"
    raw = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events).encode()
    message = sdk_snapshot(translate_stream(raw, [], False)).choices[0].message.model_dump()
    assert message["extra_content"] == want
    assert (message["content"], message["reasoning_content"]) == ("Answer", "Thinking")


# ---------------------------------------------------------------- request mapping

@pytest.mark.parametrize("doc,needle", [
    ({"n": 2}, "n > 1"),
    ({"reasoning_effort": "ultra"}, "reasoning_effort"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "grammar"}}, "response_format"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tool type"),
    ({"tool_choice": {"type": "allowed_tools"}, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "flac"}}]}]}, "input_audio"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}, "file_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]}, "http"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]}, "base64"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "not JSON"),
    ({"messages": [{"role": "tool", "tool_call_id": "nobody", "content": "x"}]}, "nobody"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url"}]}]}, "only text"),
])
def test_refused_with_400(doc, needle) -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | doc
    with pytest.raises(TranslateError, match=needle) as info:
        t.request(doc, MODEL)
    assert info.value.status == 400


def test_image_url_is_refused_unless_fetched() -> None:
    doc = load("image", "request.json")
    assert t.image_urls(doc) == ["https://example.com/cat.jpg"]
    with pytest.raises(TranslateError, match="cat.jpg.*fetch") as info:
        t.request(doc, MODEL)
    assert info.value.status == 400
    files_uri = "https://generativelanguage.googleapis.com/v1beta/files/abc123"
    doc = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": files_uri}}]}]}
    assert t.image_urls(doc) == []
    assert t.request(doc, MODEL)[0]["contents"][0]["parts"] == [{"fileData": {"fileUri": files_uri}}]


def test_audio_and_file_parts_go_inline() -> None:
    doc = {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}]}]}
    assert t.request(doc, MODEL)[0]["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}}]


def test_dropped_fields_are_named() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "ann"}],
           "logprobs": True, "logit_bias": {"1": 2}, "user": "u1", "tool_choice": "auto",
           "parallel_tool_calls": False, "n": 1, "some_future_field": 1, "seed": 7}
    body, dropped = t.request(doc, MODEL)
    assert dropped == ["messages[].name", "tool_choice", "parallel_tool_calls", "logprobs", "logit_bias",
                       "user", "some_future_field"]
    assert "toolConfig" not in body and body["generationConfig"] == {"seed": 7}
    assert t.request(doc | {"parallel_tool_calls": True}, MODEL)[1].count("parallel_tool_calls") == 0


def test_every_listed_drop_is_named_and_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "one-api.md").read_text()
    section = docs[docs.index("## OpenAI Chat Completions client → Gemini"):]
    dropped_paragraph = section[section.index("**Dropped**"):section.index("**Refused")]
    for key in t._DROP:
        doc = {"messages": [{"role": "user", "content": "hi"}], key: 1}
        assert t.request(doc, MODEL)[1] == [key]
        assert f"`{key}`" in dropped_paragraph


def test_tool_choice_mapping() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    for choice, want in [("auto", {"mode": "AUTO"}), ("required", {"mode": "ANY"}), ("none", {"mode": "NONE"}),
                         ({"type": "function", "function": {"name": "f"}},
                          {"mode": "ANY", "allowedFunctionNames": ["f"]})]:
        assert t.request(base | {"tool_choice": choice}, MODEL)[0]["toolConfig"] == {"functionCallingConfig": want}
    body = t.request(base, MODEL)[0]
    assert body["tools"] == [{"functionDeclarations": [{"name": "f"}]}] and "toolConfig" not in body


def test_json_object_mode() -> None:
    body, _ = t.request({"messages": [{"role": "user", "content": "hi"}],
                         "response_format": {"type": "json_object"}}, MODEL)
    assert body["generationConfig"] == {"responseMimeType": "application/json"}


@pytest.mark.parametrize("model,effort,want", [
    ("gemini-2.5-flash", "none", {"thinkingBudget": 0}),
    ("gemini-2.5-flash", "low", {"thinkingBudget": 1024, "includeThoughts": True}),
    ("gemini-2.5-pro", "high", {"thinkingBudget": 24576, "includeThoughts": True}),
    ("models/gemini-3-pro-preview", "low", {"thinkingLevel": "low", "includeThoughts": True}),
    ("gemini-3-flash-preview", "none", {"thinkingLevel": "minimal", "includeThoughts": True}),
    ("gemini-3-flash-preview", "medium", {"thinkingLevel": "medium", "includeThoughts": True}),
])
def test_reasoning_effort_to_thinking_config(model, effort, want) -> None:
    body, _ = t.request({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": effort}, model)
    assert body["generationConfig"]["thinkingConfig"] == want
    _gemini_types().GenerationConfig.model_validate(body["generationConfig"])


def test_upstream_path() -> None:
    assert t.upstream_path("models/gemini-2.5-flash", False) == "/models/gemini-2.5-flash:generateContent"
    assert t.upstream_path("gemini-2.5-flash", True) == "/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("gemini_status,status,want_status,want_type", [
    ("INVALID_ARGUMENT", 400, 400, "invalid_request_error"), ("FAILED_PRECONDITION", 400, 400, "invalid_request_error"),
    ("UNAUTHENTICATED", 401, 401, "authentication_error"), ("PERMISSION_DENIED", 403, 403, "permission_error"),
    ("NOT_FOUND", 404, 404, "not_found_error"), ("RESOURCE_EXHAUSTED", 429, 429, "rate_limit_error"),
    ("INTERNAL", 500, 500, "server_error"), ("UNAVAILABLE", 503, 503, "server_error"),
    ("DEADLINE_EXCEEDED", 504, 504, "server_error"), ("SOMETHING_NEW", 418, 418, "something_new")])
def test_error_status(gemini_status, status, want_status, want_type) -> None:
    got, body = t.error(status, {"error": {"code": status, "message": "m", "status": gemini_status}})
    assert (got, body["error"]["type"]) == (want_status, want_type)
    assert body["error"]["message"] == "m" and body["error"]["code"] == gemini_status


def test_error_in_a_json_array_and_not_in_gemini_shape() -> None:
    # streamGenerateContent without alt=sse answers an error inside a one-element JSON array.
    got, body = t.error(429, [load("error", "upstream.json")])
    assert {"status": got, "body": body} == load("error", "expected.json")
    got, body = t.error(502, "<html>bad gateway</html>")
    assert got == 502 and body["error"]["message"] == "<html>bad gateway</html>"


# ---------------------------------------------------------------- against the Gemini fake

@pytest.fixture(scope="module")
def gemini_fake():
    # The project's fake Gemini (tests/fakes/gemini_api.py) answers the translated requests, so
    # the translator reads the same bytes the sidecar will get from it once the route is wired.
    from tests.fakes.server import FakeProvider
    server = FakeProvider().start_in_thread()
    try:
        yield server
    finally:
        server.stop_thread()


def call_fake(fake, body: dict, stream: bool, scenario: str = "") -> tuple[int, bytes]:
    headers = {"x-goog-api-key": "gm-translate-test", "x-fake-chunk-delay-ms": "0",
               "content-type": "application/json"}
    if scenario:
        headers["x-fake-scenario"] = scenario
    url = fake.gemini_base_url + "/v1beta" + t.upstream_path(MODEL, stream)
    got = []
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", url, content=json.dumps(body).encode(), headers=headers) as response:
            try:
                for piece in response.iter_raw():
                    got.append(piece)
            except httpx.RemoteProtocolError:
                pass  # the "reset" scenario drops the connection mid-stream: keep what arrived
    return response.status_code, b"".join(got)


def openai_client_answered_by(status: int, body: bytes, content_type: str = "application/json") -> openai.OpenAI:
    transport = httpx.MockTransport(lambda request: httpx.Response(
        status, headers={"content-type": content_type}, content=body))
    return openai.OpenAI(api_key="x", base_url="http://localhost/v1", max_retries=0,
                         http_client=httpx.Client(transport=transport))


@pytest.mark.parametrize("scenario", ["", "cache,reasoning"])
def test_fake_gemini_stream_and_json_translate_to_the_same_answer(gemini_fake, scenario: str) -> None:
    request = load("text", "request.json")
    body, _ = t.request(request, MODEL)
    status, raw = call_fake(gemini_fake, body, stream=True, scenario=scenario)
    assert status == 200
    last_meta = json.loads(SseData().feed(raw)[-1])["usageMetadata"]
    sse = translate_stream(raw, [13] * (len(raw) // 13 + 1), True)
    status, doc = call_fake(gemini_fake, body, stream=False, scenario=scenario)
    assert status == 200
    # The openai SDK, as an app would call it, over the translated JSON...
    reply = openai_client_answered_by(200, json.dumps(t.response(json.loads(doc), CREATED)).encode()) \
        .chat.completions.create(model="gemini/gemini-2.5-flash", messages=request["messages"])
    # ...and over the translated stream.
    final = sdk_snapshot(sse)
    assert final.choices[0].message.content == reply.choices[0].message.content != ""
    assert final.choices[0].finish_reason == reply.choices[0].finish_reason == "stop"
    assert final.usage.model_dump(exclude_none=True) == reply.usage.model_dump(exclude_none=True) == t.usage(last_meta)
    if scenario:
        assert reply.usage.prompt_tokens_details.cached_tokens == last_meta["cachedContentTokenCount"] > 0
        assert reply.usage.completion_tokens_details.reasoning_tokens == last_meta["thoughtsTokenCount"] > 0


def test_fake_gemini_errors_reach_the_openai_sdk_as_its_own_errors(gemini_fake) -> None:
    body, _ = t.request(load("text", "request.json"), MODEL)
    status, raw = call_fake(gemini_fake, body, stream=False, scenario="error429")
    assert status == 429
    new_status, doc = t.error(status, json.loads(raw))
    client = openai_client_answered_by(new_status, json.dumps(doc).encode())
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "RESOURCE_EXHAUSTED"
    # An error event in the middle of a stream: the SDK raises after the text before it.
    status, raw = call_fake(gemini_fake, body, stream=True, scenario="stream-error")
    assert status == 200
    with pytest.raises(openai.APIError, match="internal error"):
        for _ in sdk_stream(translate_stream(raw, [], True)):
            pass


def test_fake_gemini_stream_cut_off_ends_in_an_error_for_the_sdk(gemini_fake) -> None:
    body, _ = t.request(load("text", "request.json"), MODEL)
    _, raw = call_fake(gemini_fake, body, stream=True, scenario="reset")
    assert raw.count(b"data: ") >= 1  # some content arrived before the cut
    out = chunks(translate_stream(raw, [], True))
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in out)
    assert out[-1]["error"]["code"] == "incomplete_stream"
    with pytest.raises(openai.APIError, match="ended before its finish reason"):
        for _ in sdk_stream(translate_stream(raw, [], True)):
            pass
