"""Async jobs in fleet budgets (`fleet.redis`): a job's estimate is held on the fleet's shared account,
so another sidecar is refused what the first one's running job reserved, and the job's cost settles
into Redis. Real sidecars, a real redis-server, the fake each::labs API over plain HTTP."""
from __future__ import annotations

import http.client
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.fakes.jobs_api import EACHLABS_KEY, EACHLABS_PER_SECOND, FakeJobsApi
from tests.sidecar_process import Sidecar
from tests.test_fleet_budgets import RULE, redis_spent

PER_SECOND = Decimal("0.1")  # the config's price: a 10 s job reserves $1 until it settles


@pytest.fixture
def jobs_api() -> Iterator[FakeJobsApi]:
    api = FakeJobsApi().start()
    yield api
    api.stop()


def request(sc: Sidecar, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-API-Key": EACHLABS_KEY})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def submit(sc: Sidecar) -> tuple[int, Any]:
    return request(sc, "POST", "/eachlabs/v1/prediction", {"model": "kling-v2-1-video", "version": "0.0.1",
                                                          "input": {"prompt": "a cat surfing", "duration": 10}})


def test_a_running_job_holds_the_fleets_allowance_and_settles_into_redis(tmp_path: Path, jobs_api: FakeJobsApi,
                                                                         redis_url: str) -> None:
    config = {
        "upstreams": {"eachlabs": {"base_url": jobs_api.base_url, "adapter": "eachlabs"}},
        "prices": [{"provider": "eachlabs", "model": "kling-*", "per_second": str(PER_SECOND)}],
        "budgets": [{"name": RULE, "window": "total", "limit_usd": "1.5", "action": "block"}],
        "jobs": {"poll_s": 30, "max_poll_s": 60, "sync_s": 0.2},
        "fleet": {"redis": redis_url, "sync_ms": 25},
    }
    one, two = Sidecar(tmp_path / "one", config), Sidecar(tmp_path / "two", config)
    one.start()
    two.start()
    try:
        status, doc = submit(one)
        assert status == 200, doc
        pid = doc["predictionID"]
        # $1 of the fleet's $1.5 is held by one's job: two (whose own ledger has spent nothing) is refused
        status, doc = submit(two)
        assert status == 429, doc
        assert request(one, "GET", f"/eachlabs/v1/prediction/{pid}")[1]["status"] == "processing"
        assert request(one, "GET", f"/eachlabs/v1/prediction/{pid}")[1]["status"] == "success"
        cost = 10 * EACHLABS_PER_SECOND
        deadline = time.monotonic() + 15
        while redis_spent(redis_url) != cost:
            assert time.monotonic() < deadline, ("the job's cost did not reach Redis", redis_spent(redis_url))
            time.sleep(0.05)
        # the held $1 is free again: 1.5 - 0.7 left, still less than another $1 job
        status, doc = submit(two)
        assert status == 429, doc
    finally:
        one.stop()
        two.stop()
