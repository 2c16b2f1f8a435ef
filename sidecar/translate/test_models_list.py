"""Tests for the `GET /v1/models` builder: both formats, paging, and the openai and anthropic SDKs'
own `client.models.list()` parsing the output over an httpx MockTransport."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import anthropic
import httpx2 as httpx
import openai
import pytest
from multidict import MultiDict

from sidecar.translate import models_list as m
from sidecar.translate.base import TranslateError

ENTRIES = [
    m.ModelEntry("anthropic", "claude-sonnet-4-5", "anthropic"),
    ("openai", "gpt-4o-mini", "openai"),  # a plain tuple is an entry too
    ("gemini", "gemini-2.5-flash", "google"),
    ("gemini", "gemini-embedding-001", "google"),
    ("openai", "gpt-4o-mini", "openai"),  # listed twice in the config: once in the reply
]
ROUTES = ["chat-default", "cheap"]
IDS = ["chat-default", "cheap", "anthropic/claude-sonnet-4-5", "openai/gpt-4o-mini",
       "gemini/gemini-2.5-flash", "gemini/gemini-embedding-001"]


def test_openai_format() -> None:
    got = m.openai_list(ENTRIES, ROUTES)
    assert got["object"] == "list"
    assert [d["id"] for d in got["data"]] == IDS
    assert got["data"][0] == {"id": "chat-default", "object": "model", "created": 0, "owned_by": "meterline"}
    assert got["data"][2] == {"id": "anthropic/claude-sonnet-4-5", "object": "model", "created": 0,
                              "owned_by": "anthropic"}
    assert [d["owned_by"] for d in got["data"]][4:] == ["google", "google"]


def test_anthropic_format_one_page() -> None:
    got = m.anthropic_list(ENTRIES, ROUTES)
    assert [d["id"] for d in got["data"]] == IDS
    assert got["data"][2] == {"type": "model", "id": "anthropic/claude-sonnet-4-5",
                              "display_name": "anthropic/claude-sonnet-4-5",
                              "created_at": "1970-01-01T00:00:00Z", "lifecycle": "active"}
    assert (got["has_more"], got["first_id"], got["last_id"]) == (False, IDS[0], IDS[-1])


def test_anthropic_paging_both_ways() -> None:
    page = m.anthropic_list(ENTRIES, ROUTES, limit="4")
    assert [d["id"] for d in page["data"]] == IDS[:4] and page["has_more"] is True
    page = m.anthropic_list(ENTRIES, ROUTES, limit=4, after_id=page["last_id"])
    assert [d["id"] for d in page["data"]] == IDS[4:] and page["has_more"] is False
    back = m.anthropic_list(ENTRIES, ROUTES, limit=2, before_id=IDS[4])
    assert [d["id"] for d in back["data"]] == IDS[2:4] and back["has_more"] is True
    back = m.anthropic_list(ENTRIES, ROUTES, limit=2, before_id=back["first_id"])
    assert [d["id"] for d in back["data"]] == IDS[:2] and back["has_more"] is False
    empty = m.anthropic_list([], [])
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}


@pytest.mark.parametrize("kwargs,needle", [
    ({"limit": "0"}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "ten"}, "limit"),
    ({"after_id": "nope"}, "after_id"), ({"before_id": "nope"}, "before_id"),
    ({"after_id": "cheap", "before_id": "cheap"}, "together")])
def test_anthropic_bad_query_is_a_400(kwargs, needle) -> None:
    with pytest.raises(TranslateError, match=needle) as info:
        m.anthropic_list(ENTRIES, ROUTES, **kwargs)
    assert info.value.status == 400


def test_format_follows_the_anthropic_version_header() -> None:
    assert m.models_list(ENTRIES, ROUTES, {"Authorization": "Bearer x"})["object"] == "list"
    got = m.models_list(ENTRIES, ROUTES, {"Anthropic-Version": "2023-06-01"}, {"limit": "1"})
    assert [d["id"] for d in got["data"]] == ["chat-default"] and got["has_more"] is True
    # Every listed model is active: a filter for retired models only lists none.
    retired = m.models_list(ENTRIES, ROUTES, {"anthropic-version": "2023-06-01"},
                            MultiDict([("lifecycle[]", "retired")]))
    assert retired["data"] == []
    both = m.models_list(ENTRIES, ROUTES, {"anthropic-version": "2023-06-01"},
                         MultiDict([("lifecycle[]", "retired"), ("lifecycle[]", "active")]))
    assert len(both["data"]) == len(IDS)


# ---------------------------------------------------------------- the SDKs over MockTransport

def transport(seen: list) -> httpx.MockTransport:
    """A sidecar stand-in: GET /v1/models (models_list) and /v1/models/{id} (retrieve), in the
    format the request's own headers ask for."""
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        seen.append(request)
        path = request.url.raw_path.decode().partition("?")[0]
        try:
            if path == "/v1/models":
                body = m.models_list(ENTRIES, ROUTES, request.headers, MultiDict(request.url.params.multi_items()))
            else:
                assert path.startswith("/v1/models/")
                body = m.retrieve(ENTRIES, ROUTES, path[len("/v1/models/"):],
                                  m.wants_anthropic(request.headers))
        except TranslateError as exc:  # each client's own error shape
            if m.wants_anthropic(request.headers):
                return httpx.Response(exc.status, json={"type": "error", "error": {
                    "type": "invalid_request_error", "message": exc.message}})
            return httpx.Response(exc.status, json={"error": {
                "message": exc.message, "type": "invalid_request_error", "param": None, "code": None}})
        return httpx.Response(200, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return httpx.MockTransport(handler)


def test_openai_sdk_lists_the_models() -> None:
    seen: list = []
    client = openai.OpenAI(api_key="x", base_url="http://sidecar.test/v1",
                           http_client=httpx.Client(transport=transport(seen)))
    models = list(client.models.list())
    owners = ["meterline", "meterline", "anthropic", "openai", "google", "google"]
    assert [(x.id, x.owned_by, x.created, x.object) for x in models] == [
        (i, o, 0, "model") for i, o in zip(IDS, owners, strict=True)]
    assert len(seen) == 1 and "anthropic-version" not in seen[0].headers


def test_anthropic_sdk_lists_the_models_across_pages() -> None:
    seen: list = []
    client = anthropic.Anthropic(api_key="x", base_url="http://sidecar.test",
                                 http_client=httpx.Client(transport=transport(seen)))
    models = list(client.models.list(limit=4))  # auto-pagination follows last_id
    assert [x.id for x in models] == IDS
    assert len(seen) == 2 and seen[1].url.params["after_id"] == IDS[3]
    first = models[2]
    assert (first.type, first.display_name, first.lifecycle) == ("model", "anthropic/claude-sonnet-4-5", "active")
    assert first.created_at == datetime(1970, 1, 1, tzinfo=timezone.utc)


def test_anthropic_sdk_lifecycle_filter_and_bad_limit() -> None:
    client = anthropic.Anthropic(api_key="x", base_url="http://sidecar.test", max_retries=0,
                                 http_client=httpx.Client(transport=transport([])))
    assert list(client.models.list(lifecycle=["retired"])) == []
    assert len(list(client.models.list(lifecycle=["active", "deprecated"]))) == len(IDS)
    with pytest.raises(anthropic.BadRequestError, match="limit"):
        client.models.list(limit=5000)


def test_retrieve_in_both_formats_and_404() -> None:
    assert m.retrieve(ENTRIES, ROUTES, "cheap") == {"id": "cheap", "object": "model", "created": 0,
                                                     "owned_by": "meterline"}
    assert m.retrieve(ENTRIES, ROUTES, "gemini%2Fgemini-2.5-flash", anthropic=True)["id"] == "gemini/gemini-2.5-flash"
    with pytest.raises(TranslateError, match="not a route") as info:
        m.retrieve(ENTRIES, ROUTES, "openai/gpt-5")
    assert info.value.status == 404


def test_sdks_retrieve_an_upstream_model_by_its_slashed_id() -> None:
    seen: list = []
    oa = openai.OpenAI(api_key="x", base_url="http://sidecar.test/v1", max_retries=0,
                       http_client=httpx.Client(transport=transport(seen)))
    got = oa.models.retrieve("anthropic/claude-sonnet-4-5")
    assert (got.id, got.owned_by) == ("anthropic/claude-sonnet-4-5", "anthropic")
    assert seen[-1].url.raw_path == b"/v1/models/anthropic%2Fclaude-sonnet-4-5"  # why retrieve unquotes
    an = anthropic.Anthropic(api_key="x", base_url="http://sidecar.test", max_retries=0,
                             http_client=httpx.Client(transport=transport(seen)))
    info = an.models.retrieve("gemini/gemini-embedding-001")
    assert (info.id, info.type) == ("gemini/gemini-embedding-001", "model")
    with pytest.raises(openai.NotFoundError, match="not a route"):
        oa.models.retrieve("openai/gpt-5")
