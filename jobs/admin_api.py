"""Reads the providers' own usage and cost reports (OpenAI and Anthropic admin APIs), every page, into plain rows.

The admin key goes only into the request's auth header: it is scrubbed from every error message,
and nothing here logs. Amounts are parsed straight from the JSON text as Decimal (OpenAI's numbers
never pass through a float; Anthropic's cent strings are divided by 100 exactly).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Iterator

import httpx2

from exporters import http_client

from .reconcile_config import ProviderScope

# What each usage report counts that the ledger counts too (jobs/reconcile.py maps the ledger's
# operations to these kinds). OpenAI's speech report counts characters, which the ledger does not
# record: speeches compare requests (and dollars) only.
KIND_METRICS = {
    "completions": ("requests", "uncached_input", "cache_read", "output"),
    "embeddings": ("requests", "uncached_input"),
    "images": ("requests", "images"),
    "audio_speeches": ("requests",),
    "audio_transcriptions": ("requests", "seconds"),
    "messages": ("uncached_input", "cache_read", "cache_write", "output"),  # Anthropic's counts no requests
}
OPENAI_USAGE = ("completions", "embeddings", "images", "audio_speeches", "audio_transcriptions")
ANTHROPIC_VERSION = "2023-06-01"
# the largest page each bucket width allows (both providers document the same limits)
PAGE_LIMIT = {"1d": 31, "1h": 168}
OPENAI_COSTS_LIMIT = 180
MAX_PAGES = 10_000  # a provider that keeps saying has_more must not loop forever
WIDTH = {"1h": timedelta(hours=1), "1d": timedelta(days=1)}
CENT = Decimal(100)


class AdminApiError(Exception):
    """One line saying why the provider's report could not be read (never containing the key)."""


Key = tuple[datetime, str]  # (bucket start in UTC, model)


@dataclass(slots=True)
class ProviderReport:
    """The provider's side: token counts per (bucket, model) at the asked width, dollars per (day, model)."""

    usage: dict[Key, dict[str, int | Decimal]] = field(default_factory=dict)  # only the metrics its report has
    costs: dict[Key, Decimal] = field(default_factory=dict)
    pages: int = 0  # pages read, all endpoints together

    def add_usage(self, key: Key, values: dict[str, int | Decimal]) -> None:
        have = self.usage.setdefault(key, dict.fromkeys(values, 0))
        for name, value in values.items():
            have[name] = have.get(name, 0) + value

    def add_cost(self, key: Key, amount: Decimal) -> None:
        self.costs[key] = self.costs.get(key, Decimal(0)) + amount


def fetch(scope: ProviderScope, since: datetime, until: datetime, bucket: str, timeout_s: float = 30.0) -> ProviderReport:
    """The provider's usage at `bucket` width and its daily costs over [since, until)."""
    if not scope.admin_key:
        raise AdminApiError(f"no admin key for {scope.provider}")
    fetcher = _openai if scope.provider == "openai" else _anthropic
    try:
        with _client(scope, timeout_s) as client:
            return fetcher(client, scope, since, until, bucket)
    except AdminApiError as e:
        raise AdminApiError(_scrub(str(e), scope.admin_key)) from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # a page not in the documented shape
        reason = _scrub(f"{type(e).__name__}: {e}", scope.admin_key)[:200]
        raise AdminApiError(f"{scope.provider} admin API sent a report of an unexpected shape ({reason})") from None
    except httpx2.TimeoutException:
        raise AdminApiError(f"{scope.provider} admin API at {scope.base_url} did not answer within {timeout_s:g}s") from None
    except httpx2.HTTPError as e:
        reason = _scrub(str(e) or type(e).__name__, scope.admin_key)
        raise AdminApiError(f"cannot reach the {scope.provider} admin API at {scope.base_url}: {reason}") from None


def _client(scope: ProviderScope, timeout_s: float) -> httpx2.Client:
    if scope.provider == "openai":
        headers = {"authorization": f"Bearer {scope.admin_key}"}
    else:
        headers = {"x-api-key": scope.admin_key, "anthropic-version": ANTHROPIC_VERSION}
    return httpx2.Client(base_url=scope.base_url, headers=headers, follow_redirects=False,
                         mounts=http_client.LOOPBACK_DIRECT,  # as every meterline client: no env proxy to loopback
                         timeout=httpx2.Timeout(timeout_s, connect=min(timeout_s, 10.0)))


def _pages(client: httpx2.Client, path: str, params: list[tuple[str, str]], provider: str) -> Iterator[dict[str, Any]]:
    """Every page of a paginated report, following has_more / next_page."""
    page: str | None = None
    for _ in range(MAX_PAGES):
        resp = client.get(path, params=params + ([("page", page)] if page else []))
        if resp.status_code != 200:
            raise AdminApiError(f"{provider} admin API answered {resp.status_code} on {path}: {_message(resp)}")
        try:
            doc = json.loads(resp.content, parse_float=Decimal)  # money stays exact
        except ValueError:
            raise AdminApiError(f"{provider} admin API sent a body that is not JSON on {path}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise AdminApiError(f"{provider} admin API sent an unexpected page on {path} (no 'data' list)")
        yield doc
        page = doc.get("next_page")
        if not doc.get("has_more") or not page:
            return
    raise AdminApiError(f"{provider} admin API kept paginating on {path} past {MAX_PAGES} pages")


def _message(resp: httpx2.Response) -> str:
    try:
        err = resp.json().get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except Exception:  # noqa: BLE001 - any body at all: the status says enough
        message = None
    reason = resp.reason_phrase or ""
    return " ".join(str(message or reason or "no message").split())[:300]


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "[admin key]") if key else text


