"""One API end to end: the real openai and anthropic SDKs call the sidecar's root paths with
`model: "<upstream>/<model>"`; fake upstreams answer in their own formats; the SDKs' parsed
objects carry the upstream's answer, and the ledger meters the upstream's own bytes."""
from __future__ import annotations

import json
from typing import Any, Iterator

import anthropic
import openai
import pytest

from ledger.defaults import read_salt
from sidecar.attribution import fingerprint
from tests.conftest import CASE_HEADER, E2E, Case
from tests.fakes import FakeProvider
from tests.fakes.tools import TOOL_ARGS


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]


@pytest.fixture(scope="module")
def down() -> Iterator[FakeProvider]:
    """A second fake that answers every call with a 503 (the first target of a falling-back route)."""
    server = FakeProvider().start_in_thread()
    server.fail_with("error503")
    try:
        yield server
    finally:
        server.stop_thread()


@pytest.fixture(scope="module")
def sidecar_config(fake: FakeProvider, down: FakeProvider) -> dict[str, Any]:
    return {"upstreams": {
        "claude-down": {"base_url": down.base_url, "adapter": "anthropic", "provider": "anthropic"},
        "openai": {"base_url": fake.base_url}, "anthropic": {"base_url": fake.base_url},
        "gemini": {"base_url": fake.base_url},
        "claude": {"base_url": fake.base_url, "adapter": "anthropic", "provider": "anthropic",
                   "api_key": "sk-ant-configured"},
    }, "routes": {
        "route-claude": {"targets": [{"upstream": "claude", "model": "claude-haiku-4-5"},
                                     {"upstream": "openai", "model": "gpt-4o-mini"}], "circuit": {"failures": 100}},
        "route-503": {"targets": [{"upstream": "claude-down", "model": "claude-haiku-4-5"},
                                  {"upstream": "openai", "model": "gpt-4o-mini"}], "circuit": {"failures": 100}},
    }}


def oai(e2e: E2E, case: Case, api_key: str = "sk-app-own") -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, base_url=f"{e2e.sidecar.url}/v1", max_retries=0,
                         default_headers=case.headers, timeout=20)


def ant(e2e: E2E, case: Case, api_key: str = "sk-ant-app-own") -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=api_key, base_url=e2e.sidecar.url, max_retries=0,
                               default_headers=case.headers, timeout=20)


def test_openai_sdk_to_anthropic(e2e: E2E) -> None:
    case = e2e.case()
    client = oai(e2e, case)
    raw = client.chat.completions.with_raw_response.create(model="anthropic/claude-haiku-4-5", messages=MESSAGES,
                                                           max_tokens=100, seed=7)
    resp = raw.parse()
    ex = e2e.exchange(case)
    doc = json.loads(ex.response_body)
    assert ex.path == "/v1/messages" and ex.request_json["model"] == "claude-haiku-4-5"
    assert ex.request_headers["x-api-key"] == "sk-app-own"  # the app's key, moved into Anthropic's header
    assert "authorization" not in {k.lower() for k in ex.request_headers}
    assert resp.choices[0].message.content == doc["content"][0]["text"]
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == doc["usage"]["input_tokens"] + doc["usage"].get("cache_read_input_tokens", 0) \
        + doc["usage"].get("cache_creation_input_tokens", 0)
    assert raw.headers["x-meterline-dropped"] == "seed"
    row = e2e.row(case)
    e2e.expect(row, upstream="anthropic", provider="anthropic", request_model="claude-haiku-4-5",
               client_format="openai", upstream_format="anthropic", outcome="ok",
               input_tokens=doc["usage"]["input_tokens"], output_tokens=doc["usage"]["output_tokens"])
    e2e.expect_cost(row, e2e.extract(doc, "anthropic"), "claude-haiku-4-5", "anthropic")


def test_openai_sdk_streams_from_anthropic_with_configured_key(e2e: E2E) -> None:
    case = e2e.case(chunks=4)
    client = oai(e2e, case)
    chunks = list(client.chat.completions.create(model="claude/claude-haiku-4-5", messages=MESSAGES, max_tokens=100,
                                                 stream=True, stream_options={"include_usage": True}))
    ex = e2e.exchange(case)
    assert ex.request_headers["x-api-key"] == "sk-ant-configured"  # the upstream's `api_key:` wins
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finish == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    row = e2e.row(case)
    e2e.expect(row, upstream="claude", stream=True, client_format="openai", upstream_format="anthropic",
               outcome="ok", output_tokens=chunks[-1].usage.completion_tokens)
    assert row["cost_usd"] is not None
    # the row names the app's key, not the configured one the upstream was sent
    assert row["key_fingerprint"] == fingerprint("sk-app-own", read_salt(e2e.sidecar.db))


