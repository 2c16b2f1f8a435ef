"""Async media jobs through the real sidecar: each::labs predictions, a Veo operation, an OpenAI batch, budgets and idempotency.

The providers are the fakes of tests/fakes/jobs_api.py; the sidecar is `meterline serve` in its own
process with a DuckDB ledger; each::labs is driven over plain HTTP (it has no SDK here), Veo with
google-genai and the batch with the openai SDK.
"""
from __future__ import annotations

import http.client
import json
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import genai_prices
import openai
import orjson
import pytest
import urllib.request

from tests.fakes.jobs_api import EACHLABS_KEY, EACHLABS_PER_SECOND, GEMINI_KEY, OPENAI_KEY, FakeJobsApi
from tests.sidecar_process import Sidecar

QUANTUM = Decimal("0.000000000001")
PER_SECOND = Decimal("0.1")  # the config's price of kling-* seconds (each::labs bills 0.07: reported cost wins)
VEO_1080P = Decimal("0.6")


@pytest.fixture(scope="module")
def jobs_api() -> Iterator[FakeJobsApi]:
    api = FakeJobsApi().start()
    yield api
    api.stop()


def config_for(base: str) -> dict[str, Any]:
    return {
        "upstreams": {
            "openai": {"base_url": base},
            "gemini": {"base_url": base},
            "eachlabs": {"base_url": base, "adapter": "eachlabs"},
            # the same provider with a key in the config: the sinks process polls its jobs itself
            "eachlabs-polled": {"base_url": base, "adapter": "eachlabs", "provider": "eachlabs",
                                "api_key": "${TEST_EACHLABS_KEY}"},
            "openai-polled": {"base_url": base, "adapter": "openai", "provider": "openai", "api_key": OPENAI_KEY},
        },
        "prices": [
            {"provider": "eachlabs", "model": "kling-*", "per_second": str(PER_SECOND)},
            {"provider": "google", "model": "veo-*", "per_second": "0.4",
             "by_resolution": {"1080p": {"per_second": str(VEO_1080P)}}},
        ],
        "budgets": [
            {"name": "media", "match": {"tags": {"team": "media"}}, "per": "tag:case", "window": "day",
             "limit_usd": 50, "action": "block"},
            {"name": "tight", "match": {"tags": {"team": "tight"}}, "window": "day", "limit_usd": 1,
             "action": "block"},
        ],
        "jobs": {"poll_s": 0.3, "max_poll_s": 1, "sync_s": 0.2},
    }