# --- OpenAI: /v1/organization/usage/{completions,embeddings,images,audio_*} and /v1/organization/costs

def _openai_values(kind: str, r: dict[str, Any]) -> dict[str, int | Decimal]:
    """One usage result in the ledger's terms: OpenAI's input_tokens include the cached ones."""
    values: dict[str, int | Decimal] = {"requests": int(r.get("num_model_requests") or 0)}
    if kind in ("completions", "embeddings"):
        cached = int(r.get("input_cached_tokens") or 0)
        values["uncached_input"] = int(r.get("input_tokens") or 0) - cached
        if kind == "completions":
            values["cache_read"] = cached
            values["output"] = int(r.get("output_tokens") or 0)
    elif kind == "images":
        values["images"] = int(r.get("images") or 0)
    elif kind == "audio_transcriptions":
        values["seconds"] = Decimal(r.get("seconds") or 0)  # integers, in the documented shape
    return values


def _openai(client: httpx2.Client, scope: ProviderScope, since: datetime, until: datetime, bucket: str) -> ProviderReport:
    report = ProviderReport()
    window = [("start_time", str(int(since.timestamp()))), ("end_time", str(int(until.timestamp())))]
    filters = [(name, v) for name, values in scope.filters.items() for v in values]
    for kind in OPENAI_USAGE:
        params = window + [("bucket_width", bucket), ("group_by", "model"), ("limit", str(PAGE_LIMIT[bucket]))] + filters
        for doc in _pages(client, f"/v1/organization/usage/{kind}", params, "openai"):
            report.pages += 1
            for b in doc["data"]:
                start = _from_unix(b["start_time"])
                for r in b.get("results") or []:
                    report.add_usage((start, r.get("model") or "(no model)"), _openai_values(kind, r))
    params = window + [("bucket_width", "1d"), ("group_by", "line_item"), ("limit", str(OPENAI_COSTS_LIMIT))]
    params += [(name, v) for name, values in scope.filters.items() if name == "project_ids" for v in values]
    for doc in _pages(client, "/v1/organization/costs", params, "openai"):
        report.pages += 1
        for b in doc["data"]:
            day = _from_unix(b["start_time"])
            for r in b.get("results") or []:
                amount = r.get("amount") or {}
                if str(amount.get("currency", "usd")).lower() != "usd":
                    raise AdminApiError(f"openai cost report is in {amount.get('currency')}, not USD")
                report.add_cost((day, _line_item_model(r.get("line_item"))), _decimal(amount.get("value")))
    return report


def _line_item_model(line_item: Any) -> str:
    """OpenAI's line items read "<model>, <kind>" (e.g. "gpt-4o-2024-08-06, input"): the model is before the comma."""
    if not isinstance(line_item, str) or not line_item:
        return "(no line item)"
    return line_item.split(",", 1)[0].strip()


# --- Anthropic: /v1/organizations/usage_report/messages and /v1/organizations/cost_report

def _anthropic(client: httpx2.Client, scope: ProviderScope, since: datetime, until: datetime, bucket: str) -> ProviderReport:
    report = ProviderReport()
    window = [("starting_at", _rfc3339(since)), ("ending_at", _rfc3339(until))]
    filters = [(f"{name}[]", v) for name, values in scope.filters.items() for v in values]
    params = window + [("bucket_width", bucket), ("group_by[]", "model"), ("limit", str(PAGE_LIMIT[bucket]))] + filters
    for doc in _pages(client, "/v1/organizations/usage_report/messages", params, "anthropic"):
        report.pages += 1
        for b in doc["data"]:
            start = _from_rfc3339(b["starting_at"])
            for r in b.get("results") or []:
                creation = r.get("cache_creation") or {}
                report.add_usage((start, r.get("model") or "(no model)"), {
                    "uncached_input": int(r.get("uncached_input_tokens") or 0),
                    "cache_read": int(r.get("cache_read_input_tokens") or 0),
                    "cache_write": int(creation.get("ephemeral_5m_input_tokens") or 0)
                    + int(creation.get("ephemeral_1h_input_tokens") or 0),
                    "output": int(r.get("output_tokens") or 0),
                })
    # the cost report filters by workspace only; grouped by description it names each row's model
    params = window + [("bucket_width", "1d"), ("group_by[]", "description"), ("limit", str(PAGE_LIMIT["1d"]))]
    params += [("workspace_ids[]", v) for v in scope.filters.get("workspace_ids", [])]
    for doc in _pages(client, "/v1/organizations/cost_report", params, "anthropic"):
        report.pages += 1
        for b in doc["data"]:
            day = _from_rfc3339(b["starting_at"])
            for r in b.get("results") or []:
                if str(r.get("currency", "USD")).upper() != "USD":
                    raise AdminApiError(f"anthropic cost report is in {r.get('currency')}, not USD")
                model = r.get("model") or r.get("description") or r.get("cost_type") or "(no model)"
                report.add_cost((day, model), _decimal(r.get("amount")) / CENT)  # cents, as a decimal string
    return report


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise AdminApiError(f"cost report has an amount that is not a number: {value!r}")
    try:
        amount = Decimal(value) if isinstance(value, (str, Decimal, int)) else None
    except ArithmeticError:
        amount = None
    if amount is None or not amount.is_finite():
        raise AdminApiError(f"cost report has an amount that is not a number: {value!r}")
    return amount


def _from_unix(value: Any) -> datetime:
    return datetime.fromtimestamp(int(value), timezone.utc)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _from_rfc3339(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
