"""End to end, Gemini API: generateContent, streamGenerateContent (SSE via the SDK and the JSON-array
stream via raw HTTP), embedContent / batchEmbedContents, and a `?key=` API key that is never stored."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.genai import types as gtypes

from tests.fakes import reply_text
from tests.fakes.tokens import CACHE_READ_TOKENS

if TYPE_CHECKING:
    from conftest import E2E

BODY = {"contents": [{"role": "user", "parts": [{"text": "Say hello to the meter."}]}]}
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_generate_content(e2e: E2E) -> None:
    case = e2e.case("cache,reasoning")
    client = e2e.gemini(case)  # keep a reference: a collected client closes its connection pool
    response = client.models.generate_content(model="gemini-2.5-flash", contents="hello")
    ex = e2e.exchange(case)
    doc = json.loads(ex.response_body)
    assert response.text == reply_text(5) and response.response_id == ex.response_id
    assert response.model_version == "gemini-2.5-flash"
    assert response.usage_metadata is not None
    assert response.usage_metadata.model_dump(by_alias=True, exclude_none=True, mode="json") == ex.usage

    m = ex.usage
    row = e2e.row(case)
    e2e.expect(row, upstream="gemini", provider="google", operation="generate_content", endpoint=ex.path,
               request_model="gemini-2.5-flash", response_model=doc["modelVersion"], response_id=doc["responseId"],
               stream=False, status_code=200, outcome="ok", error_type=None, finish_reason="STOP",
               input_tokens=m["promptTokenCount"], cache_read_tokens=CACHE_READ_TOKENS,
               output_tokens=m["candidatesTokenCount"] + m["thoughtsTokenCount"], reasoning_tokens=160,
               request_bytes=len(ex.request_body), response_bytes=len(ex.response_body), anomaly=None)
    assert m["promptTokenCount"] > CACHE_READ_TOKENS
    e2e.expect_cost(row, e2e.extract(doc, "google"), "gemini-2.5-flash", "google")


def test_generate_content_raw_bytes(e2e: E2E) -> None:
    case = e2e.case("cache")
    got = e2e.raw("/gemini/v1beta/models/gemini-2.0-flash:generateContent", BODY,
                  {"x-goog-api-key": "gm-raw"}, case=case)
    ex = e2e.exchange(case)
    assert (got.status, got.body) == (200, ex.response_body)
    assert got.headers["content-type"] == ex.response_headers["content-type"]
    row = e2e.row(case)
    e2e.expect(row, endpoint="/v1beta/models/gemini-2.0-flash:generateContent", outcome="ok",
               input_tokens=ex.usage["promptTokenCount"], output_tokens=20, cache_read_tokens=CACHE_READ_TOKENS)
    e2e.expect_cost(row, e2e.extract(json.loads(ex.response_body), "google"), "gemini-2.0-flash", "google")


def test_stream_sse_via_sdk(e2e: E2E) -> None:
    case = e2e.case(chunks=4)
    client = e2e.gemini(case)
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="hello"))
    ex = e2e.exchange(case)
    assert ex.query_string == "alt=sse"
    assert "".join(c.text or "" for c in chunks) == reply_text(4)
    assert [c.usage_metadata.candidates_token_count for c in chunks] == [None, None, None, 16]  # type: ignore[union-attr]
    assert chunks[-1].usage_metadata.model_dump(by_alias=True, exclude_none=True, mode="json") == ex.usage  # type: ignore[union-attr]

    row = e2e.row(case)
    e2e.expect(row, operation="generate_content", endpoint=f"{ex.path}?alt=sse", request_model="gemini-2.5-flash",
               response_model="gemini-2.5-flash", response_id=ex.response_id, stream=True, status_code=200,
               outcome="ok", finish_reason="STOP", input_tokens=ex.usage["promptTokenCount"], output_tokens=16,
               cache_read_tokens=None, reasoning_tokens=None, response_bytes=len(ex.response_body), anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usageMetadata": ex.usage, "modelVersion": "gemini-2.5-flash"}, "google"),
                    "gemini-2.5-flash", "google")


def test_stream_sse_raw_bytes(e2e: E2E) -> None:
    case = e2e.case("reasoning")
    got = e2e.raw("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", BODY,
                  {"x-goog-api-key": "gm-raw"}, case=case)
    ex = e2e.exchange(case)
    assert (got.status, got.body) == (200, ex.response_body) and got.body.count(b"\r\n\r\n") == 5
    assert got.headers["content-type"] == "text/event-stream"
    row = e2e.row(case)
    e2e.expect(row, stream=True, outcome="ok", output_tokens=20 + 160, reasoning_tokens=160)
    e2e.expect_cost(row, e2e.extract({"usageMetadata": ex.usage, "modelVersion": "gemini-2.5-flash"}, "google"),
                    "gemini-2.5-flash", "google")


def test_stream_json_array(e2e: E2E) -> None:
    case = e2e.case("cache", chunks=6)
    got = e2e.raw("/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent", BODY,
                  {"x-goog-api-key": "gm-raw"}, case=case)
    ex = e2e.exchange(case)
    assert (got.status, got.body) == (200, ex.response_body)
    elements = json.loads(got.body)
    assert len(elements) == 6 and elements[-1]["usageMetadata"] == ex.usage

    row = e2e.row(case)
    e2e.expect(row, operation="generate_content", endpoint="/v1beta/models/gemini-2.0-flash:streamGenerateContent",
               stream=True, outcome="ok", response_id=ex.response_id, response_model="gemini-2.0-flash",
               finish_reason="STOP", input_tokens=ex.usage["promptTokenCount"], cache_read_tokens=CACHE_READ_TOKENS,
               output_tokens=24, response_bytes=len(ex.response_body), anomaly=None)
    e2e.expect_cost(row, e2e.extract(elements[-1], "google"), "gemini-2.0-flash", "google")


def test_batch_embed_contents_with_usage(e2e: E2E) -> None:
    case = e2e.case()
    client = e2e.gemini(case)
    result = client.models.embed_content(
        model="gemini-embedding-2", contents="alpha", config=gtypes.EmbedContentConfig(output_dimensionality=16))
    ex = e2e.exchange(case)
    assert ex.endpoint == "batchEmbedContents" and ex.usage is not None  # the SDK batches even one text
    assert result.embeddings and result.embeddings[0].values == json.loads(ex.response_body)["embeddings"][0]["values"]
    assert result.usage_metadata is not None and result.usage_metadata.prompt_token_count == ex.usage["promptTokenCount"]

    row = e2e.row(case)
    e2e.expect(row, operation="embeddings", endpoint=ex.path, request_model="gemini-embedding-2", outcome="ok",
               input_tokens=ex.usage["promptTokenCount"], output_tokens=0, anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usageMetadata": ex.usage, "modelVersion": "gemini-embedding-2"}, "google"),
                    "gemini-embedding-2", "google")


def test_embed_content_raw_bytes(e2e: E2E) -> None:
    case = e2e.case()
    got = e2e.raw("/gemini/v1beta/models/gemini-embedding-2:embedContent", {"content": {"parts": [{"text": "alpha"}]}},
                  {"x-goog-api-key": "gm-raw"}, case=case)
    ex = e2e.exchange(case)
    assert (got.status, got.body) == (200, ex.response_body) and ex.usage is not None
    row = e2e.row(case)
    e2e.expect(row, operation="embeddings", endpoint="/v1beta/models/gemini-embedding-2:embedContent",
               outcome="ok", input_tokens=ex.usage["promptTokenCount"], output_tokens=0, anomaly=None)
    e2e.expect_cost(row, e2e.extract({"usageMetadata": ex.usage, "modelVersion": "gemini-embedding-2"}, "google"),
                    "gemini-embedding-2", "google")


def test_batch_embed_contents_without_usage(e2e: E2E) -> None:
    case = e2e.case()
    client = e2e.gemini(case)
    result = client.models.embed_content(model="gemini-embedding-001", contents=["alpha", "beta"])
    ex = e2e.exchange(case)
    assert ex.endpoint == "batchEmbedContents" and ex.usage is None
    assert result.embeddings and [e.values for e in result.embeddings] == [
        e["values"] for e in json.loads(ex.response_body)["embeddings"]]

    row = e2e.row(case)
    # the API reports no usage for this model: nothing to price, and the row says why
    e2e.expect(row, operation="embeddings", endpoint=ex.path, request_model="gemini-embedding-001", outcome="ok",
               status_code=200, input_tokens=None, output_tokens=None, anomaly="no_usage")
    e2e.expect_unpriced(row, source=None)


def test_query_api_key_is_never_stored(e2e: E2E) -> None:
    secret = "AIzaSyQueryKey0123456789SECRET"
    case = e2e.case()
    got = e2e.raw(f"/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key={secret}", BODY,
                  case=case)
    ex = e2e.exchange(case)
    assert got.status == 200 and got.body == ex.response_body
    assert ex.query["key"] == secret  # the provider still gets it

    row = e2e.row(case)
    assert row["endpoint"] == "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=REDACTED"
    assert row["key_fingerprint"] and row["key_fingerprint"].startswith("fp_")
    # the same key sent as a header is the same caller
    header_case = e2e.case()
    e2e.raw("/gemini/v1beta/models/gemini-2.0-flash:generateContent", BODY, {"x-goog-api-key": secret},
            case=header_case)
    assert e2e.row(header_case)["key_fingerprint"] == row["key_fingerprint"]

    # every column of every table of the ledger
    tables = [r["table_name"] for r in e2e.sidecar.sql("SELECT table_name FROM information_schema.tables")]
    assert "calls" in tables
    for table in tables:
        dump = json.dumps(e2e.sidecar.sql(f"SELECT * FROM {table}"), default=str)
        assert secret not in dump, f"the key is stored in table {table}"
    # the journal (which holds this call's records), the database files and the sidecar's log
    journal = Path(f"{e2e.sidecar.db}.journal")
    segments = b"".join(p.read_bytes() for p in journal.rglob("*") if p.is_file())  # w0/: the forwarder's
    assert row["call_id"].encode() in segments
    assert secret.encode() not in segments
    for path in e2e.sidecar.workdir.iterdir():
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the key is in {path.name}"


def test_count_tokens_is_recorded_free(e2e: E2E) -> None:
    case = e2e.case()
    client = e2e.gemini(case)
    counted = client.models.count_tokens(model="gemini-2.5-flash", contents="hello")
    ex = e2e.exchange(case)
    assert counted.total_tokens == json.loads(ex.response_body)["totalTokens"]
    row = e2e.row(case)
    e2e.expect(row, provider="google", operation="count_tokens", request_model="gemini-2.5-flash", outcome="ok",
               input_tokens=None, units={"counted_tokens": counted.total_tokens}, price_source="free", anomaly=None)
    assert [Decimal(row[k]) for k in ("input_cost_usd", "output_cost_usd", "cost_usd")] == [0, 0, 0]
