"""The fleet ledger gets more than `calls`, end to end: a real sidecar, the openai SDK, a real PostgreSQL.

A routed call's `attempts` and an async job's `jobs` row (as it moves submitted -> running -> succeeded,
partly while Postgres is stopped) arrive in Postgres exactly once, with `instance` set; the fleet
views still answer.
"""
from __future__ import annotations

import http.client
import json
import time
from decimal import Decimal
from typing import Any, Iterator

import openai
import psycopg
import pytest

from tests.fakes import FakeProvider
from tests.fakes.jobs_api import EACHLABS_KEY, EACHLABS_PER_SECOND, FakeJobsApi
from tests.fleet_servers import PostgresServer
from tests.sidecar_process import Sidecar

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
INSTANCE = "ship-all-1"


def pg(url: str, query: str) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as con:
            return con.execute(query).fetchall()
    except psycopg.Error:  # down, or not migrated yet
        return []


def wait_for(fn: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def eachlabs(sc: Sidecar, method: str, path: str, body: Any = None) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-API-Key": EACHLABS_KEY})
        r = conn.getresponse()
        doc = json.loads(r.read())
        assert r.status == 200, doc
        return doc
    finally:
        conn.close()


@pytest.fixture
def fakes() -> Iterator[tuple[FakeProvider, FakeProvider, FakeJobsApi]]:
    a, b = FakeProvider().start_in_thread(), FakeProvider().start_in_thread()
    jobs = FakeJobsApi().start()
    try:
        yield a, b, jobs
    finally:
        jobs.stop()
        for f in (a, b):
            f.fail_with("")
            f.stop_thread()


def test_routed_attempts_and_a_job_through_its_states_reach_postgres_once(
        fakes: tuple[FakeProvider, FakeProvider, FakeJobsApi], postgres_server: PostgresServer,
        postgres_url: str, tmp_path: Any) -> None:
    a, b, jobs = fakes
    config = {
        "upstreams": {"openai": {"base_url": a.base_url},
                      "backup": {"base_url": b.base_url, "adapter": "openai", "provider": "openai"},
                      "eachlabs": {"base_url": jobs.base_url, "adapter": "eachlabs"}},
        "routes": {"fb": {"targets": [{"upstream": "openai", "model": "gpt-4o-mini"},
                                      {"upstream": "backup", "model": "gpt-4o"}], "circuit": {"failures": 100}}},
        "prices": [{"provider": "eachlabs", "model": "kling-*", "per_second": "0.1"}],
        "jobs": {"poll_s": 30, "max_poll_s": 60, "sync_s": 0.2},  # the app polls; the sinks process waits
        "fleet": {"instance": INSTANCE, "postgres": postgres_url, "ship_interval_s": 0.2, "retry_s": 0.3,
                  "connect_timeout_s": 2},
    }
    sc = Sidecar(tmp_path / "sc", config)
    sc.start()
    try:
        a.fail_with("error503")
        client = openai.OpenAI(api_key="sk-route", base_url=f"{sc.url}/openai/v1", max_retries=0, timeout=20)
        reply = client.chat.completions.with_raw_response.create(
            model="fb", messages=[{"role": "user", "content": "hi"}])
        assert reply.headers["x-meterline-attempts"] == "2"
        a.fail_with("")
        pid = eachlabs(sc, "POST", "/eachlabs/v1/prediction",
                       {"model": "kling-v2-1-video", "version": "0.0.1",
                        "input": {"prompt": "a cat surfing", "duration": 10}})["predictionID"]
        wait_for(lambda: pg(postgres_url, f"SELECT 1 FROM jobs WHERE provider_job_id = '{pid}'"), "the job's first row")
        postgres_server.stop()
        try:
            assert eachlabs(sc, "GET", f"/eachlabs/v1/prediction/{pid}")["status"] == "processing"
            assert eachlabs(sc, "GET", f"/eachlabs/v1/prediction/{pid}")["status"] == "success"
            wait_for(lambda: sc.sql(f"SELECT 1 FROM jobs WHERE provider_job_id = '{pid}' AND settled_at IS NOT NULL"),
                     "the job settled in the local ledger")
            wait_for(lambda: sc.health()["fleet"]["postgres"]["up"] is False, "healthz to see Postgres down")
            assert sc.health()["fleet"]["postgres"]["backlog_rows"] >= 1
        finally:
            postgres_server.start()
        done = wait_for(lambda: pg(postgres_url, f"SELECT state, cost_usd, cost_source, instance, polls FROM jobs "
                                                 f"WHERE provider_job_id = '{pid}' AND settled_at IS NOT NULL"),
                        "the settled job in Postgres")
        local = sc.sql(f"SELECT state, cost_usd, polls FROM jobs WHERE provider_job_id = '{pid}'")
        assert done == [("succeeded", 10 * EACHLABS_PER_SECOND, "provider", INSTANCE, local[0]["polls"])]
        assert Decimal(local[0]["cost_usd"]) == 10 * EACHLABS_PER_SECOND
        routed = sc.sql("SELECT call_id FROM calls WHERE route = 'fb'")
        assert len(routed) == 1
        call_id = routed[0]["call_id"]
        tries = wait_for(lambda: pg(postgres_url, "SELECT attempt, upstream, status_code, instance FROM attempts "
                                                  f"WHERE call_id = '{call_id}' ORDER BY attempt"), "the attempts")
        assert tries == [(1, "openai", 503, INSTANCE), (2, "backup", 200, INSTANCE)]
        # every local call is in Postgres once, with its instance, and the fleet views read them
        n = len(sc.sql("SELECT call_id FROM calls"))
        wait_for(lambda: pg(postgres_url, f"SELECT 1 FROM calls WHERE instance = '{INSTANCE}' HAVING count(*) = {n}"),
                 "every call in Postgres")
        assert pg(postgres_url, f"SELECT count(*), count(DISTINCT call_id) FROM calls WHERE instance = '{INSTANCE}'") \
            == [(n, n)]
        assert pg(postgres_url, "SELECT count(*) FROM jobs") == [(1,)]
        by_model = dict(pg(postgres_url, "SELECT model, calls FROM spend_by_model WHERE provider = 'eachlabs'"))
        assert by_model == {"kling-v2-1-video": 3}
    finally:
        sc.stop()
