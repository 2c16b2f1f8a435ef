"""Routes end to end: the real openai and anthropic SDKs call a route by name through the real sidecar,
two fake upstreams fail on command, and the ledger's `calls` and `attempts` rows say what happened."""
from __future__ import annotations

import itertools
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import anthropic
import genai_prices
import httpx2
import openai
import pytest

from tests.conftest import launch, q
from tests.fakes import FakeProvider
from tests.sidecar_process import Sidecar

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
_ids = itertools.count()


def _route(*targets: str, **extra: Any) -> dict[str, Any]:
    return {"targets": [{"upstream": t.split("/")[0], "model": t.split("/")[1]} for t in targets],
            "circuit": {"failures": 100}, **extra}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeProvider, FakeProvider]]:
    a, b = FakeProvider().start_in_thread(), FakeProvider().start_in_thread()
    try:
        yield a, b
    finally:
        for f in (a, b):
            f.fail_with("")
            try:
                f.wait_settled_sync(timeout=10)
            except TimeoutError:
                pass
            f.stop_thread()


@pytest.fixture(scope="module")
def sidecar(fakes: tuple[FakeProvider, FakeProvider], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    a, b = fakes
    config = {
        "upstreams": {
            "openai": {"base_url": a.base_url}, "anthropic": {"base_url": a.base_url},
            "backup": {"base_url": b.base_url, "adapter": "openai", "provider": "openai"},
            "backup-anthropic": {"base_url": b.base_url, "adapter": "anthropic", "provider": "anthropic"},
            "gemini": {"base_url": a.base_url},
            "backup-gemini": {"base_url": b.base_url, "adapter": "gemini", "provider": "google"},
        },
        "routes": {
            "fb": {**_route("openai/gpt-4o-mini", "backup/gpt-4o"), "targets": [
                {"upstream": "openai", "model": "gpt-4o-mini"},
                {"upstream": "backup", "model": "gpt-4o", "api_key": "sk-backup-own"}]},
            "retry": _route("openai/gpt-4o-mini", "backup/gpt-4o",
                            retry={"attempts": 2, "backoff_ms": 10, "max_wait_s": 5}),
            "ttft": _route("openai/gpt-4o-mini", "backup/gpt-4o", timeouts={"ttft_s": 0.5}),
            "circ": {**_route("openai/gpt-4o-mini", "backup/gpt-4o"),
                     "circuit": {"failures": 2, "window_s": 60, "cooldown_s": 1.5}},
            "gem": _route("gemini/gemini-2.5-flash", "backup-gemini/gemini-2.5-pro"),
            "claude": _route("anthropic/claude-haiku-4-5", "backup-anthropic/claude-sonnet-4-5"),
            "cheap": {**_route("openai/gpt-4o", "backup/gpt-4o-mini"), "strategy": "cheapest"},
            "ruled": {**_route("openai/gpt-4o", "backup/gpt-4o-mini"),
                      "rules": [{"when": {"max_tokens_below": 100}, "use": "backup/gpt-4o-mini"}]},
            "split": {"strategy": "weighted", "targets": [
                {"upstream": "openai", "model": "gpt-4o-mini", "weight": 3},
                {"upstream": "backup", "model": "gpt-4o-mini", "weight": 1}]},
            "pricey": _route("openai/gpt-4o-mini", "backup/gpt-4.1"),
        },
        "budgets": [{"name": "no-gpt-4.1", "match": {"model": "gpt-4.1"}, "window": "day",
                     "limit_usd": 0.000001, "action": "block"}],
    }
    process = launch(tmp_path_factory.mktemp("routes"), config)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def normal(fakes: tuple[FakeProvider, FakeProvider]) -> Iterator[None]:
    for f in fakes:
        f.fail_with("")
        f.clear()
    yield
    for f in fakes:
        f.fail_with("")


def client(sidecar: Sidecar) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-route", base_url=f"{sidecar.url}/openai/v1", max_retries=0, timeout=20)


def chat(sidecar: Sidecar, route: str, **kw: Any) -> tuple[Any, Any, str]:
    """One call to the route; returns the SDK's raw response, the parsed one and the call's user id."""
    user = f"u{next(_ids)}-{time.monotonic_ns()}"
    raw = client(sidecar).chat.completions.with_raw_response.create(model=route, messages=MESSAGES, user=user, **kw)
    return raw, raw.parse(), user


def row_of(sidecar: Sidecar, user: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = sidecar.rows(f"user_id = '{user}' AND outcome <> 'interrupted'")
    assert len(rows) == 1, rows
    tries = sidecar.sql(f"SELECT * FROM attempts WHERE call_id = '{rows[0]['call_id']}' ORDER BY attempt")
    return rows[0], tries


def models_seen(fake: FakeProvider) -> list[str]:
    return [e.request_json["model"] for e in fake.exchanges if isinstance(e.request_json, dict)]


def catalog_cost(usage: dict[str, Any], model: str, started_at: str) -> Decimal:
    from datetime import datetime
    u = genai_prices.extract_usage({"model": model, "usage": usage}, provider_id="openai", api_flavor="chat").usage
    price = genai_prices.calc_price(u, model, provider_id="openai",
                                    genai_request_timestamp=datetime.fromisoformat(started_at))
    return q(price.input_price) + q(price.output_price)


# --- fallback ----------------------------------------------------------------------------------


def test_fallback_on_503(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("error503")
    raw, resp, user = chat(sidecar, "fb")
    assert resp.model.startswith("gpt-4o")  # the backup's answer, model as the upstream reported it
    assert raw.headers["x-meterline-route"] == "fb"
    assert raw.headers["x-meterline-attempts"] == "2"
    assert raw.headers["x-meterline-served-by"] == "backup/gpt-4o"
    assert models_seen(a) == ["gpt-4o-mini"] and models_seen(b) == ["gpt-4o"]  # the body's model rewritten
    # the app's key went to the first target; the backup got the key its target is configured with
    assert a.exchanges[-1].api_key == "sk-route" and b.exchanges[-1].api_key == "sk-backup-own"
    row, tries = row_of(sidecar, user)
    assert (row["route"], row["attempts"], row["served_by"], row["outcome"]) == ("fb", 2, "backup/gpt-4o", "ok")
    assert [(t["upstream"], t["model"], t["status_code"], t["outcome"]) for t in tries] == [
        ("openai", "gpt-4o-mini", 503, "upstream_error"), ("backup", "gpt-4o", 200, "ok")]
    assert tries[0]["cost_usd"] is None  # the 503 reported no usage: nothing billed
    want = catalog_cost(b.exchanges[-1].usage, "gpt-4o", row["started_at"])
    assert Decimal(row["cost_usd"]) == Decimal(tries[1]["cost_usd"]) == want
    assert row["request_model"] == "gpt-4o" and row["upstream"] == "backup"


def test_429_retry_after_is_honoured_then_retried_on_the_same_target(sidecar: Sidecar,
                                                                      fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("error429", retry_after="0.4")
    t0 = time.monotonic()
    raw, resp, user = chat(sidecar, "retry")
    waited = time.monotonic() - t0
    # two tries of the first target (the retry waited for retry-after), then the backup
    assert models_seen(a) == ["gpt-4o-mini", "gpt-4o-mini"] and models_seen(b) == ["gpt-4o"]
    gap = a.exchanges[1].started_at - a.exchanges[0].finished_at
    assert gap >= 0.35, gap
    assert waited >= 0.35
    row, tries = row_of(sidecar, user)
    assert [t["outcome"] for t in tries] == ["upstream_error", "upstream_error", "ok"]
    assert row["attempts"] == 3 and raw.headers["x-meterline-attempts"] == "3"


def test_every_target_fails_the_app_gets_the_last_failure(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("error503")
    b.fail_with("error500")
    user = f"u-all-{time.monotonic_ns()}"
    with pytest.raises(openai.InternalServerError) as err:
        client(sidecar).chat.completions.create(model="fb", messages=MESSAGES, user=user)
    assert err.value.status_code == 500  # the last upstream's own answer, passed through
    assert err.value.response.headers["x-meterline-attempts"] == "2"
    row, tries = row_of(sidecar, user)
    assert (row["outcome"], row["status_code"], row["attempts"]) == ("upstream_error", 500, 2)
    assert [t["status_code"] for t in tries] == [503, 500]


def test_400_is_not_a_reason_to_fall_back(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("error400")
    with pytest.raises(openai.BadRequestError):
        client(sidecar).chat.completions.create(model="fb", messages=MESSAGES)
    assert len(a.exchanges) == 1 and not b.exchanges


def test_fallback_on_reset_before_any_byte(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("reset")
    raw, resp, user = chat(sidecar, "fb")
    assert raw.headers["x-meterline-served-by"] == "backup/gpt-4o"
    row, tries = row_of(sidecar, user)
    assert [t["outcome"] for t in tries] == ["network_error", "ok"]


def test_stream_that_stalls_before_its_first_chunk_times_out_and_falls_back(
        sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("stall")
    user = f"u-stall-{time.monotonic_ns()}"
    stream = client(sidecar).chat.completions.create(model="ttft", messages=MESSAGES, user=user, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    row, tries = row_of(sidecar, user)
    assert [(t["upstream"], t["outcome"]) for t in tries] == [("openai", "timeout"), ("backup", "ok")]
    assert row["outcome"] == "ok" and row["stream"] is True
    assert Decimal(row["cost_usd"]) == catalog_cost(b.exchanges[-1].usage, "gpt-4o", row["started_at"])


def test_every_target_stalls_the_app_gets_a_504(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    for f in fakes:
        f.fail_with("stall")
    user = f"u-504-{time.monotonic_ns()}"
    with pytest.raises(openai.APIStatusError) as err:
        client(sidecar).chat.completions.create(model="ttft", messages=MESSAGES, user=user, stream=True)
    assert err.value.status_code == 504
    assert err.value.response.headers["x-meterline-attempts"] == "2"
    assert "backup" in str(err.value)  # the last target tried is named
    row, tries = row_of(sidecar, user)
    assert (row["outcome"], row["served_by"]) == ("timeout", "backup/gpt-4o")
    assert [t["outcome"] for t in tries] == ["timeout", "timeout"]


def test_no_retry_after_the_first_byte(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("reset")  # a stream resets after a few content chunks
    user = f"u-mid-{time.monotonic_ns()}"
    got = []
    with pytest.raises((openai.APIError, httpx2.HTTPError)):
        for chunk in client(sidecar).chat.completions.create(model="fb", messages=MESSAGES, user=user, stream=True):
            got.append(chunk)
    assert got  # the app saw the first target's chunks ...
    assert not b.exchanges  # ... so the call was never continued on another target
    row, tries = row_of(sidecar, user)
    assert (row["outcome"], row["attempts"], row["served_by"]) == ("network_error", 1, "openai/gpt-4o-mini")
    assert [t["outcome"] for t in tries] == ["network_error"]


def test_anthropic_route_falls_back(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("error529")
    user = f"u-claude-{time.monotonic_ns()}"
    c = anthropic.Anthropic(api_key="sk-ant-route", base_url=f"{sidecar.url}/anthropic", max_retries=0)
    raw = c.messages.with_raw_response.create(model="claude", max_tokens=64, messages=MESSAGES,
                                              metadata={"user_id": user})
    msg = raw.parse()
    assert raw.headers["x-meterline-served-by"] == "backup-anthropic/claude-sonnet-4-5"
    assert msg.content[0].text
    row, tries = row_of(sidecar, user)
    assert [(t["status_code"], t["provider"]) for t in tries] == [(529, "anthropic"), (200, "anthropic")]
    assert row["cost_usd"] is not None


def test_gemini_route_rewrites_the_model_in_the_path(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    from google import genai
    from google.genai import types as gtypes
    a, b = fakes
    a.fail_with("error503")
    c = genai.Client(api_key="gm-route", http_options=gtypes.HttpOptions(
        base_url=f"{sidecar.url}/gemini", retry_options=gtypes.HttpRetryOptions(attempts=1)))
    resp = c.models.generate_content(model="gem", contents="hello")
    assert resp.text
    assert [e.path.split("/models/")[1] for e in a.exchanges] == ["gemini-2.5-flash:generateContent"]
    assert [e.path.split("/models/")[1] for e in b.exchanges] == ["gemini-2.5-pro:generateContent"]
    rows = sidecar.rows("route = 'gem' AND outcome = 'ok'")
    assert rows[-1]["served_by"] == "backup-gemini/gemini-2.5-pro" and rows[-1]["provider"] == "google"
    assert rows[-1]["endpoint"].endswith("/models/gemini-2.5-pro:generateContent")
    assert rows[-1]["cost_usd"] is not None


def test_a_stream_broken_after_its_first_bytes_is_billed_and_not_continued(
        sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    from datetime import datetime
    a, b = fakes
    a.fail_with("reset")  # Anthropic's message_start carries the input's usage before the break
    user = f"u-billed-{time.monotonic_ns()}"
    c = anthropic.Anthropic(api_key="sk-ant-route", base_url=f"{sidecar.url}/anthropic", max_retries=0)
    with pytest.raises((anthropic.APIError, httpx2.HTTPError)):
        with c.messages.stream(model="claude", max_tokens=64, messages=MESSAGES, metadata={"user_id": user}) as s:
            for _ in s:
                pass
    assert not b.exchanges
    row, tries = row_of(sidecar, user)
    assert row["outcome"] == "network_error" and len(tries) == 1 and tries[0]["outcome"] == "network_error"
    assert row["input_tokens"] and row["cost_usd"] is not None
    usage = genai_prices.Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"])
    price = genai_prices.calc_price(usage, "claude-haiku-4-5", provider_id="anthropic",
                                    genai_request_timestamp=datetime.fromisoformat(row["started_at"]))
    assert Decimal(row["cost_usd"]) == Decimal(tries[0]["cost_usd"]) == q(price.input_price) + q(price.output_price)


def test_a_route_of_another_wire_format_is_refused(sidecar: Sidecar) -> None:
    c = anthropic.Anthropic(api_key="sk-ant-route", base_url=f"{sidecar.url}/anthropic", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as err:
        c.messages.create(model="fb", max_tokens=10, messages=MESSAGES)
    assert "openai" in str(err.value)


# --- circuits ----------------------------------------------------------------------------------


def test_circuit_opens_then_closes_after_cooldown(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("error503")
    for _ in range(2):
        chat(sidecar, "circ")
    assert len(a.exchanges) == 2
    state = {t["target"]: t for t in sidecar.health()["routes"]["circ"]["targets"]}
    assert state["openai/gpt-4o-mini"]["state"] == "open"
    for _ in range(3):  # open: the failing fake sees no more calls
        raw, _, user = chat(sidecar, "circ")
        assert raw.headers["x-meterline-attempts"] == "1"
    assert len(a.exchanges) == 2 and len(b.exchanges) == 5
    with urllib.request.urlopen(f"{sidecar.url}/_meterline/metrics", timeout=10) as r:
        scrape = r.read().decode()
    assert 'meterline_route_circuit_state{route="circ",target="openai/gpt-4o-mini",state="open"} 1' in scrape
    shown = subprocess.run([sys.executable, "-m", "sidecar.cli", "routes", "--url", sidecar.url],
                           capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if "circ" in x and "openai/gpt-4o-mini" in x)
    assert "open" in line and "100.0% of 2" in line
    a.fail_with("")
    time.sleep(1.6)  # the cooldown: the next call probes the first target, which answers
    raw, _, _ = chat(sidecar, "circ")
    assert raw.headers["x-meterline-served-by"] == "openai/gpt-4o-mini"
    state = {t["target"]: t for t in sidecar.health()["routes"]["circ"]["targets"]}
    assert state["openai/gpt-4o-mini"]["state"] == "closed"


# --- picking a target --------------------------------------------------------------------------


def test_cheapest_picks_the_cheaper_model(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    raw, _, user = chat(sidecar, "cheap", max_tokens=50)
    assert raw.headers["x-meterline-served-by"] == "backup/gpt-4o-mini"
    assert not a.exchanges


def test_rules_pick_by_max_tokens(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    raw, _, user = chat(sidecar, "ruled", max_tokens=50)
    assert raw.headers["x-meterline-served-by"] == "backup/gpt-4o-mini"
    raw, _, user2 = chat(sidecar, "ruled", max_tokens=500)
    assert raw.headers["x-meterline-served-by"] == "openai/gpt-4o"
    assert row_of(sidecar, user)[0]["arm"] == "backup/gpt-4o-mini"


def test_weighted_split_records_the_arm(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    served = [chat(sidecar, "split")[0].headers["x-meterline-served-by"] for _ in range(40)]
    # 3:1 over 40 calls: the lighter arm gets some and fewer (the exact split is tested on the picker)
    assert 0 < served.count("backup/gpt-4o-mini") < served.count("openai/gpt-4o-mini")
    rows = sidecar.rows("route = 'split'", count=40)
    assert {r["arm"] for r in rows} == {"openai/gpt-4o-mini", "backup/gpt-4o-mini"}
    assert all(r["arm"] == r["served_by"] for r in rows)


# --- budgets -----------------------------------------------------------------------------------


def test_a_fallback_refused_by_a_budget(sidecar: Sidecar, fakes: tuple[FakeProvider, FakeProvider]) -> None:
    a, b = fakes
    a.fail_with("error503")
    user = f"u-budget-{time.monotonic_ns()}"
    with pytest.raises(openai.InternalServerError) as err:  # the first target's failure, as it came
        client(sidecar).chat.completions.create(model="pricey", messages=MESSAGES, user=user)
    assert err.value.status_code == 503
    assert not b.exchanges  # the fallback never left the machine
    row, tries = row_of(sidecar, user)
    assert [(t["model"], t["outcome"], t["error_type"]) for t in tries] == [
        ("gpt-4o-mini", "upstream_error", tries[0]["error_type"]), ("gpt-4.1", "refused", "budget_exceeded")]
    assert row["attempts"] == 2
