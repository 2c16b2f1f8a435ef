"""The built-in dashboard: its routes, and what it shows in headless Chromium checked against the ledger.

The sidecar runs in a thread of the test process (sidecar.app.build plus dashboard.add_routes, which
does nothing when app.py already adds it), behind the fake providers; calls go through the real SDKs.
"""
from __future__ import annotations

import asyncio
import http.client
import re
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from google import genai
from google.genai import types as gtypes

from sidecar import config as config_mod
from sidecar import dashboard
from tests.fakes import FakeProvider
from tests.sidecar_process import Sidecar

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JAEGER = "http://jaeger.example:16686"
MESSAGES = [{"role": "user", "content": "What does the dashboard show?"}]
ROOT = Path(__file__).resolve().parents[1]


class InProcessSidecar(Sidecar):
    """The real sidecar application on a loopback port, in a thread of this process (same helpers as Sidecar)."""

    claimed_host = "127.0.0.1"  # the host the sidecar believes it listens on (it binds loopback regardless)

    def start(self, timeout: float = 30.0) -> InProcessSidecar:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sidecar", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout)
        return self

    async def _start(self) -> None:
        from sidecar.app import build

        cfg = config_mod.parse(self.config)
        cfg.host, cfg.port, cfg.ledger_path = self.claimed_host, self.port, str(self.db)
        app = build(cfg)
        dashboard.add_routes(app)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider(chunk_delay_ms=1).start_in_thread()
    yield provider
    provider.stop_thread()


@pytest.fixture(scope="module")
def sidecar(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessSidecar]:
    config = {
        "upstreams": {name: {"base_url": fake.base_url} for name in ("openai", "anthropic", "gemini")},
        "telemetry": {"jaeger_ui_url": JAEGER + "/"},
        "budgets": [
            {"name": "team-a-daily", "match": {"tags": {"team": "a"}}, "window": "day", "limit_usd": 5,
             "action": "alert"},
            # a zero allowance: used up (100%) before any call, so its refusal alerts at 100%
            {"name": "tiny-block", "match": {"user": "blocked-user"}, "window": "day", "limit_usd": 0,
             "action": "block"},
        ],
    }
    process = InProcessSidecar(tmp_path_factory.mktemp("dashboard"), config).start()
    try:
        yield process
    finally:
        process.stop()


def _openai(sidecar: Sidecar, headers: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-dash", base_url=f"{sidecar.url}/openai/v1", max_retries=0,
                         default_headers=headers)


@pytest.fixture(scope="module")
def traffic(sidecar: InProcessSidecar) -> list[dict[str, Any]]:
    """Five calls through the real SDKs (one refused by a budget); their ledger rows."""
    checkout = {"x-meterline-app": "checkout", "x-meterline-user": "u1", "x-meterline-tags": "team=a,feature=cart"}
    _openai(sidecar, checkout).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = _openai(sidecar, {**checkout, "x-fake-scenario": "cache,reasoning"}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)
    for _ in stream:
        pass
    support = {"x-meterline-app": "support", "x-meterline-user": "u2", "x-meterline-tags": "team=b",
               "x-fake-scenario": "cache"}
    client = anthropic.Anthropic(api_key="sk-ant-dash", base_url=f"{sidecar.url}/anthropic", max_retries=0,
                                 default_headers=support)
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=256, messages=MESSAGES) as s:
        for _ in s.text_stream:
            pass
    docs = {"x-meterline-app": "docs", "x-meterline-user": "u3", "x-meterline-tags": "team=b,feature=summarize"}
    gemini = genai.Client(api_key="gm-dash", http_options=gtypes.HttpOptions(
        base_url=f"{sidecar.url}/gemini", headers=docs, retry_options=gtypes.HttpRetryOptions(attempts=1)))
    gemini.models.generate_content(model="gemini-2.5-flash", contents="Summarize the dashboard.")
    with pytest.raises(openai.RateLimitError):
        _openai(sidecar, {"x-meterline-app": "checkout", "x-meterline-user": "blocked-user"}).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    rows = sidecar.rows("true", 5)
    assert len(rows) == 5
    _wait(lambda: sidecar.sql("SELECT count(*) AS n FROM alerts")[0]["n"] >= 1, "the refusal's alert row")
    return rows


