"""Tests for the OpenAI-embeddings-client to Gemini-upstream translator, over the golden corpus in
tests/golden/openai_embeddings_to_gemini/ and through the openai SDK's own parsing."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from sidecar.translate import openai_embeddings_to_gemini as t
from sidecar.translate.base import TranslateError

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden" / "openai_embeddings_to_gemini"
CASES = sorted(p.name[: -len(".request.json")] for p in GOLDEN.glob("*.request.json"))
ERRORS = [c for c in CASES if (GOLDEN / f"{c}.upstream.status").exists()]
REPLIES = [c for c in CASES if c not in ERRORS]


def load(case: str, suffix: str):
    return json.loads((GOLDEN / f"{case}.{suffix}").read_text())


def model_of(case: str) -> str:
    return load(case, "request.json")["model"].split("/", 1)[1]


def floats32(raw: bytes) -> list[float]:
    """Little-endian float32 bytes -> Python floats, independently of the translator."""
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def as_float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def upstream_values(case: str) -> list[list[float]]:
    doc = load(case, "upstream.json")
    return [doc["embedding"]["values"]] if "embedding" in doc else [e["values"] for e in doc["embeddings"]]


def test_corpus_has_every_case() -> None:
    assert set(CASES) >= {"one_input", "many_inputs", "dimensions", "base64", "error"}


@pytest.mark.parametrize("case", CASES)
def test_request_golden(case: str) -> None:
    call = t.request(load(case, "request.json"), model_of(case))
    want = load(case, "upstream_request.json")
    assert (call.method, call.body, call.dropped) == (want["method"], want["body"], want["dropped"])


@pytest.mark.parametrize("case", REPLIES)
def test_response_golden(case: str) -> None:
    call = t.request(load(case, "request.json"), model_of(case))
    got = t.response(load(case, "upstream.json"), model_of(case), call.encoding_format)
    assert got == load(case, "expected.json")
    if call.encoding_format == "float":
        CreateEmbeddingResponse.model_validate(got)  # the SDK's own model accepts it


@pytest.mark.parametrize("case", ERRORS)
def test_error_golden(case: str) -> None:
    status = int((GOLDEN / f"{case}.upstream.status").read_text())
    got_status, body = t.error(status, load(case, "upstream.json"))
    assert {"status": got_status, "body": body} == load(case, "expected.json")


def test_one_text_uses_embed_content_and_many_use_the_batch() -> None:
    for value in ("hi", ["hi"]):
        call = t.request({"input": value}, "gemini-embedding-001")
        assert call.method == "embedContent" and call.body == {"content": {"parts": [{"text": "hi"}]}}
    call = t.request({"input": ["a", "b"], "dimensions": 4}, "gemini-embedding-001")
    assert call.method == "batchEmbedContents"
    assert [r["model"] for r in call.body["requests"]] == ["models/gemini-embedding-001"] * 2
    assert [r["outputDimensionality"] for r in call.body["requests"]] == [4, 4]
    assert t.path("gemini-embedding-001", call.method) == "models/gemini-embedding-001:batchEmbedContents"
    assert t.path("models/x", "embedContent") == "models/x:embedContent"


def test_base64_golden_decodes_to_the_upstream_values() -> None:
    got = load("base64", "expected.json")
    # Gemini's JSON numbers are float32 values; the bytes must hold exactly those.
    for item, values in zip(got["data"], upstream_values("base64"), strict=True):
        assert floats32(base64.b64decode(item["embedding"])) == as_float32(values)


def test_order_and_index_follow_the_inputs() -> None:
    got = load("many_inputs", "expected.json")
    assert [d["index"] for d in got["data"]] == [0, 1, 2]
    assert [d["embedding"] for d in got["data"]] == upstream_values("many_inputs")


def test_usage_from_gemini_and_zero_when_not_reported() -> None:
    assert load("many_inputs", "expected.json")["usage"] == {"prompt_tokens": 24, "total_tokens": 24}
    assert t.usage_reported(load("many_inputs", "upstream.json"))
    # gemini-embedding-001 reports no usage: 0 for the SDK, and the wiring can tell.
    assert load("one_input", "expected.json")["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert not t.usage_reported(load("one_input", "upstream.json"))


@pytest.mark.parametrize("doc,needle", [
    ({"input": [1, 2, 3]}, "token array"),
    ({"input": [[1, 2], [3]]}, "token array"),
    ({"input": ["a", 7]}, "token array"),
    ({"input": []}, "empty list"),
    ({"input": {"text": "a"}}, "string or a list of strings"),
    ({"input": ["a", None]}, "string or a list of strings"),
    ({}, "`input` is required"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": "256"}, "dimensions"),
    ({"input": "a", "dimensions": True}, "dimensions"),
])
def test_refused_with_400(doc, needle) -> None:
    with pytest.raises(TranslateError, match=needle) as info:
        t.request({"model": "gemini/gemini-embedding-001"} | doc, "gemini-embedding-001")
    assert info.value.status == 400 and "Gemini embeddings" in info.value.message


def test_user_and_unknown_fields_are_named_and_task_type_is_kept() -> None:
    call = t.request({"model": "m", "input": "a", "user": "u-1", "some_future_field": 1,
                      "task_type": "RETRIEVAL_QUERY"}, "gemini-embedding-001")
    assert call.dropped == ["user", "some_future_field"]
    assert call.body == {"content": {"parts": [{"text": "a"}]}, "taskType": "RETRIEVAL_QUERY"}


@pytest.mark.parametrize("gemini_status,status,want_status,want_type", [
    ("INVALID_ARGUMENT", 400, 400, "invalid_request_error"), ("UNAUTHENTICATED", 401, 401, "authentication_error"),
    ("PERMISSION_DENIED", 403, 403, "permission_error"), ("NOT_FOUND", 404, 404, "not_found_error"),
    ("RESOURCE_EXHAUSTED", 429, 429, "rate_limit_error"), ("INTERNAL", 500, 500, "server_error"),
    ("UNAVAILABLE", 503, 503, "server_error"), ("DEADLINE_EXCEEDED", 504, 504, "server_error"),
    ("SOMETHING_NEW", 418, 418, "something_new")])
def test_error_status(gemini_status, status, want_status, want_type) -> None:
    got, body = t.error(status, {"error": {"code": status, "message": "m", "status": gemini_status}})
    assert (got, body["error"]["type"], body["error"]["code"], body["error"]["message"]) == (
        want_status, want_type, gemini_status, "m")


def test_error_not_in_gemini_shape_keeps_its_text() -> None:
    got, body = t.error(502, "<html>bad gateway</html>")
    assert got == 502 and body["error"]["message"] == "<html>bad gateway</html>"
    got, body = t.error(400, [{"error": {"code": 400, "message": "x", "status": "INVALID_ARGUMENT"}}])
    assert got == 400 and body["error"]["message"] == "x"


# ---------------------------------------------------------------- the openai SDK over MockTransport

def fake_gemini(method: str, body: dict, model: str) -> dict:
    """Gemini's reply shape for the translated call: values derived from each text, float32-exact."""
    def values(text: str) -> list[float]:
        return as_float32([len(text) / 8, -0.25, 1 / 3])
    if method == "embedContent":
        return {"embedding": {"values": values(body["content"]["parts"][0]["text"])}}
    assert {r["model"] for r in body["requests"]} == {f"models/{model}"}
    return {"embeddings": [{"values": values(r["content"]["parts"][0]["text"])} for r in body["requests"]],
            "usageMetadata": {"promptTokenCount": 7}}


