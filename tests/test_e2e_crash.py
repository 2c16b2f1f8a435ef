"""End to end, durability: the sidecar is SIGKILLed during a burst of concurrent calls and restarted on
the same ledger. Every call whose response reached the app is in the ledger exactly once, as it
ended; every call in flight at the kill is there once, as `interrupted`."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import pytest

from tests.fakes import reply_text

if TYPE_CHECKING:
    from conftest import E2E, Case
    from tests.sidecar_process import Sidecar

MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
CALLS = 50
SLOW_STREAMS = set(range(3, CALLS, 5))  # 10 streams still sending when the sidecar dies
SLOW_WAITS = set(range(4, CALLS, 10))  # 5 calls still waiting for their response
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _fast_call(e2e: E2E, case: Case, i: int) -> str:
    """One complete call (four kinds, streamed or not); returns the response id the app saw."""
    kind = i % 4
    if kind == 0:
        completion = e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        return completion.id
    if kind == 1:
        chunks = list(e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply_text(5)
        return chunks[0].id
    if kind == 2:
        with e2e.anthropic(case).messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES) as s:
            return s.get_final_message().id
    client = e2e.gemini(case)
    response = client.models.generate_content(model="gemini-2.5-flash", contents="hello")
    assert response.response_id
    return response.response_id


def test_sigkill_during_a_burst_loses_and_duplicates_nothing(e2e: E2E, start_sidecar: Callable[..., Sidecar],
                                                              tmp_path: Any) -> None:
    workdir = tmp_path / "crash"
    first = e2e.on(start_sidecar(workdir=workdir))
    cases = [first.case(tags=f"n={i}") for i in range(CALLS)]
    slow = SLOW_STREAMS | SLOW_WAITS
    for i in slow:
        cases[i].headers.update({"x-fake-scenario": "slow", "x-fake-chunks": "400", "x-fake-chunk-delay-ms": "25"})
    streaming = threading.Semaphore(0)  # released by each slow stream once it is mid-body
    go = threading.Event()  # the fast calls start together once the slow ones are in flight
    completed = threading.Semaphore(0)
    seen: dict[int, str] = {}  # response ids of the responses that reached the app whole
    broken: dict[int, BaseException] = {}

    def call(i: int) -> None:
        case = cases[i]
        try:
            if i in SLOW_STREAMS:
                stream = first.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                    stream=True)
                for n, _chunk in enumerate(stream):
                    if n == 1:
                        streaming.release()
                raise AssertionError("a slow stream finished before the kill")
            if i in SLOW_WAITS:
                first.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                raise AssertionError("a slow call finished before the kill")
            assert go.wait(30)
            seen[i] = _fast_call(first, case, i)
            completed.release()
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - the kill breaks the calls in flight
            broken[i] = e

    with ThreadPoolExecutor(CALLS) as pool:
        futures = [pool.submit(call, i) for i in range(CALLS)]
        for _ in SLOW_STREAMS:
            assert streaming.acquire(timeout=30)
        deadline = time.monotonic() + 30  # every slow call reached the provider
        while sum(len(first.exchanges(cases[i], 1, 0)) for i in SLOW_WAITS) < len(SLOW_WAITS):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        go.set()
        for _ in range(10):  # the burst is under way: some calls are done, the rest in flight
            assert completed.acquire(timeout=30)
        first.sidecar.kill()
        for f in futures:
            f.result(timeout=30)

    assert len(seen) >= 10 and not set(seen) & slow
    assert slow <= set(broken) and set(seen) | set(broken) == set(range(CALLS))

    second = e2e.on(start_sidecar(workdir=workdir))
    rows = second.rows("true", len(seen) + len(slow), timeout=15)
    by_n: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_n.setdefault(int(row["tags"]["n"]), []).append(row)
    assert all(len(found) == 1 for found in by_n.values()), "a call is recorded twice"
    assert len({r["call_id"] for r in rows}) == len(rows) and set(by_n) <= set(range(CALLS))
    for i, response_id in seen.items():  # every response the app got whole is there, as it ended
        assert i in by_n, f"completed call n={i} is missing"
        (row,) = by_n[i]
        assert row["tags"]["case"] == cases[i].id
        assert row["outcome"] == "ok" and row["response_id"] == response_id, row
        assert row["ended_at"] is not None and row["input_tokens"] and row["cost_usd"] is not None, row
    for i in slow:  # the calls in flight are there once, as interrupted
        assert i in by_n, f"in-flight call n={i} is missing"
        (row,) = by_n[i]
        assert row["outcome"] == "interrupted", row
        assert row["ended_at"] is None and row["cost_usd"] is None and row["status_code"] is None, row
    for i in set(broken) - slow:  # cut short by the kill: at most one row, interrupted unless it had ended
        assert [r["outcome"] for r in by_n.get(i, [])] in ([], ["interrupted"], ["ok"]), by_n[i]
    outcomes = sorted(r["outcome"] for r in rows)

    # killed again after the replay: nothing is inserted twice
    second.sidecar.kill()
    third = e2e.on(start_sidecar(workdir=workdir))
    again = third.sidecar.sql("SELECT outcome, count(DISTINCT call_id) AS ids, count(*) AS n FROM calls "
                              "GROUP BY ALL ORDER BY outcome")
    assert again == [{"outcome": o, "ids": outcomes.count(o), "n": outcomes.count(o)} for o in sorted(set(outcomes))]
