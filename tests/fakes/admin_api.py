"""Fake OpenAI and Anthropic admin APIs (usage and cost reports), in their documented shapes, with pagination.

    api = FakeAdminApi(admin_key="sk-admin-...", page_size=2).start()   # a thread on loopback
    api.events.append(UsageEvent(at, "gpt-4o-mini", uncached_input=10, output=5, costs={"input": Decimal(...)}))
    api.base_url; api.requests   # every request seen: (path, query as lists)
    api.stop()

The fake aggregates the events it holds the way the provider does: into buckets of the asked
width, grouped by the asked dimensions, filtered by the asked ids, `limit` buckets per page (or
fewer: `page_size` caps it, to force pagination) with has_more / next_page. OpenAI cost amounts
are JSON numbers written from Decimal text; Anthropic's are decimal strings in cents.
"""
from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

WIDTHS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # (default, max) buckets per page
OPENAI_USAGE_KINDS = ("completions", "embeddings", "images", "audio_speeches", "audio_transcriptions", "moderations")
# group_by values each OpenAI usage endpoint takes beyond project_id, user_id, api_key_id and model
OPENAI_GROUPS = {"completions": ("batch", "service_tier"), "images": ("size", "source")}


@dataclass
class UsageEvent:
    """One request as the provider saw it. OpenAI's input_tokens = uncached_input + cache_read.
    `costs`: dollars per line item: OpenAI kinds ("input", "cached input", "output"), Anthropic
    token types ("uncached_input_tokens", "output_tokens", ...)."""

    at: datetime
    model: str
    uncached_input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    images: int = 0  # OpenAI images
    characters: int = 0  # OpenAI audio_speeches
    seconds: int = 0  # OpenAI audio_transcriptions
    requests: int = 1
    kind: str = "completions"  # OpenAI usage endpoint
    project_id: str | None = None
    api_key_id: str | None = None
    workspace_id: str | None = None
    costs: dict[str, Decimal] = field(default_factory=dict)


class _Raw(str):
    """JSON text written as is: an exact decimal number."""


def dumps(doc: Any) -> bytes:
    raws: list[str] = []

    def enc(o: Any) -> Any:
        if isinstance(o, Decimal):
            raws.append(f"{o:f}")
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(o))

    text = json.dumps(doc, default=enc)
    return re.sub(r'"\\u0000raw(\d+)\\u0000"', lambda m: raws[int(m.group(1))], text).encode()


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body