@pytest.fixture(scope="module")
def sidecar(jobs_api: FakeJobsApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    workdir: Path = tmp_path_factory.mktemp("jobs")
    process = Sidecar(workdir, config_for(jobs_api.base_url), env={"TEST_EACHLABS_KEY": EACHLABS_KEY})
    process.start()
    try:
        yield process
    finally:
        process.stop()


# --- helpers -------------------------------------------------------------------------------------

def case(team: str = "media") -> tuple[str, dict[str, str]]:
    cid = uuid.uuid4().hex[:12]
    return cid, {"x-meterline-tags": f"case={cid},team={team}"}


def call(sc: Sidecar, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-API-Key": EACHLABS_KEY, **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data) if data else None
    finally:
        conn.close()


def wait_for(fn: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def job_rows(sc: Sidecar, where: str) -> list[dict[str, Any]]:
    return sc.sql(f"SELECT * FROM jobs WHERE {where} ORDER BY submitted_at")


def settled_job(sc: Sidecar, where: str, timeout: float = 15.0) -> dict[str, Any]:
    rows = wait_for(lambda: [r for r in job_rows(sc, where) if r["settled_at"]], f"a settled job where {where}",
                    timeout)
    assert len(rows) == 1, rows
    return rows[0]


def account(sc: Sidecar, rule: str, key: str | None = None) -> dict[str, Any]:
    with urllib.request.urlopen(f"{sc.url}/_meterline/budgets", timeout=5) as r:
        doc = orjson.loads(r.read())
    found = [b for b in doc["budgets"] if b["rule"] == rule and (key is None or b["key"] == key)]
    assert len(found) == 1, doc
    return found[0]


def submit_kling(sc: Sidecar, headers: dict[str, str], upstream: str = "eachlabs", **inp: Any) -> str:
    status, _, doc = call(sc, "POST", f"/{upstream}/v1/prediction",
                          {"model": "kling-v2-1-video", "version": "0.0.1",
                           "input": {"prompt": "a cat surfing", "duration": 10, **inp}}, headers)
    assert status == 200, doc
    return doc["predictionID"]


# --- each::labs ----------------------------------------------------------------------------------

def test_eachlabs_video_polled_to_success_settles_to_the_reported_cost(sidecar: Sidecar, jobs_api: FakeJobsApi) -> None:
    cid, headers = case()
    pid = submit_kling(sidecar, headers)
    estimate = 10 * PER_SECOND
    # the reservation holds the estimate (10 s at the config's per_second) while the job runs
    acct = account(sidecar, "media", cid)
    assert Decimal(acct["reserved_usd"]) == estimate and Decimal(acct["spent_usd"]) == 0
    row = wait_for(lambda: job_rows(sidecar, f"provider_job_id = '{pid}'"), "the job's row")[0]
    assert (row["state"], row["model"], row["provider"], row["upstream"]) == (
        "submitted", "kling-v2-1-video", "eachlabs", "eachlabs")
    assert Decimal(row["estimate_usd"]) == estimate and row["settled_at"] is None
    assert json.loads(row["units_asked"]) == {"seconds": 10}

    status, _, doc = call(sidecar, "GET", f"/eachlabs/v1/prediction/{pid}", headers=headers)
    assert (status, doc["status"]) == (200, "processing")
    assert Decimal(account(sidecar, "media", cid)["reserved_usd"]) == estimate
    status, _, doc = call(sidecar, "GET", f"/eachlabs/v1/prediction/{pid}", headers=headers)
    assert (status, doc["status"]) == (200, "success")

    reported = 10 * EACHLABS_PER_SECOND
    row = settled_job(sidecar, f"provider_job_id = '{pid}'")
    assert (row["state"], Decimal(row["cost_usd"]), row["cost_source"]) == ("succeeded", reported, "provider")
    assert isinstance(row["cost_usd"], str)  # DECIMAL, never a float
    acct = account(sidecar, "media", cid)
    assert (Decimal(acct["reserved_usd"]), Decimal(acct["spent_usd"])) == (0, reported)
    # the submit and both polls are calls of their own, free: the job's row has the cost
    calls = sidecar.rows(f"tags['case'] = '{cid}'", 3)
    assert [(c["operation"], c["cost_usd"], c["price_source"]) for c in calls] == [("prediction", "0E-12", "free")] * 3 \
        or [(c["operation"], Decimal(c["cost_usd"]), c["price_source"]) for c in calls] == [("prediction", 0, "free")] * 3
    assert row["call_id"] == calls[0]["call_id"]


def test_eachlabs_failed_job_releases_its_reservation(sidecar: Sidecar) -> None:
    cid, headers = case()
    pid = submit_kling(sidecar, headers, fake_outcome="failed", fake_polls=0)
    assert Decimal(account(sidecar, "media", cid)["reserved_usd"]) == 10 * PER_SECOND
    status, _, doc = call(sidecar, "GET", f"/eachlabs/v1/prediction/{pid}", headers=headers)
    assert (status, doc["status"]) == (200, "failed")
    row = settled_job(sidecar, f"provider_job_id = '{pid}'")
    assert (row["state"], Decimal(row["cost_usd"])) == ("failed", 0)
    acct = account(sidecar, "media", cid)
    assert (Decimal(acct["reserved_usd"]), Decimal(acct["spent_usd"])) == (0, 0)


def test_a_job_the_app_never_polls_is_settled_by_the_sinks_process(sidecar: Sidecar, jobs_api: FakeJobsApi) -> None:
    cid, headers = case()
    before = jobs_api.polls("/v1/prediction/")
    pid = submit_kling(sidecar, headers, upstream="eachlabs-polled")
    row = settled_job(sidecar, f"provider_job_id = '{pid}'")
    assert (row["state"], Decimal(row["cost_usd"]), row["cost_source"]) == (
        "succeeded", 10 * EACHLABS_PER_SECOND, "provider")
    assert jobs_api.polls(f"/v1/prediction/{pid}") >= 2 and jobs_api.polls("/v1/prediction/") > before
    assert len(sidecar.rows(f"tags['case'] = '{cid}'")) == 1  # only the submit went through the sidecar
    # the forwarder's guard learns the settlement from the ledger and releases the reservation
    def released() -> dict[str, Any] | None:
        a = account(sidecar, "media", cid)
        return a if Decimal(a["reserved_usd"]) == 0 else None

    acct = wait_for(released, "the reservation to settle")
    assert Decimal(acct["spent_usd"]) == 10 * EACHLABS_PER_SECOND


def test_synchronous_prediction_settles_in_its_own_call(sidecar: Sidecar) -> None:
    cid, headers = case()
    status, _, doc = call(sidecar, "POST", "/eachlabs/v1/prediction/run",
                          {"model": "kling-v2-1-video", "input": {"prompt": "x", "duration": 5}}, headers)
    assert (status, doc["status"]) == (200, "success")
    row = settled_job(sidecar, f"provider_job_id = '{doc['id']}'")
    assert (row["state"], Decimal(row["cost_usd"]), row["cost_source"]) == ("succeeded", 5 * EACHLABS_PER_SECOND,
                                                                           "provider")
    acct = account(sidecar, "media", cid)
    assert (Decimal(acct["reserved_usd"]), Decimal(acct["spent_usd"])) == (0, 5 * EACHLABS_PER_SECOND)


def test_a_job_whose_estimate_does_not_fit_is_refused(sidecar: Sidecar, jobs_api: FakeJobsApi) -> None:
    cid, headers = case(team="tight")
    posts = sum(1 for m, p, _ in jobs_api.requests if m == "POST")
    status, h, doc = call(sidecar, "POST", "/eachlabs/v1/prediction",
                          {"model": "kling-v2-1-video", "input": {"prompt": "long", "duration": 20}}, headers)
    assert status == 429, doc
    assert h["x-meterline-budget"] == "tight" and h["x-should-retry"] == "false"
    assert "$2" in doc["message"]  # 20 s at $0.10: more than the $1 limit
    assert sum(1 for m, p, _ in jobs_api.requests if m == "POST") == posts  # never sent
    row = sidecar.rows(f"tags['case'] = '{cid}'")[0]
    assert (row["outcome"], row["status_code"]) == ("blocked", 429)
    assert job_rows(sidecar, f"call_id = '{row['call_id']}'") == []


def test_the_same_submit_twice_with_one_idempotency_key_is_one_job(sidecar: Sidecar, jobs_api: FakeJobsApi) -> None:
    cid, headers = case()
    headers["Idempotency-Key"] = f"idem-{cid}"
    body = {"model": "kling-v2-1-video", "input": {"prompt": "twice", "duration": 4}}
    posts = sum(1 for m, p, _ in jobs_api.requests if m == "POST")
    s1, h1, d1 = call(sidecar, "POST", "/eachlabs/v1/prediction", body, headers)
    s2, h2, d2 = call(sidecar, "POST", "/eachlabs/v1/prediction", body, headers)
    assert (s1, s2) == (200, 200) and d1 == d2
    assert "x-meterline-idempotent-replay" not in h1 and h2["x-meterline-idempotent-replay"] == "true"
    assert sum(1 for m, p, _ in jobs_api.requests if m == "POST") == posts + 1  # the provider saw one submit
    assert len(sidecar.rows(f"tags['case'] = '{cid}'", 2)) == 2  # both calls are in the ledger...
    wait_for(lambda: job_rows(sidecar, f"provider_job_id = '{d1['predictionID']}'"), "the job row")
    time.sleep(0.4)
    assert len(job_rows(sidecar, f"provider_job_id = '{d1['predictionID']}'")) == 1  # ...as one job
    assert Decimal(account(sidecar, "media", cid)["reserved_usd"]) == 4 * PER_SECOND  # reserved once
    # another body under the same key is another request
    s3, h3, d3 = call(sidecar, "POST", "/eachlabs/v1/prediction", {**body, "input": {"duration": 5}}, headers)
    assert s3 == 200 and d3["predictionID"] != d1["predictionID"]


def test_a_settlement_journaled_while_the_sinks_process_is_down_reaches_the_jobs_table(sidecar: Sidecar) -> None:
    import os
    import signal

    cid, headers = case()
    pid = submit_kling(sidecar, headers, duration=3)
    wait_for(lambda: job_rows(sidecar, f"provider_job_id = '{pid}'"), "the job's row")
    sinks = sidecar.health()["sinks"]["pid"]
    os.kill(sinks, signal.SIGKILL)
    for _ in range(2):  # the app's polls go on; the settlement waits in the journal
        status, _, doc = call(sidecar, "GET", f"/eachlabs/v1/prediction/{pid}", headers=headers)
        assert status == 200
    assert doc["status"] == "success"
    acct = account(sidecar, "media", cid)  # the guard settled at once
    assert (Decimal(acct["reserved_usd"]), Decimal(acct["spent_usd"])) == (0, 3 * EACHLABS_PER_SECOND)
    wait_for(lambda: _sinks_back(sidecar, sinks), "the sinks process again", timeout=30)
    row = settled_job(sidecar, f"provider_job_id = '{pid}'", timeout=20)
    assert (row["state"], Decimal(row["cost_usd"]), row["cost_source"]) == ("succeeded", 3 * EACHLABS_PER_SECOND,
                                                                           "provider")


def _sinks_back(sc: Sidecar, old: int) -> bool:
    try:
        h = sc.health()
        return h["sinks"].get("pid") not in (None, old) and sc.sql("SELECT 1 AS one") == [{"one": 1}]
    except Exception:  # noqa: BLE001 - still restarting
        return False


def test_a_repeat_while_the_first_submit_is_in_flight_gets_409(sidecar: Sidecar, jobs_api: FakeJobsApi) -> None:
    import threading

    cid, headers = case()
    headers["Idempotency-Key"] = f"slow-{cid}"
    body = {"model": "kling-v2-1-video", "input": {"prompt": "slow", "duration": 2}}
    first: list[Any] = []
    t = threading.Thread(target=lambda: first.append(call(sidecar, "POST", "/eachlabs/v1/prediction", body,
                                                          {**headers, "x-fake-delay-s": "2.0"})))
    t.start()
    time.sleep(0.3)  # the first is at the provider (which takes 2 s to answer)
    status, h, doc = call(sidecar, "POST", "/eachlabs/v1/prediction", body, headers)
    assert (status, h.get("x-meterline-idempotent-replay"), (doc or {}).get("error", {}).get("type")) == (
        409, "in-flight", "idempotency_conflict")
    t.join(10)
    assert first[0][0] == 200
    status, h, doc = call(sidecar, "POST", "/eachlabs/v1/prediction", body, headers)
    assert (status, h["x-meterline-idempotent-replay"], doc) == (200, "true", first[0][2])


# --- Gemini Veo ----------------------------------------------------------------------------------

def test_veo_operation_polled_to_done_settles_at_seconds_made(sidecar: Sidecar) -> None:
    # over REST as the Veo docs show it (the installed google-genai allows generate_videos on Vertex only)
    cid, headers = case()
    headers["x-goog-api-key"] = GEMINI_KEY
    status, _, op = call(sidecar, "POST", "/gemini/v1beta/models/veo-3.0-generate-001:predictLongRunning",
                         {"instances": [{"prompt": "a lighthouse at dawn"}],
                          "parameters": {"durationSeconds": 8, "resolution": "1080p", "aspectRatio": "16:9",
                                         "sampleCount": 1}}, headers)
    assert status == 200 and not op.get("done"), op
    estimate = 8 * VEO_1080P
    assert Decimal(account(sidecar, "media", cid)["reserved_usd"]) == estimate
    status, _, op = call(sidecar, "GET", f"/gemini/v1beta/{op['name']}", headers=headers)
    assert status == 200 and not op.get("done")
    status, _, op = call(sidecar, "GET", f"/gemini/v1beta/{op['name']}", headers=headers)
    assert op["done"] and len(op["response"]["generateVideoResponse"]["generatedSamples"]) == 1
    row = settled_job(sidecar, f"provider_job_id = '{op['name']}'")
    assert (row["state"], row["model"], row["provider"]) == ("succeeded", "veo-3.0-generate-001", "google")
    assert (Decimal(row["estimate_usd"]), Decimal(row["cost_usd"]), row["cost_source"]) == (estimate, estimate, "price")
    assert json.loads(row["units_made"]) == {"resolution": "1080p", "videos": 1, "seconds": 8}
    acct = account(sidecar, "media", cid)
    assert (Decimal(acct["reserved_usd"]), Decimal(acct["spent_usd"])) == (0, estimate)


# --- OpenAI Batch API ----------------------------------------------------------------------------

def test_batch_is_priced_from_every_line_of_its_output_file(sidecar: Sidecar, jobs_api: FakeJobsApi) -> None:
    cid, headers = case()
    client = openai.OpenAI(api_key=OPENAI_KEY, base_url=f"{sidecar.url}/openai/v1", max_retries=0,
                           default_headers=headers)
    batch = client.batches.create(input_file_id="file-input-1", endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.status == "validating"
    assert client.batches.retrieve(batch.id).status == "in_progress"
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    time.sleep(0.5)
    assert job_rows(sidecar, f"provider_job_id = '{batch.id}'")[0]["settled_at"] is None  # until the file is read
    content = client.files.content(done.output_file_id).read()
    assert len(content.splitlines()) == 3

    row = settled_job(sidecar, f"provider_job_id = '{batch.id}'")
    submitted = datetime.fromisoformat(row["submitted_at"])
    want = Decimal(0)
    for body in jobs_api.batches[batch.id]["lines"]:
        u = body["usage"]
        usage = genai_prices.Usage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"],
                                   cache_read_tokens=u["prompt_tokens_details"]["cached_tokens"] or None)
        price = genai_prices.calc_price(usage, body["model"], provider_id="openai", genai_request_timestamp=submitted,
                                        price_context={"processing": "batch"})
        standard = genai_prices.calc_price(usage, body["model"], provider_id="openai",
                                           genai_request_timestamp=submitted)
        assert price.total_price < standard.total_price  # the batch rate, not the standard one
        want += price.total_price.quantize(QUANTUM)
    assert (row["state"], row["cost_source"], Decimal(row["cost_usd"])) == ("succeeded", "price", want)
    assert json.loads(row["units_made"]) == {"requests": 3}
    assert row["model"] == "gpt-4o-mini-2024-07-18"


# --- restarts and jobs that never finish ---------------------------------------------------------

def test_a_reservation_survives_a_forwarder_restart_and_an_unfinished_job_becomes_unknown(
        jobs_api: FakeJobsApi, tmp_path: Path) -> None:
    import os
    import signal

    cfg = config_for(jobs_api.base_url)
    cfg["jobs"] = {"poll_s": 0.3, "max_poll_s": 1, "sync_s": 0.2, "unknown_after_s": 4}
    sc = Sidecar(tmp_path / "restart", cfg, env={"TEST_EACHLABS_KEY": EACHLABS_KEY}).start()
    try:
        cid, headers = case()
        pid = submit_kling(sc, headers, fake_polls=1000)  # it never finishes; nothing polls it (no api_key)
        wait_for(lambda: job_rows(sc, f"provider_job_id = '{pid}'"), "the job's row")
        first = sc.forwarder_pid()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _new_forwarder(sc, first), "a new forwarder", timeout=30)
        # the new forwarder rebuilt the reservation from the ledger's unsettled job
        assert Decimal(account(sc, "media", cid)["reserved_usd"]) == 10 * PER_SECOND
        row = settled_job(sc, f"provider_job_id = '{pid}'", timeout=20)
        assert (row["state"], Decimal(row["cost_usd"]), row["cost_source"]) == ("unknown", 10 * PER_SECOND, "estimate")

        def released() -> dict[str, Any] | None:
            a = account(sc, "media", cid)
            return a if Decimal(a["reserved_usd"]) == 0 else None

        assert Decimal(wait_for(released, "the reservation to settle")["spent_usd"]) == 10 * PER_SECOND
        # and a settled job's cost stays in its window after another restart (its calls cost 0)
        second = sc.forwarder_pid()
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: _new_forwarder(sc, second), "another forwarder", timeout=30)
        acct = account(sc, "media", cid)
        assert (Decimal(acct["reserved_usd"]), Decimal(acct["spent_usd"])) == (0, 10 * PER_SECOND)
    finally:
        sc.stop()


def _new_forwarder(sc: Sidecar, old: int) -> bool:
    try:
        return sc.health()["forwarder"]["pid"] != old
    except OSError:
        return False


def test_the_dashboard_lists_jobs_still_reserved(sidecar: Sidecar) -> None:
    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package: chromium)")
    from playwright.sync_api import sync_playwright

    cid, headers = case()
    pid = submit_kling(sidecar, headers, fake_polls=1000)  # never finishes while the test looks
    row = wait_for(lambda: job_rows(sidecar, f"provider_job_id = '{pid}'"), "the job's row")[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{sidecar.url}/_meterline/")
            item = page.locator(f'#jobs li[data-job="{row["job_id"]}"]')
            item.wait_for()
            text = item.text_content() or ""
            assert "kling-v2-1-video" in text and "submitted" in text and "$1.00 reserved" in text, text
        finally:
            browser.close()


def test_a_batch_the_app_never_downloads_is_priced_by_the_sinks_process(sidecar: Sidecar, jobs_api: FakeJobsApi) -> None:
    cid, headers = case()
    client = openai.OpenAI(api_key=OPENAI_KEY, base_url=f"{sidecar.url}/openai-polled/v1", max_retries=0,
                           default_headers=headers)
    batch = client.batches.create(input_file_id="file-input-2", endpoint="/v1/chat/completions",
                                  completion_window="24h")
    row = settled_job(sidecar, f"provider_job_id = '{batch.id}'", timeout=30)
    assert jobs_api.batches[batch.id]["polls"] >= 2  # polled by the sinks process to completion
    assert any(m == "GET" and p.endswith("/content") and h.get("authorization") == f"Bearer {OPENAI_KEY}"
               for m, p, h in jobs_api.requests)  # and its output file downloaded with the config's key
    want = Decimal(0)
    for body in jobs_api.batches[batch.id]["lines"]:
        u = body["usage"]
        usage = genai_prices.Usage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"],
                                   cache_read_tokens=u["prompt_tokens_details"]["cached_tokens"] or None)
        want += genai_prices.calc_price(usage, body["model"], provider_id="openai",
                                        genai_request_timestamp=datetime.fromisoformat(row["submitted_at"]),
                                        price_context={"processing": "batch"}).total_price.quantize(QUANTUM)
    assert (row["state"], row["cost_source"], Decimal(row["cost_usd"])) == ("succeeded", "price", want)
    assert len(sidecar.rows(f"tags['case'] = '{cid}'")) == 1  # only the app's submit
