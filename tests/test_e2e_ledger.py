"""End to end, the ledger side: attribution headers, API-key fingerprints, config prices, the
read-only SQL endpoint and CLI, and the spend views."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.sidecar_process import free_port

if TYPE_CHECKING:
    from conftest import E2E

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
PER_IMAGE = Decimal("0.04")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def sidecar_config() -> dict[str, Any]:
    return {"app": "default-app",
            "prices": [{"provider": "openai", "model": "dall-e-*", "per_image": float(PER_IMAGE)}]}


# --- attribution -------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_attribution_headers_land_in_the_row_and_are_not_forwarded(e2e: E2E, provider: str) -> None:
    case = e2e.case(tags="team=search, feature=summarize,broken,=nokey", x_meterline_user="u123",
                    x_meterline_app="checkout")
    if provider == "openai":
        e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="body-user")
    elif provider == "anthropic":
        e2e.anthropic(case).messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES,
                                            metadata={"user_id": "body-user"})
    else:
        client = e2e.gemini(case)
        client.models.generate_content(model="gemini-2.5-flash", contents="hello")
    ex = e2e.exchange(case)
    assert not [h for h in ex.request_headers if h.startswith("x-meterline-")], ex.request_headers
    assert ex.request_headers["x-e2e-case"] == case.id  # other headers do go through

    row = e2e.row(case)
    e2e.expect(row, app="checkout", user_id="u123", outcome="ok",
               tags={"case": case.id, "team": "search", "feature": "summarize"})


def test_attribution_defaults(e2e: E2E) -> None:
    case = e2e.case()
    e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="openai-body-user")
    e2e.expect(e2e.row(case), app="default-app", user_id="openai-body-user", tags={"case": case.id})
    case = e2e.case()
    e2e.anthropic(case).messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES,
                                        metadata={"user_id": "anthropic-body-user"})
    e2e.expect(e2e.row(case), app="default-app", user_id="anthropic-body-user")
    case = e2e.case()
    e2e.raw("/gemini/v1beta/models/gemini-2.5-flash:generateContent", GEMINI, {"x-goog-api-key": "k"}, case=case)
    e2e.expect(e2e.row(case), app="default-app", user_id=None)


def test_api_key_fingerprints(e2e: E2E) -> None:
    key_a, key_b = "sk-proj-AAAA-first-key-0001", "sk-proj-BBBB-second-key-0002"
    calls = [("a1", "openai", key_a), ("a2", "openai", key_a), ("b", "openai", key_b), ("a3", "anthropic", key_a)]
    cases = {}
    for name, provider, key in calls:
        case = cases[name] = e2e.case()
        if provider == "openai":
            e2e.openai(case, api_key=key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        else:
            e2e.anthropic(case, api_key=key).messages.create(model="claude-haiku-4-5", max_tokens=64,
                                                             messages=MESSAGES)
        assert e2e.exchange(case).api_key == key  # forwarded as sent
    rows = {name: e2e.row(case) for name, case in cases.items()}
    fp = {name: row["key_fingerprint"] for name, row in rows.items()}
    assert all(isinstance(v, str) and v.startswith("fp_") and len(v) == 15 for v in fp.values()), fp
    assert fp["a1"] == fp["a2"] == fp["a3"]  # same key, same fingerprint (whatever the header)
    assert fp["b"] != fp["a1"]
    dump = json.dumps(e2e.sidecar.sql("SELECT * FROM calls"), default=str)
    assert key_a not in dump and key_b not in dump and "AAAA-first" not in dump
    journal = Path(f"{e2e.sidecar.db}.journal")
    stored = b"".join(p.read_bytes() for p in [*journal.iterdir(), *e2e.sidecar.workdir.iterdir()] if p.is_file())
    assert rows["a1"]["call_id"].encode() in stored  # the journal holds these calls ...
    assert key_a.encode() not in stored and key_b.encode() not in stored  # ... and no key


def test_trace_context_joins_the_apps_trace(e2e: E2E) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    case = e2e.case(traceparent=f"00-{trace_id}-{parent}-01")
    e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    ex = e2e.exchange(case)
    row = e2e.row(case)
    assert row["trace_id"] == trace_id and len(row["span_id"]) == 16 and row["span_id"] != parent
    # the upstream request is a child of the call's own span, in the app's trace
    assert ex.request_headers["traceparent"] == f"00-{trace_id}-{row['span_id']}-01"
    untraced = e2e.case()
    e2e.openai(untraced).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    other = e2e.row(untraced)
    assert len(other["trace_id"]) == 32 and other["trace_id"] != trace_id


# --- prices from the config --------------------------------------------------------------------


@pytest.mark.parametrize(("model", "n"), [("dall-e-3", 1), ("dall-e-2", 3)])
def test_config_price_per_image(e2e: E2E, model: str, n: int) -> None:
    case = e2e.case()
    image = e2e.openai(case).images.generate(model=model, prompt="a meter", n=n)
    assert image.usage is None and len(image.data or []) == n
    row = e2e.row(case)
    e2e.expect(row, operation="image_generation", request_model=model, outcome="ok", units={"images": n},
               price_source="config")
    assert Decimal(row["cost_usd"]) == PER_IMAGE * n == Decimal(row["input_cost_usd"]) + Decimal(row["output_cost_usd"])


# --- read-only SQL -----------------------------------------------------------------------------


REFUSED = [
    "INSERT INTO calls (call_id) VALUES ('x')",
    "DELETE FROM calls",
    "UPDATE calls SET cost_usd = 0",
    "DROP TABLE calls",
    "DROP VIEW spend_daily",
    "CREATE TABLE stolen AS SELECT * FROM calls",
    "COPY calls TO '{tmp}/out.csv'",
    "COPY (SELECT * FROM calls) TO '{tmp}/out.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{tmp}/export'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM glob('/etc/*')",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "CHECKPOINT",
    "SELECT 1; DELETE FROM calls",
]


def test_sql_refuses_writes_files_attach_and_install(e2e: E2E, tmp_path: Path) -> None:
    case = e2e.case()
    e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    e2e.row(case)
    snapshot = "SELECT count(*) AS n, sum(cost_usd) AS cost, string_agg(call_id, ',' ORDER BY call_id) AS ids FROM calls"
    before = e2e.sidecar.sql(snapshot)
    assert before[0]["n"] >= 1
    for statement in REFUSED:
        status, body = e2e.sidecar.sql_status(statement.format(tmp=tmp_path))
        assert status in (400, 403), (statement, status, body)
        assert isinstance(body.get("error"), str) and body["error"], (statement, body)
        assert "root:" not in json.dumps(body)  # nothing of the file leaks through an error either
    assert not list(tmp_path.iterdir()), "a refused statement wrote a file"
    assert e2e.sidecar.sql(snapshot) == before
    assert "spend_daily" in {r["table_name"] for r in e2e.sidecar.sql("SELECT table_name FROM information_schema.tables")}
    # the sidecar still serves calls and answers queries
    status, body = e2e.sidecar.sql_status("SELECT count(*) FROM calls")
    assert status == 200 and body["rows"][0][0] == before[0]["n"]


def test_sql_answers_json_with_exact_decimals(e2e: E2E) -> None:
    case = e2e.case()
    e2e.openai(case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    row = e2e.row(case)
    got = e2e.raw("/_meterline/sql", {"query": f"SELECT cost_usd, input_tokens, tags, started_at FROM calls "
                                               f"WHERE call_id = '{row['call_id']}'"})
    assert got.status == 200
    doc = json.loads(got.body)
    assert doc["columns"] == ["cost_usd", "input_tokens", "tags", "started_at"] and doc["truncated"] is False
    assert doc["rows"] == [[row["cost_usd"], row["input_tokens"], {"case": case.id}, row["started_at"]]]
    assert isinstance(doc["rows"][0][0], str) and Decimal(doc["rows"][0][0]) > 0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "sql", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_cli_sql_through_the_sidecar_and_on_the_file(e2e: E2E, start_sidecar: Any, tmp_path: Path) -> None:
    own = start_sidecar()
    mine = e2e.on(own)
    for _ in range(3):
        mine.openai(mine.case()).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    rows = mine.rows("true", 3)
    assert len(rows) == 3
    query = "SELECT count(*) AS n, sum(cost_usd) AS cost, min(started_at) AS first, max(tags) AS tags FROM calls"
    expected = own.sql(query)[0]
    assert expected["n"] == 3 and Decimal(expected["cost"]) > 0

    live = _cli(query, "--format", "json", "--url", own.url, cwd=tmp_path)
    assert live.returncode == 0, live.stderr
    assert json.loads(live.stdout) == [expected]
    refused = _cli("DELETE FROM calls", "--url", own.url, cwd=tmp_path)
    assert refused.returncode == 1 and "refused" in refused.stderr

    own.stop()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: the CLI opens the file itself
    offline = _cli(query, "--format", "json", "--url", dead, "--db", str(own.db), cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == [expected]
    csv_out = _cli("SELECT call_id, cost_usd FROM calls ORDER BY call_id", "--format", "csv", "--url", dead,
                   "--db", str(own.db), cwd=tmp_path)
    assert csv_out.returncode == 0, csv_out.stderr
    assert csv_out.stdout.strip().splitlines() == ["call_id,cost_usd"] + [
        f"{r['call_id']},{r['cost_usd']}" for r in sorted(rows, key=lambda r: r["call_id"])]
    refused = _cli("SELECT * FROM read_csv('/etc/passwd')", "--url", dead, "--db", str(own.db), cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.startswith("meterline: ") and "root:" not in refused.stdout


def _duckdb_settings(sidecar: Any) -> dict[str, str]:
    rows = sidecar.sql("SELECT name, value FROM duckdb_settings() WHERE name IN "
                       "('memory_limit', 'threads', 'checkpoint_threshold', 'allocator_flush_threshold')")
    return {row["name"]: row["value"] for row in rows}


def test_ledger_duckdb_is_capped_for_a_sidecar(e2e: E2E, start_sidecar: Any) -> None:
    # by default DuckDB may take 80% of the machine's RAM and every core; the sidecar's is capped
    default = _duckdb_settings(e2e.sidecar)
    assert default["memory_limit"] == "122.0 MiB"  # 128MB, as DuckDB shows it
    assert default["threads"] == "1"
    assert default["checkpoint_threshold"] == "1.9 MiB"
    assert default["allocator_flush_threshold"] == "2MB"
    own = start_sidecar({"ledger": {"memory_limit": "1GiB", "threads": 2}})
    configured = _duckdb_settings(own)
    assert configured["memory_limit"] == "1.0 GiB" and configured["threads"] == "2"
    status, _ = own.sql_status("SET memory_limit = '8GB'")  # the SQL endpoint cannot lift them
    assert status == 403 and _duckdb_settings(own)["memory_limit"] == "1.0 GiB"


@pytest.mark.parametrize(("ledger", "message"), [
    ({"memory_limit": 128}, "config key 'ledger.memory_limit': expected a size such as '128MB'"),
    ({"memory_limit": "lots"}, "config key 'ledger.memory_limit': expected a size"),
    ({"threads": 0}, "config key 'ledger.threads': expected a positive whole number, got 0"),
    ({"threads": "2"}, "config key 'ledger.threads': expected a positive whole number"),
    ({"memory": "1GB"}, "unknown config key 'ledger.memory'"),
])
def test_bad_ledger_config_names_the_key(ledger: dict[str, Any], message: str) -> None:
    from sidecar.config import ConfigError, parse
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse({"ledger": ledger})


# --- spend views -------------------------------------------------------------------------------


def _sum(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return sum(present[1:], present[0]) if present else None


def _dec(value: Any) -> Any:
    return Decimal(value) if isinstance(value, str) else value


def test_spend_views_match_the_rows(e2e: E2E) -> None:
    made = []
    for model, tags, app in [("gpt-4o-mini", "team=search", "svc-a"), ("gpt-4o-mini", "team=search", "svc-b"),
                             ("gpt-4.1", "team=ads,feature=x", "svc-a"), ("gpt-nonexistent-9", "team=ads", None)]:
        case = e2e.case(tags=tags, **({"x_meterline_app": app} if app else {}))
        e2e.openai(case).chat.completions.create(model=model, messages=MESSAGES)
        made.append(case)
    case = e2e.case("cache", tags="team=search")
    e2e.anthropic(case).messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES)
    made.append(case)
    for case in made:
        e2e.row(case)
    assert e2e.sidecar.health()["ledger"]["pending"] == 0

    rows = e2e.rows("true", 1)
    for row in rows:
        row["cost_usd"] = _dec(row["cost_usd"])
    assert any(r["cost_usd"] is None for r in rows) and any(r["cost_usd"] for r in rows)

    daily: dict[tuple, list[dict]] = defaultdict(list)
    by_model: dict[tuple, list[dict]] = defaultdict(list)
    by_tag: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        daily[(r["started_at"][:10], r["app"], r["provider"])].append(r)
        by_model[(r["provider"], r["response_model"] or r["request_model"])].append(r)
        for key, value in r["tags"].items():
            by_tag[(key, value)].append(r)

    def unpriced(group: list[dict]) -> int:
        return sum(1 for r in group if r["cost_usd"] is None and r["outcome"] != "blocked")

    got = {(v["day"], v["app"], v["provider"]): v for v in e2e.sidecar.sql("SELECT * FROM spend_daily")}
    assert set(got) == set(daily)
    for key, group in daily.items():
        v = got[key]
        assert (v["calls"], v["input_tokens"], v["output_tokens"], _dec(v["cost_usd"]), v["unpriced_calls"]) == (
            len(group), _sum([r["input_tokens"] for r in group]), _sum([r["output_tokens"] for r in group]),
            _sum([r["cost_usd"] for r in group]), unpriced(group)), key

    got = {(v["provider"], v["model"]): v for v in e2e.sidecar.sql("SELECT * FROM spend_by_model")}
    assert set(got) == set(by_model)
    for key, group in by_model.items():
        v = got[key]
        for column in ("input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens"):
            assert v[column] == _sum([r[column] for r in group]), (key, column)
        assert (v["calls"], _dec(v["cost_usd"]), v["unpriced_calls"]) == (
            len(group), _sum([r["cost_usd"] for r in group]), unpriced(group)), key
    unknown = got[("openai", "gpt-nonexistent-9")]
    assert unknown["cost_usd"] is None and unknown["unpriced_calls"] == unknown["calls"] >= 1

    got = {(v["tag"], v["value"]): v for v in e2e.sidecar.sql("SELECT * FROM spend_by_tag")}
    assert set(got) == set(by_tag)
    for key, group in by_tag.items():
        v = got[key]
        assert (v["calls"], v["input_tokens"], v["output_tokens"], _dec(v["cost_usd"])) == (
            len(group), _sum([r["input_tokens"] for r in group]), _sum([r["output_tokens"] for r in group]),
            _sum([r["cost_usd"] for r in group])), key
    search = got[("team", "search")]
    assert search["calls"] >= 3 and Decimal(search["cost_usd"]) > 0
