"""One API end to end: the real openai and anthropic SDKs call the sidecar's root paths with
`model: "<upstream>/<model>"`; fake upstreams answer in their own formats; the SDKs' parsed
objects carry the upstream's answer, and the ledger meters the upstream's own bytes."""
from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import E2E, Case
from tests.fakes import FakeProvider

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]


@pytest.fixture(scope="module")
def sidecar_config(fake: FakeProvider) -> dict[str, Any]:
    return {"upstreams": {
        "openai": {"base_url": fake.base_url}, "anthropic": {"base_url": fake.base_url},
        "gemini": {"base_url": fake.base_url},
        "claude": {"base_url": fake.base_url, "adapter": "anthropic", "provider": "anthropic",
                   "api_key": "sk-ant-configured"},
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
