"""The dashboard's "ledger vs provider" card in headless Chromium: a run `meterline reconcile` stored through the sidecar.

Calls go through the real SDKs to the in-process sidecar (as in tests/test_dashboard.py); the fake
admin API reports what the provider saw (those calls, and another client's); the CLI runs as a
subprocess, reads the ledger and stores the run through the sidecar; the page shows that run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.fakes import FakeProvider
from tests.fakes.admin_api import FakeAdminApi, UsageEvent
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, InProcessSidecar, shown_money

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-admin-DASH-0a1b2c3d"
MESSAGES = [{"role": "user", "content": "Reconcile me."}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider(chunk_delay_ms=1).start_in_thread()
    yield provider
    provider.stop_thread()


@pytest.fixture(scope="module")
def sidecar(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessSidecar]:
    config = {"upstreams": {name: {"base_url": fake.base_url} for name in ("openai", "anthropic")}}
    process = InProcessSidecar(tmp_path_factory.mktemp("recon_dashboard"), config).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def stored_run(sidecar: InProcessSidecar, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three calls through the SDKs; a provider that also saw another client's o3 call; the run, stored."""
    client = openai.OpenAI(api_key="sk-recon", base_url=f"{sidecar.url}/openai/v1", max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    anthropic.Anthropic(api_key="sk-ant-recon", base_url=f"{sidecar.url}/anthropic", max_retries=0).messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES)
    rows = sidecar.rows("provider = 'openai'", 2)
    assert len(rows) == 2 and all(r["cost_usd"] for r in rows)

    api = FakeAdminApi(KEY).start()
    try:
        for r in rows:
            cached = r["cache_read_tokens"] or 0
            api.events.append(UsageEvent(datetime.fromisoformat(r["started_at"]), r["response_model"] or r["request_model"],
                                         uncached_input=r["input_tokens"] - cached, cache_read=cached,
                                         output=r["output_tokens"], costs={"input": Decimal(r["cost_usd"])}))
        other = UsageEvent(datetime.now(timezone.utc), "o3-2025-04-16", uncached_input=5000, output=900,
                           costs={"input": Decimal("0.01"), "output": Decimal("0.0072")})
        api.events.append(other)
        today = datetime.now(timezone.utc).date()
        work = tmp_path_factory.mktemp("recon_cli")
        (work / "meterline.yaml").write_text("listen: 127.0.0.1:1\n")
        out = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "reconcile", "openai", "--since", str(today - timedelta(days=1)),
             "--until", str(today + timedelta(days=2)), "--base-url", api.base_url, "--url", sidecar.url,
             "--format", "json", "--config", str(work / "meterline.yaml")],
            capture_output=True, text=True, cwd=work, timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_ADMIN_KEY": KEY})
    finally:
        api.stop()
    assert out.returncode == 1, out.stderr  # the other client's call: drift
    doc = json.loads(out.stdout)
    assert doc["stored"].startswith("stored through the sidecar"), doc["stored"]
    return doc


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


def test_the_card_says_how_to_make_a_run_before_there_is_one(browser: Any, sidecar: InProcessSidecar) -> None:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        if sidecar.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'reconciliations'")[0]["n"]:
            pytest.skip("a run is stored already (module order)")
        page.goto(f"{sidecar.url}/_meterline/")
        page.wait_for_selector("#recon-empty:not([hidden])")
        assert page.locator("#recon-runs tbody tr").count() == 0
        assert page.locator("#status").get_attribute("data-state") == "live"  # no panel failed for the missing table
        assert errors == []
    finally:
        context.close()


def test_a_stored_run_shows_its_rows_ledger_beside_provider(browser: Any, sidecar: InProcessSidecar,
                                                            stored_run: dict[str, Any]) -> None:
    run_id = stored_run["run_id"]
    head = sidecar.sql(f"SELECT * FROM reconciliations WHERE run_id = '{run_id}'")[0]
    rows = sidecar.sql(f"SELECT * FROM reconciliation_rows WHERE run_id = '{run_id}'")
    assert head["status"] == "drift" and len(rows) == 2  # one day: gpt-4o-mini (agrees) and o3 (unseen)

    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    try:
        page.goto(f"{sidecar.url}/_meterline/")
        run = page.locator(f'#recon-runs tr[data-run-id="{run_id}"]')
        run.wait_for()
        assert run.get_attribute("data-status") == "drift" and "selected" in run.get_attribute("class")
        cells = run.locator("td")
        assert cells.nth(1).text_content() == "openai"
        assert cells.nth(3).text_content() == "drift"
        assert cells.nth(4).get_attribute("data-usd") == head["ledger_usd"]
        assert cells.nth(4).text_content() == shown_money(head["ledger_usd"])
        assert cells.nth(5).text_content() == shown_money(head["provider_usd"])
        share = Decimal(head["covered_share"])
        assert 0 < share < 1
        assert cells.nth(6).text_content() == f"{share * 100:.1f}%"
        assert cells.nth(7).text_content() == "1"

        page.wait_for_selector("#recon-rows:not([hidden]) tbody tr")
        shown = {tr.get_attribute("data-model"): tr for tr in page.locator("#recon-rows tbody tr").all()}
        assert set(shown) == {r["model"] for r in rows}
        first = page.locator("#recon-rows tbody tr").first
        assert first.get_attribute("data-cause") == "unseen"  # rows past the tolerance come first
        for r in rows:
            tr = shown[r["model"]]
            assert tr.get_attribute("data-cause") == (r["cause"] or "")
            usd = tr.locator('td[data-metric="usd"]')
            assert usd.get_attribute("data-ledger") == (r["ledger_usd"] or "")
            assert usd.get_attribute("data-provider") == r["provider_usd"]
            requests = tr.locator('td[data-metric="requests"]')
            if r["cause"] is None:
                assert requests.text_content() == f"{r['ledger_requests']} ="
                assert usd.text_content() == shown_money(r["ledger_usd"]) + " ="
            else:
                assert requests.text_content() == f"0 / {r['provider_requests']}" and r["ledger_requests"] == 0
                assert usd.text_content() == f"– / {shown_money(r['provider_usd'])}"
        headings = page.locator("#recon-rows thead th").all_text_contents()
        assert "images" not in headings and "cache write" not in headings  # no row compares them
        assert "uncached in" in headings and "usd" in headings
        assert page.locator("#recon-rows-note").text_content().startswith(f"run {run_id}: 2 rows")
        assert problems == []
    finally:
        context.close()