class FakeAdminApi:
    def __init__(self, admin_key: str, page_size: int | None = None) -> None:
        self.admin_key = admin_key
        self.page_size = page_size
        self.events: list[UsageEvent] = []
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeAdminApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                query = {k.removesuffix("[]"): v for k, v in parse_qs(url.query).items()}
                api.requests.append((url.path, query))
                try:
                    status, body = 200, api.handle(url.path, query, {k.lower(): v for k, v in self.headers.items()})
                except ApiError as e:
                    status, body = e.status, e.body
                data = dumps(body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # --- routing and auth

    def handle(self, path: str, query: dict[str, list[str]], headers: dict[str, str]) -> dict[str, Any]:
        if path.startswith("/v1/organization/"):
            if headers.get("authorization") != f"Bearer {self.admin_key}":
                given = headers.get("authorization", "").removeprefix("Bearer ")
                # the message quotes the key as sent: the client must keep it out of what it prints
                raise ApiError(401, {"error": {"message": f"Incorrect API key provided: {given}.",
                                               "type": "invalid_request_error", "param": None,
                                               "code": "invalid_api_key"}})
            if path == "/v1/organization/costs":
                return self.openai_costs(query)
            kind = path.removeprefix("/v1/organization/usage/")
            if kind in OPENAI_USAGE_KINDS:
                return self.openai_usage(kind, query)
            raise ApiError(404, {"error": {"message": f"Invalid URL (GET {path})", "type": "invalid_request_error"}})
        if path.startswith("/v1/organizations/"):
            if headers.get("x-api-key") != self.admin_key:
                raise ApiError(401, {"type": "error", "error": {"type": "authentication_error",
                                                                "message": "invalid x-api-key"}})
            if "anthropic-version" not in headers:
                raise ApiError(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                "message": "anthropic-version: header is required"}})
            if path == "/v1/organizations/usage_report/messages":
                return self.anthropic_usage(query)
            if path == "/v1/organizations/cost_report":
                return self.anthropic_costs(query)
        raise ApiError(404, {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}})

    # --- shared: buckets, filters, pages

    def _buckets(self, start: datetime, end: datetime, width: str) -> list[tuple[datetime, datetime]]:
        step = WIDTHS[width]
        t = datetime.fromtimestamp(start.timestamp() // step.total_seconds() * step.total_seconds(), timezone.utc)
        out = []
        while t < end:
            out.append((t, t + step))
            t += step
        return out

    def _page(self, buckets: list[Any], query: dict[str, list[str]], default: int, maximum: int, bad) -> tuple[list[Any], bool, str | None]:
        limit = int(_one(query, "limit") or default)
        if not 1 <= limit <= maximum:
            raise bad(f"limit must be between 1 and {maximum}")
        if self.page_size:
            limit = min(limit, self.page_size)
        page = _one(query, "page")
        offset = int(base64.b64decode(page).decode()) if page else 0
        chunk = buckets[offset:offset + limit]
        more = offset + limit < len(buckets)
        return chunk, more, base64.b64encode(str(offset + limit).encode()).decode() if more else None

    def _events(self, start: datetime, end: datetime, query: dict[str, list[str]], ids: dict[str, str]) -> list[UsageEvent]:
        out = [e for e in self.events if start <= e.at < end]
        for param, attr in ids.items():
            if param in query:
                out = [e for e in out if getattr(e, attr) in query[param]]
        return out

    # --- OpenAI

    @staticmethod
    def _openai_bad(message: str) -> ApiError:
        return ApiError(400, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})

    def _openai_window(self, query: dict[str, list[str]]) -> tuple[datetime, datetime]:
        if not _one(query, "start_time"):
            raise self._openai_bad("start_time is required")
        start = datetime.fromtimestamp(int(_one(query, "start_time")), timezone.utc)
        end = datetime.fromtimestamp(int(_one(query, "end_time")), timezone.utc) if _one(query, "end_time") \
            else datetime.now(timezone.utc)
        return start, end

    def openai_usage(self, kind: str, query: dict[str, list[str]]) -> dict[str, Any]:
        start, end = self._openai_window(query)
        width = _one(query, "bucket_width") or "1d"
        if width not in WIDTHS:
            raise self._openai_bad(f"invalid bucket_width {width!r}")
        groups = query.get("group_by", [])
        allowed = {"project_id", "user_id", "api_key_id", "model", *OPENAI_GROUPS.get(kind, ())}
        if set(groups) - allowed:
            raise self._openai_bad(f"invalid group_by {sorted(set(groups) - allowed)[0]!r}")
        events = [e for e in self._events(start, end, query, {"project_ids": "project_id", "api_key_ids": "api_key_id",
                                                                "models": "model"}) if e.kind == kind]
        chunk, more, token = self._page(self._buckets(start, end, width), query, *LIMITS[width], self._openai_bad)
        data = []
        for b_start, b_end in chunk:
            grouped: dict[tuple, dict[str, Any]] = {}
            for e in events:
                if not b_start <= e.at < b_end:
                    continue
                dims = {"project_id": e.project_id, "user_id": None, "api_key_id": e.api_key_id, "model": e.model,
                        "batch": None, "service_tier": None, "size": "1024x1024", "source": "image.generation"}
                key = tuple(dims[g] for g in groups)
                r = grouped.setdefault(key, self._openai_result(kind, {g: dims[g] for g in groups}))
                r["num_model_requests"] += e.requests
                if kind in ("completions", "embeddings", "moderations"):
                    r["input_tokens"] += e.uncached_input + e.cache_read
                if kind == "completions":
                    r["input_cached_tokens"] += e.cache_read
                    r["output_tokens"] += e.output
                elif kind == "images":
                    r["images"] += e.images
                elif kind == "audio_speeches":
                    r["characters"] += e.characters
                elif kind == "audio_transcriptions":
                    r["seconds"] += e.seconds
            data.append({"object": "bucket", "start_time": int(b_start.timestamp()), "end_time": int(b_end.timestamp()),
                         "results": list(grouped.values())})
        return {"object": "page", "data": data, "has_more": more, "next_page": token}

    @staticmethod
    def _openai_result(kind: str, dims: dict[str, Any]) -> dict[str, Any]:
        r: dict[str, Any] = {"object": f"organization.usage.{kind}.result", "num_model_requests": 0}
        if kind in ("completions", "embeddings", "moderations"):
            r["input_tokens"] = 0
        if kind == "completions":
            r.update({"output_tokens": 0, "input_cached_tokens": 0, "input_audio_tokens": 0, "output_audio_tokens": 0,
                      "batch": None, "service_tier": None})
        elif kind == "images":
            r.update({"images": 0, "size": None, "source": None})
        elif kind == "audio_speeches":
            r["characters"] = 0
        elif kind == "audio_transcriptions":
            r["seconds"] = 0
        r.update({"project_id": None, "user_id": None, "api_key_id": None, "model": None})
        r.update(dims)
        return r

    def openai_costs(self, query: dict[str, list[str]]) -> dict[str, Any]:
        start, end = self._openai_window(query)
        if (_one(query, "bucket_width") or "1d") != "1d":
            raise self._openai_bad("bucket_width: only 1d is supported")
        groups = query.get("group_by", [])
        if set(groups) - {"project_id", "line_item"}:
            raise self._openai_bad("group_by: only project_id and line_item are supported")
        events = self._events(start, end, query, {"project_ids": "project_id"})
        chunk, more, token = self._page(self._buckets(start, end, "1d"), query, 7, 180, self._openai_bad)
        data = []
        for b_start, b_end in chunk:
            grouped: dict[tuple, dict[str, Any]] = {}
            for e in events:
                if not b_start <= e.at < b_end:
                    continue
                for item, usd in e.costs.items():
                    dims = {"line_item": f"{e.model}, {item}", "project_id": e.project_id}
                    key = tuple(dims[g] for g in groups)
                    r = grouped.setdefault(key, {"object": "organization.costs.result",
                                                 "amount": {"value": Decimal(0), "currency": "usd"},
                                                 "line_item": None, "project_id": None, **{g: dims[g] for g in groups}})
                    r["amount"]["value"] += usd
            data.append({"object": "bucket", "start_time": int(b_start.timestamp()), "end_time": int(b_end.timestamp()),
                         "results": list(grouped.values())})
        return {"object": "page", "data": data, "has_more": more, "next_page": token}

    # --- Anthropic

    @staticmethod
    def _anthropic_bad(message: str) -> ApiError:
        return ApiError(400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}})

    def _anthropic_window(self, query: dict[str, list[str]]) -> tuple[datetime, datetime]:
        if not _one(query, "starting_at"):
            raise self._anthropic_bad("starting_at: Field required")
        start = _parse_rfc3339(_one(query, "starting_at"))
        end = _parse_rfc3339(_one(query, "ending_at")) if _one(query, "ending_at") else datetime.now(timezone.utc)
        return start, end

    def anthropic_usage(self, query: dict[str, list[str]]) -> dict[str, Any]:
        start, end = self._anthropic_window(query)
        width = _one(query, "bucket_width") or "1d"
        if width not in WIDTHS:
            raise self._anthropic_bad(f"bucket_width: invalid value {width!r}")
        groups = query.get("group_by", [])
        allowed = {"api_key_id", "workspace_id", "model", "service_tier", "context_window", "inference_geo"}
        if set(groups) - allowed:
            raise self._anthropic_bad(f"group_by: invalid value {sorted(set(groups) - allowed)[0]!r}")
        events = self._events(start, end, query, {"api_key_ids": "api_key_id", "workspace_ids": "workspace_id",
                                                   "models": "model"})
        chunk, more, token = self._page(self._buckets(start, end, width), query, *LIMITS[width], self._anthropic_bad)
        data = []
        for b_start, b_end in chunk:
            grouped: dict[tuple, dict[str, Any]] = {}
            for e in events:
                if not b_start <= e.at < b_end:
                    continue
                dims = {"api_key_id": e.api_key_id, "workspace_id": e.workspace_id, "model": e.model,
                        "service_tier": "standard", "context_window": "0-200k", "inference_geo": "global"}
                key = tuple(dims[g] for g in groups)
                r = grouped.setdefault(key, {
                    "uncached_input_tokens": 0,
                    "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
                    "cache_read_input_tokens": 0, "output_tokens": 0, "server_tool_use": {"web_search_requests": 0},
                    "api_key_id": None, "workspace_id": None, "model": None, "service_tier": None,
                    "context_window": None, "inference_geo": None, **{g: dims[g] for g in groups}})
                r["uncached_input_tokens"] += e.uncached_input
                r["cache_creation"]["ephemeral_5m_input_tokens"] += e.cache_write_5m
                r["cache_creation"]["ephemeral_1h_input_tokens"] += e.cache_write_1h
                r["cache_read_input_tokens"] += e.cache_read
                r["output_tokens"] += e.output
            data.append({"starting_at": _rfc3339(b_start), "ending_at": _rfc3339(b_end), "results": list(grouped.values())})
        return {"data": data, "has_more": more, "next_page": token}

    def anthropic_costs(self, query: dict[str, list[str]]) -> dict[str, Any]:
        start, end = self._anthropic_window(query)
        if (_one(query, "bucket_width") or "1d") != "1d":
            raise self._anthropic_bad("bucket_width: only 1d is supported")
        groups = query.get("group_by", [])
        if set(groups) - {"workspace_id", "description"}:
            raise self._anthropic_bad("group_by: only workspace_id and description are supported")
        events = self._events(start, end, query, {"workspace_ids": "workspace_id"})
        chunk, more, token = self._page(self._buckets(start, end, "1d"), query, 7, 31, self._anthropic_bad)
        by_description = "description" in groups
        data = []
        for b_start, b_end in chunk:
            grouped: dict[tuple, dict[str, Any]] = {}
            for e in events:
                if not b_start <= e.at < b_end:
                    continue
                for token_type, usd in e.costs.items():
                    desc = f"{e.model} {token_type}"
                    key = (desc if by_description else None, e.workspace_id if "workspace_id" in groups else None)
                    r = grouped.setdefault(key, {
                        "currency": "USD", "amount": Decimal(0),
                        "workspace_id": key[1], "description": key[0],
                        "cost_type": "tokens" if by_description else None,
                        "context_window": "0-200k" if by_description else None,
                        "model": e.model if by_description else None,
                        "service_tier": "standard" if by_description else None,
                        "token_type": token_type if by_description else None,
                        "inference_geo": None})
                    r["amount"] += usd * 100  # cents
            results = [{**r, "amount": f"{r['amount']:f}"} for r in grouped.values()]  # a decimal string in cents
            data.append({"starting_at": _rfc3339(b_start), "ending_at": _rfc3339(b_end), "results": results})
        return {"data": data, "has_more": more, "next_page": token}


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)