def test_openai_sdk_to_gemini(e2e: E2E) -> None:
    case = e2e.case()
    client = oai(e2e, case, api_key="gm-app-own")
    resp = client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=MESSAGES)
    ex = e2e.exchange(case)
    doc = json.loads(ex.response_body)
    assert ex.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert ex.request_headers["x-goog-api-key"] == "gm-app-own"
    assert resp.choices[0].message.content == doc["candidates"][0]["content"]["parts"][0]["text"]
    assert resp.choices[0].finish_reason == "stop"
    row = e2e.row(case)
    e2e.expect(row, upstream="gemini", provider="google", client_format="openai", upstream_format="gemini",
               input_tokens=doc["usageMetadata"]["promptTokenCount"], outcome="ok")
    e2e.expect_cost(row, e2e.extract(doc, "google"), "gemini-2.5-flash", "google")


def test_openai_sdk_streams_from_gemini(e2e: E2E) -> None:
    case = e2e.case(chunks=3)
    client = oai(e2e, case, api_key="gm-app-own")
    chunks = list(client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    ex = e2e.exchange(case)
    assert ex.path.endswith(":streamGenerateContent") and ex.query_string == "alt=sse"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    row = e2e.row(case)
    e2e.expect(row, stream=True, client_format="openai", upstream_format="gemini", outcome="ok",
               output_tokens=chunks[-1].usage.completion_tokens)


def test_anthropic_sdk_to_openai(e2e: E2E) -> None:
    case = e2e.case()
    client = ant(e2e, case)
    raw = client.messages.with_raw_response.create(model="openai/gpt-4o-mini", max_tokens=100, messages=MESSAGES,
                                                   extra_body={"top_k": 5})
    msg = raw.parse()
    ex = e2e.exchange(case)
    doc = json.loads(ex.response_body)
    assert ex.path == "/v1/chat/completions" and ex.request_json["model"] == "gpt-4o-mini"
    assert ex.request_headers["authorization"] == "Bearer sk-ant-app-own"
    assert msg.content[0].text == doc["choices"][0]["message"]["content"]
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == doc["usage"]["completion_tokens"]
    assert raw.headers["x-meterline-dropped"] == "top_k"
    row = e2e.row(case)
    e2e.expect(row, upstream="openai", provider="openai", client_format="anthropic", upstream_format="openai",
               input_tokens=doc["usage"]["prompt_tokens"], outcome="ok")
    e2e.expect_cost(row, e2e.extract(doc, "openai", "chat"), "gpt-4o-mini", "openai")


def test_anthropic_sdk_streams_from_openai(e2e: E2E) -> None:
    case = e2e.case(chunks=4)
    client = ant(e2e, case)
    with client.messages.stream(model="openai/gpt-4o-mini", max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    row = e2e.row(case)
    e2e.expect(row, stream=True, client_format="anthropic", upstream_format="openai", outcome="ok",
               output_tokens=final.usage.output_tokens)
    assert row["cost_usd"] is not None


def test_anthropic_sdk_to_gemini(e2e: E2E) -> None:
    case = e2e.case()
    msg = ant(e2e, case).messages.create(model="gemini/gemini-2.5-flash", max_tokens=100, messages=MESSAGES)
    ex = e2e.exchange(case)
    doc = json.loads(ex.response_body)
    assert msg.content[-1].text == doc["candidates"][0]["content"]["parts"][-1]["text"]
    e2e.expect(e2e.row(case), client_format="anthropic", upstream_format="gemini", outcome="ok")


def test_same_format_only_rewrites_the_model(e2e: E2E) -> None:
    case = e2e.case()
    resp = oai(e2e, case).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    ex = e2e.exchange(case)
    assert ex.request_json["model"] == "gpt-4o-mini" and ex.request_json["messages"] == MESSAGES
    assert resp.id == json.loads(ex.response_body)["id"]
    e2e.expect(e2e.row(case), client_format="openai", upstream_format="openai", request_model="gpt-4o-mini")


def test_unknown_model_in_each_clients_format(e2e: E2E) -> None:
    case = e2e.case()
    with pytest.raises(openai.NotFoundError) as got:
        oai(e2e, case).chat.completions.create(model="nowhere/gpt-4o", messages=MESSAGES)
    assert "nowhere/gpt-4o" in got.value.message and "upstreams:" in got.value.message
    with pytest.raises(anthropic.NotFoundError) as got2:
        ant(e2e, case).messages.create(model="no-such-route", max_tokens=10, messages=MESSAGES)
    assert got2.value.body["error"]["type"] == "api_error" and "no-such-route" in str(got2.value)


def test_refused_field_is_a_400_in_the_clients_format(e2e: E2E) -> None:
    case = e2e.case()
    with pytest.raises(openai.BadRequestError) as got:
        oai(e2e, case).chat.completions.create(model="anthropic/claude-haiku-4-5", messages=MESSAGES, n=2)
    assert "n" in got.value.message
    assert e2e.exchanges(case, 0, timeout=0.2) == []  # never sent upstream


def test_embeddings_to_gemini_through_the_openai_sdk(e2e: E2E) -> None:
    case = e2e.case()
    resp = oai(e2e, case, api_key="gm-app-own").embeddings.create(model="gemini/gemini-embedding-001",
                                                                 input=["one", "two"])
    ex = e2e.exchange(case)
    assert ex.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert len(resp.data) == 2 and len(resp.data[0].embedding) > 0
    e2e.expect(e2e.row(case), client_format="openai", upstream_format="gemini", provider="google", outcome="ok")


def test_models_through_both_sdks(e2e: E2E) -> None:
    case = e2e.case()
    ids = [m.id for m in oai(e2e, case).models.list()]
    assert "route-claude" in ids and "claude/claude-haiku-4-5" in ids and "openai/gpt-4o-mini" in ids
    assert oai(e2e, case).models.retrieve("openai/gpt-4o-mini").id == "openai/gpt-4o-mini"
    page = ant(e2e, case).models.list()
    assert {m.id for m in page.data} == set(ids)
    assert ant(e2e, case).models.retrieve("route-claude").id == "route-claude"
    with pytest.raises(openai.NotFoundError):
        oai(e2e, case).models.retrieve("nowhere/x")


def test_mixed_route_falls_back_from_anthropic_to_openai(e2e: E2E, down: FakeProvider) -> None:
    case = e2e.case()
    raw = oai(e2e, case).chat.completions.with_raw_response.create(model="route-503", messages=MESSAGES, max_tokens=50)
    resp = raw.parse()
    assert raw.headers["x-meterline-served-by"] == "openai/gpt-4o-mini" and raw.headers["x-meterline-attempts"] == "2"
    failed = [e for e in down.exchanges if e.request_headers.get(CASE_HEADER) == case.id]
    assert [(e.path, e.request_json["model"], e.request_json["max_tokens"]) for e in failed] == [
        ("/v1/messages", "claude-haiku-4-5", 50)]  # translated for the Anthropic target
    served = e2e.exchange(case)
    assert served.path == "/v1/chat/completions" and served.request_json["model"] == "gpt-4o-mini"
    doc = json.loads(served.response_body)
    assert resp.choices[0].message.content == doc["choices"][0]["message"]["content"]
    row = e2e.row(case)
    e2e.expect(row, route="route-503", served_by="openai/gpt-4o-mini", client_format="openai",
               upstream_format="openai", outcome="ok")
    tries = e2e.sidecar.sql(f"SELECT * FROM attempts WHERE call_id = '{row['call_id']}' ORDER BY attempt")
    assert [(t["upstream"], t["status_code"]) for t in tries] == [("claude-down", 503), ("openai", 200)]
    e2e.expect_cost(row, e2e.extract(doc, "openai", "chat"), "gpt-4o-mini", "openai")
    assert tries[1]["cost_usd"] == row["cost_usd"]


def test_route_of_another_format_for_an_anthropic_client(e2e: E2E) -> None:
    case = e2e.case()
    msg = ant(e2e, case).messages.create(model="route-claude", max_tokens=50, messages=MESSAGES)
    ex = e2e.exchange(case)
    assert ex.path == "/v1/messages" and msg.content[0].text
    e2e.expect(e2e.row(case), route="route-claude", client_format="anthropic", upstream_format="anthropic")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}}}}}
