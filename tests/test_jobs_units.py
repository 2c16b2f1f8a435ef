"""Job pieces without the sidecar: the config's jobs/api_key/by_resolution keys, job events through the journal, the jobs table's upserts, unit prices."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import duckdb
import pytest

from jobs import eachlabs, openai_batch, store, veo
from jobs.model import JobEvent, settle_cost
from ledger import schema
from ledger.pricing import Pricer
from ledger.records import CallExtras
from sidecar.config import ConfigError, parse

AT = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("doc, message", [
    ({"jobs": {"unknown_after_s": 0}}, "'jobs.unknown_after_s': expected a positive number"),
    ({"jobs": {"pol_s": 1}}, "unknown config key 'jobs.pol_s'"),
    ({"jobs": {"fields": {"my-model": {"frames": "input.n"}}}}, "'jobs.fields.my-model.frames': unknown unit"),
    ({"upstreams": {"el": {"base_url": "https://api.eachlabs.ai", "adapter": "eachlabs",
                           "api_key": "${METERLINE_TEST_UNSET_VAR}"}}},
     "'upstreams.el.api_key': environment variable METERLINE_TEST_UNSET_VAR is not set"),
    ({"prices": [{"model": "veo-*", "by_resolution": {"1080p": {"per_minute": 1}}}]},
     "'prices[0].by_resolution.1080p': expected per_second and/or per_image"),
])
def test_bad_job_config_names_the_key(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(doc)
    assert message in str(e.value)


def test_api_key_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_TEST_EL_KEY", "secret")
    cfg = parse({"upstreams": {"el": {"base_url": "https://api.eachlabs.ai", "adapter": "eachlabs",
                                      "api_key": "${METERLINE_TEST_EL_KEY}"}},
                 "jobs": {"fields": {"wan-*": {"seconds": "input.length"}}}})
    assert cfg.upstreams["el"].api_key == "secret" and cfg.upstreams["el"].adapter == "eachlabs"
    assert cfg.upstreams["openai"].api_key is None
    ask = eachlabs.ask("POST", "/v1/prediction", {"model": "wan-2.1", "input": {"length": "6"}}, cfg.jobs.fields)
    assert ask.units == {"seconds": 6}


def test_units_are_priced_per_second_per_image_and_per_resolution() -> None:
    cfg = parse({"prices": [{"model": "veo-*", "per_second": "0.4", "by_resolution": {"1080p": {"per_second": "0.6"}}},
                            {"model": "flux-*", "per_image": "0.03"}]})
    p = Pricer(cfg.prices)
    assert p.units_cost("google", "veo-3", {"seconds": 8}, AT) == Decimal("3.2")
    assert p.units_cost("google", "veo-3", {"seconds": 8, "resolution": "1080p"}, AT) == Decimal("4.8")
    assert p.units_cost("eachlabs", "flux-pro", {"images": 4}, AT) == Decimal("0.12")
    assert p.units_cost("eachlabs", "flux-pro", {"seconds": 4}, AT) is None  # no per_second: not zero
    assert p.units_cost("eachlabs", "unknown-model", {"seconds": 4}, AT) is None


def test_settlement_prefers_the_provider_then_units_made_then_the_estimate() -> None:
    assert settle_cost("succeeded", Decimal("0.7"), Decimal("1"), Decimal("2")) == (Decimal("0.7"), "provider")
    assert settle_cost("succeeded", None, Decimal("1"), Decimal("2")) == (Decimal("1"), "price")
    assert settle_cost("succeeded", None, None, Decimal("2")) == (Decimal("2"), "estimate")
    assert settle_cost("failed", None, Decimal("1"), Decimal("2")) == (Decimal(0), "provider")  # released
    assert settle_cost("failed", Decimal("0.1"), None, Decimal("2")) == (Decimal("0.1"), "provider")  # billed anyway
    assert settle_cost("unknown", None, None, Decimal("2")) == (Decimal("2"), "estimate")


def test_job_events_cross_the_journal_with_exact_money() -> None:
    import orjson

    from ledger.journal import _extras  # the reader of a final line's extras

    ev = JobEvent("settle", "j1", "eachlabs", "p1", "succeeded", AT, cost_usd=Decimal("0.000000000001"),
                  cost_source="provider", units_made={"seconds": 10})
    extras = CallExtras(jobs=[ev.to_json()])
    line = orjson.loads(orjson.dumps(extras))  # as encode_final writes the extras of a final line
    back = JobEvent.from_json(_extras(line).jobs[0])
    assert back == ev
    with pytest.raises(ValueError):
        JobEvent.from_json({"event": "nonsense", "upstream": "x", "at": AT.isoformat()})


def test_the_jobs_table_settles_once_and_takes_polls_of_jobs_it_never_saw_submitted() -> None:
    con = duckdb.connect()
    schema.create(con)
    store.apply_job_events(con, [JobEvent("submit", "j1", "el", "p1", "submitted", AT, call_id="c1",
                                          provider="eachlabs", model="kling", units_asked={"seconds": 10},
                                          estimate_usd=Decimal("1"))])
    store.apply_job_events(con, [JobEvent("poll", None, "el", "p1", "running", AT)])
    assert con.execute("SELECT state, settled_at FROM jobs").fetchall() == [("running", None)]
    # a terminal poll the forwarder could not settle: settled here, provider cost first
    store.apply_job_events(con, [JobEvent("poll", None, "el", "p1", "succeeded", AT, cost_usd=Decimal("0.7"),
                                          cost_source="provider")])
    store.apply_job_events(con, [JobEvent("settle", "j1", "el", "p1", "failed", AT, cost_usd=Decimal(0))])
    assert con.execute("SELECT state, cost_usd, cost_source, polls FROM jobs").fetchall() == [
        ("succeeded", Decimal("0.7"), "provider", 1)]  # settled once; the late event only counts
    store.apply_job_events(con, [JobEvent("poll", None, "el", "p9", "succeeded", AT, cost_usd=Decimal("0.2"),
                                          cost_source="provider")])
    assert con.execute("SELECT call_id, cost_usd FROM jobs WHERE provider_job_id = 'p9'").fetchall() == [
        (None, Decimal("0.2"))]
    assert [d["job_id"] for d in store.unsettled_jobs(con)] == []


def test_requests_are_told_apart() -> None:
    assert veo.ask("POST", "/v1beta/models/veo-3:predictLongRunning",
                   {"parameters": {"durationSeconds": 6, "sampleCount": 2}}).units == {
        "seconds": 12, "seconds_each": 6, "videos": 2}
    assert veo.ask("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {}) is None
    assert veo.poll("GET", "/v1beta/models/veo-3/operations/abc").provider_job_id == "models/veo-3/operations/abc"
    assert eachlabs.poll("GET", "/v1/prediction/abc").provider_job_id == "abc"
    assert eachlabs.poll("POST", "/v1/prediction/abc") is None
    assert openai_batch.poll("GET", "/v1/batches/batch_1").provider_job_id == "batch_1"
    assert openai_batch.poll("GET", "/v1/batches") is None
    assert openai_batch.poll("GET", "/v1/files/file-1/content").file_id == "file-1"
    assert openai_batch.ask("GET", "/v1/batches", None) is None


def test_the_poller_backs_off_to_its_bound_and_settles_what_it_learns() -> None:
    import asyncio
    from datetime import timedelta

    from jobs.poller import Poller, Target
    from jobs.settings import JobsConfig

    con = duckdb.connect()
    schema.create(con)
    store.apply_job_events(con, [
        JobEvent("submit", "v1", "gemini", "models/veo-3/operations/op1", "submitted", AT, provider="google",
                 model="veo-3", units_asked={"seconds": 8, "seconds_each": 8, "videos": 1}, estimate_usd=Decimal("3.2")),
        JobEvent("submit", "nokey", "plain", "p2", "submitted", AT, provider="eachlabs", estimate_usd=Decimal("1"))])
    answers = [{"name": "models/veo-3/operations/op1", "metadata": {}}] * 4 + [
        {"name": "models/veo-3/operations/op1", "done": True,
         "response": {"generateVideoResponse": {"generatedSamples": [{"video": {"uri": "u"}}]}}}]
    asked: list[tuple[str, dict]] = []

    async def fetch(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        asked.append((url, headers))
        import orjson
        return 200, orjson.dumps(answers[len(asked) - 1])

    async def run(name: str, *args):
        return getattr(store, name)(con, *args)

    price = Pricer(parse({"prices": [{"model": "veo-*", "per_second": "0.4"}]}).prices).units_cost
    poller = Poller(JobsConfig(poll_s=1, max_poll_s=4, unknown_after_s=3600),
                    {"gemini": Target("https://g.example", "gemini", "k"), "plain": Target("https://e", "eachlabs", None)},
                    fetch, run, price)
    times = []
    t = AT
    while not con.execute("SELECT settled_at FROM jobs WHERE job_id = 'v1'").fetchone()[0]:
        before = len(asked)
        asyncio.run(poller.once(t))
        if len(asked) > before:
            times.append((t - AT).total_seconds())
        t += timedelta(seconds=0.5)
        assert t < AT + timedelta(seconds=60)
    assert times == [1.0, 3.0, 7.0, 11.0, 15.0]  # after poll_s, then 2 s, 4 s, and never more than max_poll_s
    assert asked[0] == ("https://g.example/v1beta/models/veo-3/operations/op1", {"x-goog-api-key": "k"})
    assert con.execute("SELECT state, cost_usd, cost_source FROM jobs WHERE job_id = 'v1'").fetchone() == (
        "succeeded", Decimal("3.2"), "price")
    # the job of an upstream without api_key is never polled; past unknown_after_s it is `unknown` at its estimate
    asyncio.run(poller.once(AT + timedelta(seconds=3601)))
    assert con.execute("SELECT state, cost_usd, cost_source FROM jobs WHERE job_id = 'nokey'").fetchone() == (
        "unknown", Decimal(1), "estimate")
    assert all("https://e" not in url for url, _ in asked)