def sdk_client(seen: list, upstream_error: tuple[int, dict] | None = None) -> openai.OpenAI:
    """An openai client whose transport runs the translator both ways against a Gemini stand-in."""
    def handler(request: httpx.Request) -> httpx.Response:
        doc = json.loads(request.content)
        seen.append(doc)
        model = doc["model"].split("/", 1)[1]
        try:
            call = t.request(doc, model)
        except TranslateError as exc:
            return httpx.Response(exc.status, json={"error": {"message": exc.message, "type": "invalid_request_error",
                                                             "param": None, "code": None}})
        if upstream_error:
            status, body = t.error(*upstream_error)
            return httpx.Response(status, json=body)
        return httpx.Response(200, json=t.response(fake_gemini(call.method, call.body, model), model,
                                                   call.encoding_format))
    return openai.OpenAI(api_key="x", base_url="http://sidecar.test/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_openai_sdk_default_base64_parses_to_the_gemini_floats() -> None:
    seen: list = []
    got = sdk_client(seen).embeddings.create(model="gemini/gemini-embedding-001", input=["hi", "hello!!"])
    assert seen[0]["encoding_format"] == "base64"  # the SDK asks for base64 unless told otherwise
    want = [as_float32([n / 8, -0.25, 1 / 3]) for n in (2, 7)]
    assert [d.embedding for d in got.data] == want
    assert [d.index for d in got.data] == [0, 1]
    assert got.model == "gemini-embedding-001"
    assert (got.usage.prompt_tokens, got.usage.total_tokens) == (7, 7)


def test_openai_sdk_float_and_dimensions() -> None:
    seen: list = []
    got = sdk_client(seen).embeddings.create(model="gemini/gemini-embedding-001", input="hi",
                                             encoding_format="float", dimensions=3)
    assert seen[0]["dimensions"] == 3
    assert got.data[0].embedding == as_float32([0.25, -0.25, 1 / 3])
    assert got.usage.prompt_tokens == 0  # embedContent here reported no usage


def test_openai_sdk_raises_on_a_refused_token_array() -> None:
    with pytest.raises(openai.BadRequestError, match="token array"):
        sdk_client([]).embeddings.create(model="gemini/gemini-embedding-001", input=[[1, 2, 3]])


@pytest.mark.parametrize("case,exc", [("error", openai.RateLimitError), ("error_api_key", openai.AuthenticationError)])
def test_openai_sdk_raises_the_right_error(case, exc) -> None:
    status = int((GOLDEN / f"{case}.upstream.status").read_text())
    upstream = load(case, "upstream.json")
    with pytest.raises(exc) as info:
        sdk_client([], (status, upstream)).embeddings.create(model="gemini/gemini-embedding-001", input="a")
    assert info.value.message.endswith(upstream["error"]["message"])