ANT_WEATHER = {"name": "get_weather", "description": "The weather in a city",
               "input_schema": WEATHER["function"]["parameters"]}


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_tool_call_from_anthropic(e2e: E2E, stream: bool) -> None:
    case = e2e.case("tool-call")
    client = oai(e2e, case)
    kw: dict[str, Any] = dict(model="anthropic/claude-haiku-4-5", messages=MESSAGES, max_tokens=100, tools=[WEATHER])
    if stream:
        with client.chat.completions.stream(**kw) as s:  # the SDK assembles the call from the deltas
            for _ in s:
                pass
            resp = s.get_final_completion()
    else:
        resp = client.chat.completions.create(**kw)
    ex = e2e.exchange(case)
    assert ex.request_json["tools"][0]["name"] == "get_weather" and "input_schema" in ex.request_json["tools"][0]
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == TOOL_ARGS
    assert call.id.startswith("toolu_")  # Anthropic's id, so the app's tool result finds its call
    row = e2e.row(case)
    e2e.expect(row, finish_reason="tool_use", client_format="openai", upstream_format="anthropic", outcome="ok")
    assert row["cost_usd"] is not None


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_tool_call_from_openai(e2e: E2E, stream: bool) -> None:
    case = e2e.case("tool-call")
    client = ant(e2e, case)
    kw: dict[str, Any] = dict(model="openai/gpt-4o-mini", max_tokens=100, messages=MESSAGES, tools=[ANT_WEATHER])
    if stream:
        with client.messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(**kw)
    ex = e2e.exchange(case)
    assert ex.request_json["tools"][0]["function"]["name"] == "get_weather"
    assert msg.stop_reason == "tool_use"
    use = [b for b in msg.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.input == TOOL_ARGS and use.id.startswith("call_")
    row = e2e.row(case)
    e2e.expect(row, finish_reason="tool_calls", client_format="anthropic", upstream_format="openai", outcome="ok",
               output_tokens=msg.usage.output_tokens)
    if stream:  # the app's usage is the upstream's
        assert msg.usage.output_tokens == row["output_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_tool_call_from_gemini(e2e: E2E, stream: bool) -> None:
    case = e2e.case("tool-call")
    client = oai(e2e, case, api_key="gm-app-own")
    kw: dict[str, Any] = dict(model="gemini/gemini-2.5-flash", messages=MESSAGES, tools=[WEATHER])
    if stream:
        with client.chat.completions.stream(**kw) as s:
            for _ in s:
                pass
            resp = s.get_final_completion()
    else:
        resp = client.chat.completions.create(**kw)
    ex = e2e.exchange(case)
    assert ex.request_json["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == TOOL_ARGS
    row = e2e.row(case)
    e2e.expect(row, client_format="openai", upstream_format="gemini", outcome="ok", stream=stream)
    doc = json.loads(ex.response_body) if not stream else None
    if doc is not None:
        e2e.expect_cost(row, e2e.extract(doc, "google"), "gemini-2.5-flash", "google")


def _image_messages(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_an_image_url_for_gemini_is_refused_naming_the_config_key(e2e: E2E, fake: FakeProvider) -> None:
    case = e2e.case()
    with pytest.raises(openai.BadRequestError) as got:
        oai(e2e, case).chat.completions.create(model="gemini/gemini-2.5-flash",
                                               messages=_image_messages(f"{fake.base_url}/_fake/images/a.png"))
    assert "translate.fetch_images" in got.value.message
    assert e2e.exchanges(case, 0, timeout=0.2) == []


def test_an_image_url_is_fetched_and_sent_inline_when_allowed(e2e: E2E, fake: FakeProvider, start_sidecar: Any) -> None:
    process = start_sidecar({"translate": {"fetch_images": True, "max_image_bytes": 100_000}})
    case = e2e.case()
    client = openai.OpenAI(api_key="gm-app-own", base_url=f"{process.url}/v1", max_retries=0,
                           default_headers=case.headers, timeout=20)
    resp = client.chat.completions.create(model="gemini/gemini-2.5-flash",
                                          messages=_image_messages(f"{fake.base_url}/_fake/images/a.png"))
    assert resp.choices[0].message.content
    ex = e2e.exchange(case)
    parts = ex.request_json["contents"][0]["parts"]
    assert parts[1]["inlineData"]["mimeType"] == "image/png" and parts[1]["inlineData"]["data"]
