"""Routes in pieces: config errors that name the key, the weighted picker over 1,000 calls, circuits,
rules and cheapest ordering, and attempts through a journal line into the ledger's `attempts` table."""
from __future__ import annotations

import random
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from ledger import journal
from ledger.pricing import Pricer
from ledger.records import Attempt, CallExtras, CallInfo, CallRecord
from ledger.writer import LedgerWriter
from sidecar import config
from sidecar.routes.circuit import Breaker
from sidecar.routes.config import Circuit
from sidecar.routes.strategies import RouteState

UPSTREAMS = {"upstreams": {"groq": {"base_url": "http://127.0.0.1:9", "adapter": "openai", "provider": "groq"}}}
NOW = datetime(2026, 1, 5, 12, tzinfo=timezone.utc)


def parse(routes: object) -> config.Config:
    return config.parse({**UPSTREAMS, "routes": routes})


def route_of(spec: dict) -> RouteState:
    cfg = parse({"r": spec})
    return RouteState(cfg.routes["r"], {n: u.provider for n, u in cfg.upstreams.items()}, random.Random(7))


def targets(*keys: str, **weights: float) -> list[dict]:
    return [{"upstream": k.split("/")[0], "model": k.split("/")[1], **({"weight": weights[k.split("/")[1]]}
                                                                        if k.split("/")[1] in weights else {})}
            for k in keys]


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("routes, key", [
    ([], "'routes'"),
    ({"r": {"targets": []}}, "'routes.r.targets'"),
    ({"r": {"targets": [{"upstream": "nope", "model": "m"}]}}, "'routes.r.targets[0].upstream'"),
    ({"r": {"targets": [{"upstream": "openai"}]}}, "'routes.r.targets[0].model'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m", "weight": -1}]}}, "'routes.r.targets[0].weight'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m", "colour": 1}]}}, "'routes.r.targets[0].colour'"),
    ({"r": {"strategy": "random", "targets": [{"upstream": "openai", "model": "m"}]}}, "'routes.r.strategy'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "retry": {"attempts": 0}}}, "'routes.r.retry.attempts'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "retry": {"backoff_ms": "x"}}},
     "'routes.r.retry.backoff_ms'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "fallback_on": ["teapot"]}}, "'routes.r.fallback_on'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "timeouts": {"ttft_s": 0}}}, "'routes.r.timeouts.ttft_s'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "circuit": {"failures": 0}}},
     "'routes.r.circuit.failures'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "rules": [{"use": "openai/x"}]}}, "'routes.r.rules[0].use'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}],
            "rules": [{"when": {"input_tokens_below": -3}, "use": 0}]}}, "'routes.r.rules[0].when.input_tokens_below'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "rules": [{"when": {"size": 3}, "use": 0}]}},
     "'routes.r.rules[0].when.size'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}, {"upstream": "openai", "model": "m"}]}},
     "'routes.r.targets'"),
    ({"r": {"strategy": "weighted", "targets": [{"upstream": "openai", "model": "m", "weight": 0}]}},
     "'routes.r.targets'"),
    ({"a/b": {"targets": [{"upstream": "openai", "model": "m"}]}}, "'routes.a/b'"),
    ({"r": {"targets": [{"upstream": "openai", "model": "m"}], "speed": 1}}, "'routes.r.speed'"),
])
def test_a_malformed_route_names_its_key(routes: object, key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        parse(routes)
    assert key in str(err.value), str(err.value)


def test_a_target_of_another_wire_format_is_refused_naming_it() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({**UPSTREAMS, "upstreams": {**UPSTREAMS.get("upstreams", {}), "each": {
            "base_url": "https://api.eachlabs.ai", "adapter": "eachlabs", "provider": "eachlabs"}},
            "routes": {"r": {"targets": targets("openai/gpt-4o-mini", "each/flux")}}})
    message = str(err.value)
    assert "routes.r.targets[1]" in message and "each/flux" in message and "One API" in message


def test_targets_a_translator_joins_may_mix_formats() -> None:
    route = parse({"r": {"targets": targets("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5")}}).routes["r"]
    assert route.mixed and route.adapter == "openai"
    assert not parse({"r": {"targets": targets("openai/gpt-4o-mini")}}).routes["r"].mixed


def test_a_target_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTE_TEST_KEY", "gsk-123")
    route = parse({"r": {"targets": [{"upstream": "groq", "model": "m", "api_key": "${ROUTE_TEST_KEY}"}]}}).routes["r"]
    assert route.targets[0].api_key == "gsk-123" and "gsk-123" not in repr(route)
    monkeypatch.delenv("ROUTE_TEST_KEY")
    with pytest.raises(config.ConfigError) as err:
        parse({"r": {"targets": [{"upstream": "groq", "model": "m", "api_key": "${ROUTE_TEST_KEY}"}]}})
    assert "'routes.r.targets[0].api_key'" in str(err.value) and "ROUTE_TEST_KEY is not set" in str(err.value)


def test_defaults_never_fall_back_on_400_or_401() -> None:
    route = parse({"r": {"targets": targets("openai/a", "groq/b")}}).routes["r"]
    on = route.fallback_on
    assert on.status(429) and on.status(500) and on.status(503) and on.timeout and on.network
    assert not on.status(400) and not on.status(401) and not on.status(404)
    assert route.adapter == "openai" and route.strategy == "fallback"


# --- strategies --------------------------------------------------------------------------------


def test_weighted_split_over_1000_calls_is_within_a_few_percent() -> None:
    state = route_of({"strategy": "weighted", "targets": targets("openai/a", "groq/b", "groq/c", a=6, b=3, c=1)})
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(1000):
        counts[state.pick_weighted().model] += 1
    assert abs(counts["a"] - 600) <= 45 and abs(counts["b"] - 300) <= 40 and abs(counts["c"] - 100) <= 30, counts
    order, arm = state.plan(CallInfo("openai", "chat", "/v1/chat/completions"), None, None, {}, None, NOW)
    assert arm == order[0].key and len(order) == 3  # the rest stay as fallbacks


def test_a_zero_weight_target_is_only_a_fallback() -> None:
    state = route_of({"strategy": "weighted", "targets": targets("openai/a", "groq/b", b=0)})
    assert {state.pick_weighted().model for _ in range(500)} == {"a"}


def test_cheapest_orders_by_estimated_price_unpriced_last() -> None:
    state = route_of({"strategy": "cheapest", "targets": targets("openai/gpt-4o", "openai/no-such-model",
                                                                  "openai/gpt-4o-mini")})
    info = CallInfo("openai", "chat", "/v1/chat/completions", input_estimate=2000, max_output_tokens=500)
    order, _ = state.plan(info, None, None, {}, Pricer(), NOW)
    assert [t.model for t in order] == ["gpt-4o-mini", "gpt-4o", "no-such-model"]


def test_rules_pick_by_size_stream_tags_app_and_user_before_the_strategy() -> None:
    state = route_of({"targets": targets("openai/big", "groq/small", "groq/tagged"), "rules": [
        {"when": {"input_tokens_below": 1000, "stream": False}, "use": "groq/small"},
        {"when": {"tags": {"team": "search"}, "app": "web", "user": "u1"}, "use": 2}]})

    def first(info: CallInfo, app: str | None = None, user: str | None = None, tags: dict | None = None) -> str:
        order, arm = state.plan(info, app, user, tags or {}, None, NOW)
        assert len(order) == 3
        return order[0].model

    small = CallInfo("openai", "chat", "/", input_estimate=10)
    assert first(small) == "small"
    assert first(CallInfo("openai", "chat", "/", input_estimate=5000)) == "big"
    assert first(CallInfo("openai", "chat", "/", input_estimate=10, stream=True)) == "big"
    assert first(CallInfo("openai", "chat", "/", input_estimate=5000), "web", "u1", {"team": "search"}) == "tagged"
    assert first(CallInfo("openai", "chat", "/", input_estimate=5000), "web", "u2", {"team": "search"}) == "big"


def test_fastest_prefers_the_lower_ttft() -> None:
    state = route_of({"strategy": "fastest", "targets": targets("openai/slow", "groq/quick")})
    for _ in range(5):
        state.observe_ttft("openai/slow", 2.0)
        state.observe_ttft("groq/quick", 0.2)
    info = CallInfo("openai", "chat", "/")
    assert {state.plan(info, None, None, {}, None, NOW)[0][0].model for _ in range(50)} == {"quick"}


# --- circuits ----------------------------------------------------------------------------------


def test_circuit_opens_after_failures_in_the_window_and_probes_once_after_cooldown() -> None:
    b = Breaker(Circuit(failures=3, window_s=10, cooldown_s=5))
    b.record(False, 0)
    b.record(False, 20)  # the first failure left the window
    b.record(False, 21)
    assert b.allow(21) and b.state == "closed"
    b.record(False, 22)
    assert b.state == "open" and not b.allow(23)
    assert b.allow(27.5) and b.state == "half_open"  # one probe ...
    assert not b.allow(27.6)  # ... and only one
    b.record(False, 28)  # the probe failed: another cooldown
    assert b.state == "open" and not b.allow(30) and b.allow(33.1)
    b.record(True, 33.2)
    assert b.state == "closed" and b.allow(33.3)
    assert b.status()["recent_error_rate"] == round(5 / 6, 4)


# --- the ledger --------------------------------------------------------------------------------


def _record(call_id: str) -> CallRecord:
    return CallRecord(call_id=call_id, started_at=NOW, ended_at=NOW, duration_ms=5.0, ttft_ms=1.0, overhead_ms=0.1,
                      app=None, upstream="backup", provider="openai", operation="chat", endpoint="/v1/chat/completions",
                      request_model="gpt-4o", response_model="gpt-4o", response_id="r", stream=False,
                      status_code=200, outcome="ok", error_type=None, finish_reason="stop", input_tokens=30,
                      output_tokens=7, cache_read_tokens=None, cache_write_tokens=None, reasoning_tokens=None,
                      units=None, input_cost_usd=Decimal("0.000075"), output_cost_usd=Decimal("0.00007"),
                      cost_usd=Decimal("0.000145"), price_source="genai-prices", user_id=None, key_fingerprint=None,
                      tags={}, trace_id=None, span_id=None, request_bytes=10, response_bytes=20,
                      route="fb", attempts=2, served_by="backup/gpt-4o", arm=None)


def test_attempts_travel_in_the_final_journal_line_into_the_attempts_table(tmp_path: Path) -> None:
    record = _record("c1")
    tries = [Attempt("c1", 1, "openai", "openai", "gpt-4o-mini", NOW, None, 3.0, 503, "upstream_error", "http_503"),
             Attempt("c1", 2, "backup", "openai", "gpt-4o", NOW, 1.0, 4.0, 200, "ok", None, 30, 7,
                     cost_usd=Decimal("0.000145"), price_source="genai-prices")]
    line = journal.encode_final(record, CallExtras(attempts=tries))
    got = journal.read_line(line)
    assert got.record.route == "fb" and got.record.attempts == 2 and got.record.served_by == "backup/gpt-4o"
    writer = LedgerWriter(tmp_path / "l.duckdb", journal=journal.Journal(tmp_path / "j"))
    writer.open()
    writer.catch_up([(got.record, None, got.extras)])
    writer.stop()
    con = duckdb.connect(str(tmp_path / "l.duckdb"), read_only=True)
    rows = con.execute("SELECT attempt, upstream, model, status_code, outcome, cost_usd FROM attempts "
                       "ORDER BY attempt").fetchall()
    assert rows == [(1, "openai", "gpt-4o-mini", 503, "upstream_error", None),
                    (2, "backup", "gpt-4o", 200, "ok", Decimal("0.000145"))]
    assert con.execute("SELECT route, attempts, served_by FROM calls").fetchall() == [("fb", 2, "backup/gpt-4o")]


def test_an_old_journal_line_without_route_fields_still_reads() -> None:
    record = _record("c2")
    line = journal.encode_final(record, CallExtras())
    fields = journal._FIELDS[:-6]  # a segment header of a version before routes (and One API's formats)
    old = journal.orjson.dumps([*journal._ROW(record)[:-6], None], default=str)
    got = journal.read_line(old, fields)
    assert got.record.route is None and got.record.attempts is None and got.record.call_id == "c2"
    assert journal.read_line(line).extras.attempts == []


def test_bad_attempt_values_become_null_not_a_refused_batch() -> None:
    from ledger.attempt_rows import read
    got = read([{"attempt": 1, "upstream": "a", "provider": "p", "model": "m", "started_at": NOW.isoformat(),
                 "input_tokens": 2 ** 70, "cost_usd": "nan", "status_code": "x"}, "junk",
                {"started_at": "not a time"}], "c3")
    assert len(got) == 1 and got[0].input_tokens is None and got[0].cost_usd is None and got[0].status_code is None


def test_a_routed_call_span_has_a_child_per_attempt() -> None:
    from exporters.settings import load_settings
    from exporters.spans import SpanBuilder
    record = _record("c4")
    record.trace_id, record.span_id = "ab" * 16, "cd" * 8
    tries = [Attempt("c4", 1, "openai", "openai", "gpt-4o-mini", NOW, None, 3.0, 503, "upstream_error", "http_503"),
             Attempt("c4", 2, "backup", "openai", "gpt-4o", NOW, 1.0, 4.0, 200, "ok", None, 30, 7)]
    got = journal.read_line(journal.encode_final(record, CallExtras(attempts=tries)))  # as the sinks process reads it
    spans = SpanBuilder(load_settings({}, {})).build_all([(got.record, got.extras)])
    call, first, second = spans
    assert call.attributes["meterline.route"] == "fb" and call.attributes["meterline.route.served_by"] == "backup/gpt-4o"
    assert first.parent.span_id == second.parent.span_id == call.context.span_id
    assert first.context.trace_id == call.context.trace_id and first.context.span_id != second.context.span_id
    assert first.attributes["http.response.status_code"] == 503 and not first.status.is_ok
    assert second.attributes["gen_ai.request.model"] == "gpt-4o" and second.status.is_unset
    # one try: the call's span alone, with its route attributes (no child repeating it)
    got = journal.read_line(journal.encode_final(record, CallExtras(attempts=tries[1:])))
    alone = SpanBuilder(load_settings({}, {})).build_all([(got.record, got.extras)])
    assert len(alone) == 1 and alone[0].attributes["meterline.route"] == "fb"


def _state() -> RouteState:
    return route_of({"targets": targets("openai/gpt-4o-mini", "groq/llama")})


def test_the_call_costs_the_sum_of_its_attempts_billed_failures_included() -> None:
    from sidecar.routes.attempts import RoutedCall
    rc = RoutedCall(_state())
    rc.attempts.append(Attempt("c5", 1, "openai", "openai", "gpt-4o-mini", NOW, None, 3.0, 500, "upstream_error",
                               "server_error", input_tokens=100, output_tokens=0,
                               input_cost_usd=Decimal("0.000015"), output_cost_usd=Decimal("0"),
                               cost_usd=Decimal("0.000015"), price_source="genai-prices"))
    rc.committed, rc.target, rc.t_commit = True, rc.state.route.targets[0], 0.0
    record = _record("c5")

    class Call:
        ttft = 0.5
        t0 = 0.0

    rc.finish(record, Call())
    assert record.attempts == 2 and record.served_by == "openai/gpt-4o-mini" and record.route == "r"
    assert record.cost_usd == Decimal("0.000015") + Decimal("0.000145")
    assert record.input_tokens == 130 and record.output_tokens == 7
    assert [a.cost_usd for a in rc.attempts] == [Decimal("0.000015"), Decimal("0.000145")]


def test_an_unpriced_attempt_with_usage_leaves_the_call_cost_unknown() -> None:
    from sidecar.routes.attempts import RoutedCall
    rc = RoutedCall(_state())
    rc.attempts.append(Attempt("c6", 1, "groq", "groq", "llama", NOW, None, 3.0, 500, "upstream_error", None,
                               input_tokens=100, price_source="unpriced"))
    rc.committed, rc.target, rc.t_commit = True, rc.state.route.targets[0], 0.0
    record = _record("c6")

    class Call:
        ttft = None
        t0 = 0.0

    rc.finish(record, Call())
    assert record.cost_usd is None and record.price_source == "unpriced"


def test_a_fake_is_told_to_fail_over_its_control_endpoint() -> None:
    import urllib.error
    import urllib.request

    from tests.fakes import FakeProvider
    from tests.fakes.server import set_scenario
    fake = FakeProvider().start_in_thread()
    try:
        set_scenario(fake.base_url, "error503", retry_after="7")
        req = urllib.request.Request(f"{fake.base_url}/v1/chat/completions", method="POST",
                                     data=b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
                                     headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 503
        set_scenario(fake.base_url, "error429", retry_after="7")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 429 and err.value.headers["retry-after"] == "7"
        set_scenario(fake.base_url, "")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            set_scenario(fake.base_url, "no-such-token")
        assert err.value.code == 400
    finally:
        fake.stop_thread()