def _wait(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def shown_money(value: str | Decimal | None) -> str:
    """The page's money format: 2 decimals from $1 (and for zero), 4 from a cent, else 6."""
    if value is None:
        return "–"
    x = Decimal(value)
    a = abs(x)
    places = 2 if a == 0 or a >= 1 else 4 if a >= Decimal("0.01") else 6
    q = a.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return ("-$" if x < 0 else "$") + f"{q:,.{places}f}"


def _ledger_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spend and counts per calendar window, computed here from the rows themselves."""
    now = datetime.now(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = day - timedelta(days=day.weekday())
    month = day.replace(day=1)

    def since(start: datetime) -> list[dict[str, Any]]:
        return [r for r in rows if datetime.fromisoformat(r["started_at"]) >= start]

    def spend(subset: list[dict[str, Any]]) -> Decimal:
        return sum((Decimal(r["cost_usd"]) for r in subset if r["cost_usd"] is not None), Decimal(0))

    return {"spend_today": spend(since(day)), "calls_today": len(since(day)),
            "spend_week": spend(since(week)), "calls_week": len(since(week)),
            "spend_month": spend(since(month)), "calls_month": len(since(month)),
            "blocked_today": sum(r["outcome"] == "blocked" for r in since(day))}


# --- routes, without a browser ---------------------------------------------------------------------

def _get(sidecar: Sidecar, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A raw GET (http.client sends the path exactly as given: no dot-segment clean-up)."""
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_page_and_static_files_are_served_with_types_and_cache_headers(sidecar: InProcessSidecar) -> None:
    status, headers, body = _get(sidecar, "/_meterline/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="static/app.js"' in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-cache" and headers["etag"]
    status, _, body = _get(sidecar, "/_meterline/", {"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")

    status, headers, _ = _get(sidecar, "/_meterline")
    assert status in (301, 308) and headers["location"] == "/_meterline/"

    expected = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml",
                "vendor/uPlot.iife.min.js": "text/javascript", "vendor/uPlot.min.css": "text/css",
                "vendor/uPlot.LICENSE": "text/plain"}
    for name, kind in expected.items():
        status, headers, body = _get(sidecar, f"/_meterline/static/{name}")
        assert status == 200, name
        assert headers["content-type"].startswith(kind), (name, headers["content-type"])
        assert body == (ROOT / "dashboards" / "web" / name).read_bytes()
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == ("public, max-age=86400" if name.startswith("vendor/") else "no-cache")
    assert b"MIT" in _get(sidecar, "/_meterline/static/vendor/uPlot.LICENSE")[2]


@pytest.mark.parametrize("path", [
    "/_meterline/static/../../pyproject.toml",
    "/_meterline/static/%2e%2e/%2e%2e/pyproject.toml",
    "/_meterline/static/..%2f..%2fpyproject.toml",
    "/_meterline/static/vendor/../../../sidecar/app.py",
    "/_meterline/static//etc/passwd",
    "/_meterline/static/%2fetc%2fpasswd",
    "/_meterline/static/..%5c..%5cpyproject.toml",
    "/_meterline/static/nothing-here.js",
    "/_meterline/static/vendor",
])
def test_static_files_stay_inside_the_dashboard_directory(sidecar: InProcessSidecar, path: str) -> None:
    status, _, body = _get(sidecar, path)
    assert status == 404
    assert b"[project]" not in body and b"root:" not in body and b"def build" not in body


def test_config_endpoint_gives_the_jaeger_url(sidecar: InProcessSidecar) -> None:
    status, headers, body = _get(sidecar, "/_meterline/dashboard/config")
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = orjson.loads(body)
    assert doc["jaeger_ui_url"] == JAEGER  # the trailing slash is dropped
    assert 2 <= doc["poll_s"] <= 5


def test_only_http_jaeger_urls_become_links() -> None:
    assert dashboard.jaeger_ui_url({"jaeger_ui_url": "javascript:alert(1)"}) is None
    assert dashboard.jaeger_ui_url({"jaeger_ui_url": ""}) is None
    assert dashboard.jaeger_ui_url({}) is None
    assert dashboard.jaeger_ui_url({"jaeger_ui_url": "https://j.example/jaeger/ "}) == "https://j.example/jaeger"


def test_the_page_loads_nothing_from_elsewhere() -> None:
    web_dir = ROOT / "dashboards" / "web"
    html = (web_dir / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    app_js = (web_dir / "app.js").read_text()
    assert "http://" not in app_js.replace("http://www.w3.org", "") and "https://" not in app_js
    assert (web_dir / "vendor" / "uPlot.LICENSE").exists()


def test_add_routes_twice_is_harmless(tmp_path: Path) -> None:
    app = web.Application()
    dashboard.add_routes(app)
    dashboard.add_routes(app)
    assert sum(1 for r in app.router.routes()
               if r.method == "GET" and r.resource and r.resource.canonical == "/_meterline/") == 1


def test_meterline_serve_serves_the_dashboard(fake: FakeProvider, tmp_path: Path) -> None:
    """`meterline serve` itself (once sidecar/app.py adds the dashboard's routes)."""
    if "dashboard" not in (ROOT / "sidecar" / "app.py").read_text():
        pytest.skip("sidecar/app.py does not add the dashboard's routes yet")
    process = Sidecar(tmp_path, {"upstreams": {"openai": {"base_url": fake.base_url}}}).start()
    try:
        status, headers, body = _get(process, "/_meterline/")
        assert status == 200 and b"static/app.js" in body
        assert _get(process, "/_meterline/static/vendor/uPlot.iife.min.js")[0] == 200
        assert _get(process, "/_meterline/dashboard/config")[0] == 200
    finally:
        process.stop()


# --- the page, in Chromium ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package: chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, sidecar: InProcessSidecar) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    pg.on("request", lambda r: None if r.url.startswith(sidecar.url) else problems.append(f"left the sidecar: {r.url}"))
    pg.problems = problems
    try:
        yield pg
    finally:
        context.close()


def _loaded(page: Any) -> None:
    """Waits until every panel has been drawn for the current range and filters."""
    page.wait_for_function("() => document.body.dataset.loaded !== undefined && "
                           "document.body.dataset.loaded === document.body.dataset.gen")


def _attr(page: Any, selector: str, name: str) -> str | None:
    return page.locator(selector).first.get_attribute(name)


def _text(page: Any, selector: str) -> str:
    return (page.locator(selector).first.text_content() or "").strip()


def test_dashboard_numbers_match_the_ledger(page: Any, sidecar: InProcessSidecar,
                                           traffic: list[dict[str, Any]]) -> None:
    rows = sidecar.sql("SELECT * FROM calls")
    totals = _ledger_totals(rows)
    page.goto(f"{sidecar.url}/_meterline/")
    page.wait_for_function(
        "n => document.querySelector('[data-kpi=calls_today]').dataset.value === String(n)", arg=len(rows))
    _loaded(page)

    # spend today, this week, this month: exact in the data, rounded on screen
    for name in ("spend_today", "spend_week", "spend_month"):
        node = f"[data-kpi={name}]"
        assert Decimal(_attr(page, node, "data-value")) == totals[name], name
        assert _text(page, node) == shown_money(totals[name]), name
    for name in ("calls_today", "calls_week", "calls_month", "blocked_today"):
        assert _attr(page, f"[data-kpi={name}]", "data-value") == str(totals[name]), name
    assert totals["spend_today"] > 0 and totals["blocked_today"] == 1

    # budgets: the page shows GET /_meterline/budgets, which agrees with the ledger
    with urllib.request.urlopen(f"{sidecar.url}/_meterline/budgets") as r:
        budgets = {b["rule"]: b for b in orjson.loads(r.read())["budgets"]}
    team_a = sum((Decimal(r["cost_usd"]) for r in rows
                  if (r["tags"] or {}).get("team") == "a" and r["outcome"] != "blocked"), Decimal(0))
    assert Decimal(budgets["team-a-daily"]["spent_usd"]) == team_a > 0
    spent = page.locator('.budget[data-rule="team-a-daily"] [data-spent]')
    assert Decimal(spent.get_attribute("data-spent")) == team_a
    assert spent.text_content().strip() == f"{shown_money(team_a)} of $5.00"
    blocked = page.locator('.budget[data-rule="tiny-block"]')
    assert "100%" in blocked.locator(".chip").all_text_contents()
    assert "block" in blocked.locator(".badge").all_text_contents()
    assert re.search(r"resets in \d", blocked.locator(".reset").text_content())
    page.wait_for_selector('#alerts li[data-rule="tiny-block"]')

    # spend over time, by provider: each series' total for the range is the ledger's
    page.wait_for_selector("#spend-chart canvas")
    for provider in ("openai", "anthropic", "google"):
        want = sum((Decimal(r["cost_usd"]) for r in rows if r["provider"] == provider and r["cost_usd"]), Decimal(0))
        assert _text(page, f'#spend-legend [data-series="{provider}"] b') == shown_money(want), provider

    # token mix: cache reads and reasoning as metered
    cache_read = sum(r["cache_read_tokens"] or 0 for r in rows)
    reasoning = sum(r["reasoning_tokens"] or 0 for r in rows)
    assert cache_read > 0 and reasoning > 0
    assert _text(page, "#mix-legend [data-kind=cache_read] b") == f"{cache_read:,}"
    assert _text(page, "#mix-legend [data-kind=reasoning] b") == f"{reasoning:,}"

    # latency: one row per model of the successful calls, with their counts
    ok = [r for r in rows if r["outcome"] == "ok"]
    models = {r["response_model"] or r["request_model"] for r in ok}
    shown = {tr.get_attribute("data-model"): tr.locator("td").nth(1).text_content()
             for tr in page.locator("#latency-table tbody tr").all()}
    assert shown == {m: str(sum((r["response_model"] or r["request_model"]) == m for r in ok)) for m in models}

    # recent calls: every call, newest first, with its cost
    page.wait_for_function("n => document.querySelectorAll('#calls-table tbody tr').length === n", arg=len(rows))
    newest = sorted(rows, key=lambda r: r["started_at"], reverse=True)
    ids = [tr.get_attribute("data-call-id") for tr in page.locator("#calls-table tbody tr").all()]
    assert ids[0] == newest[0]["call_id"] and set(ids) == {r["call_id"] for r in rows}
    for r in rows:
        cell = page.locator(f'#calls-table tr[data-call-id="{r["call_id"]}"] td[data-cost]')
        assert cell.get_attribute("data-cost") == (r["cost_usd"] or "")
        assert cell.text_content() == shown_money(r["cost_usd"])

    # a click shows the row's fields and links its trace in Jaeger
    row = next(r for r in rows if r["provider"] == "anthropic")
    page.locator(f'#calls-table tr[data-call-id="{row["call_id"]}"]').click()
    page.wait_for_selector("#detail:not([hidden])")
    page.wait_for_function("id => document.querySelector('#detail-id').textContent === id", arg=row["call_id"])
    for field in ("call_id", "app", "provider", "outcome", "input_tokens", "cache_read_tokens", "cost_usd", "user_id"):
        assert _text(page, f'#detail-fields [data-field="{field}"]') == str(row[field]), field
    assert _attr(page, "#detail-trace a", "href") == f"{JAEGER}/trace/{row['trace_id']}"
    assert _attr(page, f'#calls-table tr[data-call-id="{row["call_id"]}"] a.trace', "href") == \
        f"{JAEGER}/trace/{row['trace_id']}"
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail", state="hidden")
    assert page.problems == []


def test_filters_narrow_every_panel(page: Any, sidecar: InProcessSidecar, traffic: list[dict[str, Any]]) -> None:
    page.goto(f"{sidecar.url}/_meterline/")
    page.wait_for_selector('#f-provider option[value="anthropic"]', state="attached")
    page.select_option("#f-provider", "anthropic")
    want = sidecar.sql("SELECT call_id, cost_usd FROM calls WHERE provider = 'anthropic'")
    _loaded(page)
    assert _attr(page, "[data-kpi=calls_today]", "data-value") == str(len(want))
    assert {tr.get_attribute("data-call-id") for tr in page.locator("#calls-table tbody tr").all()} == \
        {r["call_id"] for r in want}
    assert Decimal(_attr(page, "[data-kpi=spend_today]", "data-value")) == sum(Decimal(r["cost_usd"]) for r in want)
    assert "provider=anthropic" in page.url  # the view is kept in the URL

    page.select_option("#f-provider", "")
    page.wait_for_selector('#f-tag option[value="team=b"]', state="attached")
    page.select_option("#f-tag", "team=b")
    want = sidecar.sql("SELECT call_id FROM calls WHERE tags['team'] = 'b'")
    _loaded(page)
    assert _attr(page, "[data-kpi=calls_today]", "data-value") == str(len(want))
    assert {tr.get_attribute("data-call-id") for tr in page.locator("#calls-table tbody tr").all()} == \
        {r["call_id"] for r in want}
    assert page.problems == []


def test_dashboard_updates_live(page: Any, sidecar: InProcessSidecar, traffic: list[dict[str, Any]]) -> None:
    page.goto(f"{sidecar.url}/_meterline/")
    before = len(sidecar.sql("SELECT call_id FROM calls"))
    page.wait_for_function("n => document.querySelector('[data-kpi=calls_today]').dataset.value === String(n)",
                           arg=before)
    _openai(sidecar, {"x-meterline-app": "late-comer", "x-meterline-tags": "team=a"}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES)
    row = sidecar.rows("app = 'late-comer'")[0]
    # no reload: the page polls
    page.wait_for_function("n => document.querySelector('[data-kpi=calls_today]').dataset.value === String(n)",
                           arg=before + 1, timeout=15_000)
    page.wait_for_selector(f'#calls-table tbody tr[data-call-id="{row["call_id"]}"]', timeout=15_000)
    total = sum((Decimal(r["cost_usd"]) for r in sidecar.sql("SELECT cost_usd FROM calls") if r["cost_usd"]),
                Decimal(0))
    assert Decimal(_attr(page, "[data-kpi=spend_today]", "data-value")) == total
    assert page.problems == []


def test_beyond_loopback_the_page_asks_for_the_admin_token(browser: Any, fake: FakeProvider, tmp_path: Path) -> None:
    process = InProcessSidecar(tmp_path, {"upstreams": {"openai": {"base_url": fake.base_url}},
                                          "admin_token": "s3cret"})
    process.claimed_host = "0.0.0.0"  # as if it listened beyond loopback: SQL then needs the token
    process.start()
    try:
        _openai(process, {"x-meterline-app": "remote"}).chat.completions.create(model="gpt-4o-mini",
                                                                               messages=MESSAGES)

        def rows() -> int:
            req = urllib.request.Request(f"{process.url}/_meterline/sql", data=b"SELECT count(*) FROM calls",
                                         method="POST", headers={"x-meterline-admin-token": "s3cret"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return orjson.loads(r.read())["rows"][0][0]

        _wait(lambda: rows() == 1, "the call's ledger row")
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(f"{process.url}/_meterline/")
            pg.wait_for_selector("#token-form", state="visible")
            # the form shows as the refused answer arrives; the status line is set when that error lands
            pg.wait_for_function("() => document.querySelector('#status').dataset.state === 'error'")
            assert _attr(pg, "[data-kpi=calls_today]", "data-value") is None  # nothing was shown without it
            pg.fill("#token", "s3cret")
            pg.click("#token-form button")
            pg.wait_for_function("() => document.querySelector('[data-kpi=calls_today]').dataset.value === '1'")
            _loaded(pg)
            assert pg.locator("#token-form").is_hidden()
            assert _attr(pg, "#status", "data-state") == "live"
            assert errors == []
        finally:
            context.close()
    finally:
        process.stop()


def test_with_a_token_on_loopback_the_page_takes_it_from_its_url(browser: Any, fake: FakeProvider,
                                                                 tmp_path: Path) -> None:
    process = InProcessSidecar(tmp_path, {"upstreams": {"openai": {"base_url": fake.base_url}},
                                          "admin_token": "t0ken/with+odd=chars",
                                          "budgets": [{"name": "day-cap", "window": "day", "limit_usd": 5}]})
    process.start()  # on loopback: the token is needed all the same
    try:
        _openai(process, {"x-meterline-app": "local"}).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        token = "t0ken/with+odd=chars"
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            sent: list[str | None] = []
            pg.on("request", lambda r: sent.append(r.headers.get("x-meterline-admin-token"))
                  if "/_meterline/sql" in r.url or r.url.endswith("/_meterline/budgets") else None)
            # without it: nothing shown, and the page says how to open it
            pg.goto(f"{process.url}/_meterline/")
            pg.wait_for_selector("#token-form", state="visible")
            assert "/_meterline/#token=" in _text(pg, "#token-help")
            assert _attr(pg, "[data-kpi=calls_today]", "data-value") is None
            # with it in the fragment: read, kept for the tab only, and gone from the URL
            sent.clear()
            pg.goto("about:blank")  # then a full load of the page, as from a bookmark
            pg.goto(f"{process.url}/_meterline/#token={urllib.parse.quote(token, safe='')}&range=900")
            _wait(lambda: pg.evaluate("() => document.querySelector('[data-kpi=calls_today]').dataset.value") == "1",
                  "the page's figures", timeout=20)
            _loaded(pg)
            assert "token" not in pg.url and "range=900" in pg.url
            assert pg.evaluate("() => sessionStorage.getItem('meterline-admin-token')") == token
            assert pg.evaluate("() => localStorage.length") == 0
            assert pg.locator('.budget[data-rule="day-cap"]').count() == 1  # GET budgets carried it too
            assert sent and all(h == token for h in sent)
            assert _attr(pg, "#status", "data-state") == "live"
            assert pg.locator("#token-form").is_hidden()
            assert errors == []
        finally:
            context.close()
    finally:
        process.stop()


def test_an_unpriced_model_is_never_shown_as_zero(page: Any, sidecar: InProcessSidecar,
                                                  traffic: list[dict[str, Any]]) -> None:
    _openai(sidecar, {"x-meterline-app": "house", "x-meterline-tags": "team=house"}).chat.completions.create(
        model="house-model-7b", messages=MESSAGES)
    (row,) = sidecar.rows("app = 'house'")
    assert row["cost_usd"] is None and row["price_source"] == "unpriced"
    model = row["response_model"] or row["request_model"]
    page.goto(f"{sidecar.url}/_meterline/#range=3600&metric=cost&by=model")
    page.wait_for_selector(f'#spend-legend [data-series="{model}"]')
    _loaded(page)
    assert _text(page, f'#spend-legend [data-series="{model}"] b') == "unpriced"
    priced = next(r for r in traffic if r["provider"] == "openai" and r["cost_usd"])
    priced_model = priced["response_model"] or priced["request_model"]
    assert _text(page, f'#spend-legend [data-series="{priced_model}"] b').startswith("$")  # priced ones: money
    tokens_row = page.locator(f'#tokens-table tr[data-model="{model}"] td').last
    assert tokens_row.text_content() == "unpriced" and tokens_row.get_attribute("data-cost") == ""
    cell = page.locator(f'#calls-table tr[data-call-id="{row["call_id"]}"] td[data-cost]')
    assert cell.text_content() == "–" and cell.get_attribute("title") == "not priced"
    # only unpriced calls in view: the spend is not $0.00 either
    page.goto(f"{sidecar.url}/_meterline/#range=3600&app=house")
    page.wait_for_function("() => document.querySelector('[data-kpi=calls_today]').dataset.value === '1'")
    _loaded(page)
    for name in ("spend_today", "spend_week", "spend_month"):
        assert _text(page, f"[data-kpi={name}]") == "unpriced", name
    assert _attr(page, "[data-kpi=unpriced_today]", "data-value") == "1"
    shown = " ".join(page.locator(sel).inner_text() for sel in ("#kpi-today", "#spend-card", "#tokens-card"))
    assert not re.search(r"\$0\.00(?!\d)", shown), shown
    assert page.problems == []


def _pct_label(text: str, util: float) -> float:
    if text == "<0.1%":
        assert 0 < util < 0.001
        return util * 100
    return float(text.rstrip("%"))


def test_budget_badges_agree_with_utilization(page: Any, sidecar: InProcessSidecar,
                                              traffic: list[dict[str, Any]]) -> None:
    spent = sum((Decimal(r["cost_usd"]) for r in sidecar.sql("SELECT * FROM calls WHERE tags['team'] = 'a'")
                 if r["cost_usd"] is not None and r["outcome"] != "blocked"), Decimal(0))
    assert spent > 0
    shares = {"u-0004": Decimal("0.0004"), "u-0290": Decimal("0.29"), "u-0799": Decimal("0.7999"),
              "u-0800": Decimal("0.8"), "u-0996": Decimal("0.996"), "u-1200": Decimal("1.2")}
    for name, share in shares.items():
        rule = {"name": name, "match": {"tags": {"team": "a"}}, "window": "day", "action": "alert",
                "limit_usd": str((spent / share).quantize(Decimal("0.000000000001"), rounding=ROUND_DOWN))}
        req = urllib.request.Request(f"{sidecar.url}/_meterline/budgets/{name}", data=orjson.dumps(rule), method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
    try:
        with urllib.request.urlopen(f"{sidecar.url}/_meterline/budgets", timeout=10) as r:
            status = {b["rule"]: b for b in orjson.loads(r.read())["budgets"]}
        page.goto(f"{sidecar.url}/_meterline/")
        page.wait_for_selector('.budget[data-rule="u-1200"]')
        _loaded(page)
        seen = {}
        for name in shares:
            util = status[name]["utilization"]
            node = page.locator(f'.budget[data-rule="{name}"]')
            label = node.locator(".util").text_content()
            bar = node.locator(".bar").get_attribute("class").split()
            shown = _pct_label(label, util)
            seen[name] = (label, bar)
            # the label is never rounded up past what is used, and never reads 0% above zero
            assert shown <= util * 100 + 1e-6 and shown > 0, (name, util, label)
            assert (shown >= 100) == (util >= 1) == ("full" in bar), (name, util, label, bar)
            assert (80 <= shown < 100) == (0.8 <= util < 1) == ("warn" in bar), (name, util, label, bar)
        assert seen["u-0004"][0] == "<0.1%" and seen["u-0996"][0] == "99%" and seen["u-0290"][0] == "29%"
        assert seen["u-0800"][0] == "80%" and seen["u-0799"][0] == "79%" and seen["u-1200"][0] == "120%"
        assert page.problems == []
    finally:
        for name in shares:
            urllib.request.urlopen(urllib.request.Request(f"{sidecar.url}/_meterline/budgets/{name}",
                                                          method="DELETE"), timeout=10).close()
