"""Tests for the OpenAI-chat-client to Anthropic-upstream translator, over the golden corpus in
tests/golden/openai_chat_to_anthropic/ and through the openai SDK's own stream classes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.translate import openai_chat_to_anthropic as t
from sidecar.translate.base import TranslateError

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden" / "openai_chat_to_anthropic"
CASES = sorted(p.name[: -len(".request.json")] for p in GOLDEN.glob("*.request.json"))
CREATED = 1764633600


def load(case: str, suffix: str):
    return json.loads((GOLDEN / f"{case}.{suffix}").read_text())


def include_usage(case: str) -> bool:
    return bool((load(case, "request.json").get("stream_options") or {}).get("include_usage"))


def translate_stream(raw: bytes, pieces: list[int], usage: bool = True) -> bytes:
    st = t.StreamTranslator(CREATED, usage)
    out, at = [], 0
    for size in pieces:
        out.append(st.feed(raw[at:at + size]))
        at += size
    out.append(st.feed(raw[at:]))
    return b"".join(out) + st.finish()


def splits(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out, total = [], 0
    while total < n:
        out.append(rng.randint(1, 40))
        total += out[-1]
    return out


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


def test_corpus_has_every_case() -> None:
    assert set(CASES) >= {"text", "multi_turn", "image", "one_tool", "parallel_tools", "tool_result",
                          "json_schema", "thinking", "refusal", "max_tokens", "error", "cache_hits"}


@pytest.mark.parametrize("case", CASES)
def test_request_golden(case: str) -> None:
    body, dropped = t.request(load(case, "request.json"), "claude-sonnet-4-5")
    want = load(case, "upstream_request.json")
    assert body == want["body"]
    assert dropped == want["dropped"]


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
def test_stream_golden_at_any_split(case: str) -> None:
    raw = (GOLDEN / f"{case}.upstream.sse").read_bytes()
    want = (GOLDEN / f"{case}.expected.sse").read_bytes()
    usage = include_usage(case)
    assert translate_stream(raw, [], usage) == want
    assert translate_stream(raw, [1] * len(raw), usage) == want  # one byte at a time
    for seed in range(5):
        assert translate_stream(raw, splits(len(raw), seed), usage) == want
    # CRLF line ends are legal SSE and must give the same output.
    assert translate_stream(raw.replace(b"\n", b"\r\n"), splits(len(raw), 9), usage) == want
    chunks(want)


def test_stream_first_chunk_is_assistant_role_and_ids_are_stable() -> None:
    out = chunks((GOLDEN / "text.expected.sse").read_bytes())
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in out} == {"msg_01TextAaaa"}
    assert {c["created"] for c in out} == {CREATED}


@pytest.mark.parametrize("case", ["one_tool", "parallel_tools"])
def test_tool_argument_fragments_reassemble_to_upstream_input(case: str) -> None:
    upstream = [b for b in load(case, "upstream.json")["content"] if b["type"] == "tool_use"]
    calls: dict = {}
    for c in chunks((GOLDEN / f"{case}.expected.sse").read_bytes()):
        for choice in c["choices"]:
            for tc in choice["delta"].get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                if "id" in tc:
                    assert slot["id"] is None, "id sent twice"
                    slot["id"], slot["name"] = tc["id"], tc["function"]["name"]
                slot["arguments"] += tc["function"]["arguments"]
    assert sorted(calls) == list(range(len(upstream)))
    for i, block in enumerate(upstream):
        assert calls[i]["id"] == block["id"] and calls[i]["name"] == block["name"]
        assert json.loads(calls[i]["arguments"]) == block["input"]


@pytest.mark.parametrize("reason,want", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("pause_turn", "pause_turn"),
    ("model_context_window_exceeded", "length"), ("brand_new_reason", "error"), (None, None)])
def test_stop_reason_table(reason, want) -> None:
    assert t.finish_reason(reason) == want
    doc = load("text", "upstream.json") | {"stop_reason": reason}
    assert t.response(doc, CREATED)["choices"][0]["finish_reason"] == want


def test_unknown_stop_reason_in_a_stream_is_not_stop() -> None:
    raw = (GOLDEN / "text.upstream.sse").read_bytes().replace(b'"end_turn"', b'"brand_new_reason"')
    finishes = [c["choices"][0]["finish_reason"] for c in chunks(translate_stream(raw, [], False))
                if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["error"]


def test_usage_with_cache_tokens() -> None:
    # input 21 uncached + 1500 read + 188 written; OpenAI's prompt_tokens includes all three.
    want = {"prompt_tokens": 1709, "completion_tokens": 4, "total_tokens": 1713,
            "prompt_tokens_details": {"cached_tokens": 1500}}
    assert t.response(load("cache_hits", "upstream.json"), CREATED)["usage"] == want
    last = chunks((GOLDEN / "cache_hits.expected.sse").read_bytes())[-1]
    assert last["choices"] == [] and last["usage"] == want


def test_stream_usage_takes_latest_non_null_and_is_omitted_without_include_usage() -> None:
    raw = (GOLDEN / "cache_hits.upstream.sse").read_bytes()
    # A message_delta that repeats only output_tokens keeps the cache counts of message_start.
    lean = raw.replace(b'"usage":{"input_tokens":21,"cache_creation_input_tokens":188,'
                       b'"cache_read_input_tokens":1500,"output_tokens":4}', b'"usage":{"output_tokens":4}')
    assert lean != raw
    assert chunks(translate_stream(lean, [], True))[-1]["usage"]["prompt_tokens"] == 1709
    assert all("usage" not in c for c in chunks(translate_stream(raw, [], False)))


def test_stream_cut_before_stop_reason_ends_in_an_error() -> None:
    raw = (GOLDEN / "text.upstream.sse").read_bytes()
    cut = raw[: raw.index(b"event: message_delta")]
    out = chunks(translate_stream(cut, [7] * 50, True))
    assert "error" in out[-1]


def test_empty_tool_input_gives_json_arguments() -> None:
    out = t.response(load("parallel_tools", "upstream.json"), CREATED)
    assert [c["function"]["arguments"] for c in out["choices"][0]["message"]["tool_calls"]] == [
        '{"city": "Paris"}', '{"city": "Rome"}', "{}"]


def sdk_stream(sse: bytes) -> openai.Stream:
    client = openai.OpenAI(api_key="x", base_url="http://localhost/v1")
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse,
                              request=httpx.Request("POST", "http://localhost/v1/chat/completions"))
    return openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client)


def test_openai_sdk_assembles_the_translated_parallel_tool_stream() -> None:
    raw = (GOLDEN / "parallel_tools.upstream.sse").read_bytes()
    sse = translate_stream(raw, splits(len(raw), 3), True)
    state = ChatCompletionStreamState()
    for chunk in sdk_stream(sse):
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    upstream = [b for b in load("parallel_tools", "upstream.json")["content"] if b["type"] == "tool_use"]
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        (b["id"], b["name"], b["input"]) for b in upstream]
    assert final.usage.prompt_tokens == 500 and final.usage.completion_tokens == 90


def test_openai_sdk_raises_on_a_translated_error_event() -> None:
    sse = (GOLDEN / "error.expected.sse").read_bytes()
    seen = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        for chunk in sdk_stream(sse):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "Hel"]


@pytest.mark.parametrize("doc,needle", [
    ({"n": 2}, "n > 1"),
    ({"temperature": 1.5}, "temperature"),
    ({"reasoning_effort": "high", "max_tokens": 1000}, "thinking budget"),
    ({"reasoning_effort": "ultra"}, "reasoning_effort"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tool type"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "not JSON"),
])
def test_refused_with_400(doc, needle) -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | doc
    with pytest.raises(TranslateError, match=needle) as info:
        t.request(doc, "claude-sonnet-4-5")
    assert info.value.status == 400


def test_dropped_fields_are_named() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "ann"}], "seed": 1,
           "logprobs": True, "frequency_penalty": 0.5, "presence_penalty": 0.1, "logit_bias": {"1": 2},
           "tool_choice": "auto", "n": 1, "some_future_field": 1}
    body, dropped = t.request(doc, "claude-sonnet-4-5")
    assert dropped == ["messages[].name", "tool_choice", "seed", "logprobs", "frequency_penalty",
                       "presence_penalty", "logit_bias", "some_future_field"]
    assert "tool_choice" not in body and "seed" not in body


def test_tool_choice_mapping() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    for choice, want in [("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"}),
                         ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"})]:
        assert t.request(base | {"tool_choice": choice}, "m")[0]["tool_choice"] == want
    body = t.request(base | {"tool_choice": "required", "parallel_tool_calls": False}, "m")[0]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


@pytest.mark.parametrize("anthropic_type,status,want_status", [
    ("invalid_request_error", 400, 400), ("authentication_error", 401, 401),
    ("rate_limit_error", 429, 429), ("api_error", 500, 500), ("overloaded_error", 529, 503),
    ("something_new", 418, 418)])
def test_error_status(anthropic_type, status, want_status) -> None:
    got, body = t.error(status, {"type": "error", "error": {"type": anthropic_type, "message": "m"}})
    assert got == want_status
    assert body["error"]["message"] == "m" and body["error"]["code"] == anthropic_type


def test_error_not_in_anthropic_shape_keeps_its_text() -> None:
    got, body = t.error(502, "<html>bad gateway</html>")
    assert got == 502 and body["error"]["message"] == "<html>bad gateway</html>"


def test_interleaved_tool_blocks_keep_their_own_index_and_one_finish_chunk() -> None:
    ev = [
        {"type": "message_start", "message": {"id": "msg_x", "model": "m", "usage": {"input_tokens": 1, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "a", "name": "f", "input": {}}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "b", "name": "g", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"y":'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"x":1}'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "2}"}},
        {"type": "content_block_stop", "index": 0}, {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 6}},
        {"type": "message_stop"}]
    raw = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in ev).encode()
    state = ChatCompletionStreamState()
    for chunk in sdk_stream(translate_stream(raw, [5] * 400, True)):
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    assert [(c.id, json.loads(c.function.arguments)) for c in final.choices[0].message.tool_calls] == [
        ("a", {"x": 1}), ("b", {"y": 2})]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage.completion_tokens == 6


@pytest.mark.parametrize("case", [c for c in CASES if c != "error"])
def test_sdk_assembled_stream_agrees_with_the_json_translation(case: str) -> None:
    # The stream and the JSON reply of each case carry the same answer; the openai SDK's
    # accumulation of the translated stream must equal the translated JSON.
    state = ChatCompletionStreamState()
    for chunk in sdk_stream((GOLDEN / f"{case}.expected.sse").read_bytes()):
        state.handle_chunk(chunk)
    # The snapshot, not get_final_completion(): the SDK's parse helper raises on "length" and
    # "content_filter" by design (LengthFinishReasonError, ContentFilterFinishReasonError).
    final = state.current_completion_snapshot
    want = t.response(load(case, "upstream.json"), CREATED)
    got, expect = final.choices[0], want["choices"][0]
    assert got.finish_reason == expect["finish_reason"]
    assert (got.message.content or None) == expect["message"]["content"]
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in got.message.tool_calls or []] == [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in expect["message"].get("tool_calls", [])]
    if include_usage(case):
        assert final.usage.model_dump(exclude_none=True) == want["usage"]
