"""`meterline reconcile`: a real DuckDB ledger beside fake OpenAI / Anthropic admin APIs, the CLI as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from jobs import reconcile_config
from ledger import schema
from tests.fakes.admin_api import FakeAdminApi, UsageEvent

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-admin-TEST-9f8e7d6c5b4a"
DAY0 = datetime(2026, 11, 20, tzinfo=timezone.utc)
WINDOW = ["--since", "2026-11-20", "--until", "2026-11-23"]


@dataclass
class Call:
    """One call, as both sides see it (unless a test makes them differ)."""

    at: datetime
    model: str
    uncached: int
    output: int
    usd_in: Decimal
    usd_out: Decimal
    cache_read: int = 0
    cache_write: int = 0
    operation: str = "chat"
    fingerprint: str | None = "kf-app"
    workspace_id: str | None = None
    outcome: str = "ok"
    endpoint: str = "/v1/x"
    units: dict[str, Any] | None = None  # images, audio_seconds
    project_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def usd(self) -> Decimal | None:
        return None if self.usd_in is None else self.usd_in + self.usd_out


def make_ledger(path: Path, provider: str, calls: list[Call]) -> None:
    con = duckdb.connect(str(path))
    schema.create(con)
    for i, c in enumerate(calls):
        con.execute(
            "INSERT INTO calls (call_id, started_at, ended_at, upstream, provider, operation, endpoint, request_model, "
            "response_model, stream, status_code, outcome, input_tokens, output_tokens, cache_read_tokens, "
            "cache_write_tokens, input_cost_usd, output_cost_usd, cost_usd, key_fingerprint, tags, request_bytes, "
            "response_bytes, units) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false, 200, ?, ?, ?, ?, ?, ?, ?, ?, ?, MAP {}, "
            "100, 100, ?)",
            [f"c{i}", c.at, c.at + timedelta(seconds=1), provider, provider, c.operation, c.endpoint, c.model, c.model,
             c.outcome, *_tokens(c), c.usd_in, c.usd_out, c.usd, c.fingerprint,
             json.dumps(c.units) if c.units else None])
    con.close()


def _tokens(c: Call) -> list[int | None]:
    """input, output, cache read, cache write tokens; NULL for calls billed in other units (dall-e, whisper, tts)."""
    if c.units is not None or c.endpoint.endswith("/audio/speech"):
        return [None, None, None, None]
    return [c.uncached + c.cache_read + c.cache_write, c.output, c.cache_read, c.cache_write]


OPENAI_KINDS = {"embeddings": "embeddings", "image_generation": "images", "transcription": "audio_transcriptions",
                "other": "audio_speeches"}


def openai_event(c: Call) -> UsageEvent:
    units = c.units or {}
    return UsageEvent(c.at, c.model, uncached_input=c.uncached, cache_read=c.cache_read, output=c.output,
                      kind=OPENAI_KINDS.get(c.operation, "completions"), project_id=c.project_id,
                      images=units.get("images", 0), seconds=units.get("audio_seconds", 0),
                      characters=c.extra.get("characters", 0), costs={"input": c.usd_in, "output": c.usd_out})


def anthropic_event(c: Call) -> UsageEvent:
    return UsageEvent(c.at, c.model, uncached_input=c.uncached, cache_read=c.cache_read, cache_write_5m=c.cache_write,
                      output=c.output, workspace_id=c.workspace_id,
                      costs={"uncached_input_tokens": c.usd_in, "output_tokens": c.usd_out})


def reconcile(tmp: Path, *args: str, env: dict[str, str] | None = None, config: str | None = None) -> subprocess.CompletedProcess:
    cfg = tmp / "meterline.yaml"
    cfg.write_text(config or "listen: 127.0.0.1:1\n")  # port 1: no sidecar answers there
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env if env is not None else {"OPENAI_ADMIN_KEY": KEY,
                                                                                       "ANTHROPIC_ADMIN_KEY": KEY})}
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "reconcile", *args, "--config", str(cfg)],
                          capture_output=True, text=True, env=full_env, cwd=tmp, timeout=60)


@pytest.fixture
def api():
    fake = FakeAdminApi(KEY).start()
    yield fake
    fake.stop()


def stored(db: Path) -> tuple[list[tuple], list[tuple]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        runs = con.execute("SELECT run_id, provider, status, ledger_usd, provider_usd, covered_share, rows_over, "
                           "scope::VARCHAR FROM reconciliations").fetchall()
        rows = con.execute("SELECT model, width, cause, ledger_usd, provider_usd FROM reconciliation_rows").fetchall()
    finally:
        con.close()
    return runs, rows


def openai_calls() -> list[Call]:
    h = timedelta(hours=1)
    return [
        Call(DAY0 + 2 * h, "gpt-4o-mini-2024-07-18", 1200, 300, Decimal("0.00018"), Decimal("0.00018"), cache_read=800),
        Call(DAY0 + 5 * h, "gpt-4o-mini-2024-07-18", 500, 50, Decimal("0.000075"), Decimal("0.00003")),
        Call(DAY0 + 30 * h, "gpt-4o-2024-08-06", 2000, 400, Decimal("0.005"), Decimal("0.004")),
        Call(DAY0 + 31 * h, "text-embedding-3-small", 900, 0, Decimal("0.000018"), Decimal(0), operation="embeddings"),
    ]


def test_openai_ledger_matching_provider_reports_zero_drift_and_stores_the_run(tmp_path, api):
    calls = openai_calls()
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "openai", calls)
    api.events += [openai_event(c) for c in calls]
    api.page_size = 1  # every page holds one bucket: the client must follow next_page

    out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--db", str(db), "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "ok" and doc["rows_over"] == 0
    assert Decimal(doc["provider_usd"]) == Decimal(doc["ledger_usd"]) == sum(c.usd for c in calls)
    assert Decimal(doc["covered_share"]) == 1
    models = {r["model"] for r in doc["rows"]}
    assert models == {"gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "text-embedding-3-small"}
    mini = next(r for r in doc["rows"] if r["model"] == "gpt-4o-mini-2024-07-18")
    assert mini["metrics"]["uncached_input"] == {"ledger": 1700, "provider": 1700, "drift": 0, "drift_relative": "0"}
    assert mini["metrics"]["cache_read"]["provider"] == 800 and mini["metrics"]["requests"]["provider"] == 2
    # three days at one bucket a page: three pages per usage endpoint and for the costs
    pages = [q for p, q in api.requests if p == "/v1/organization/usage/completions"]
    assert len(pages) == 3 and "page" not in pages[0] and all("page" in q for q in pages[1:])
    assert pages[0]["group_by"] == ["model"] and pages[0]["bucket_width"] == ["1d"]
    assert len([p for p, _ in api.requests if p == "/v1/organization/costs"]) == 3
    runs, rows = stored(db)
    assert [(r[1], r[2], r[6]) for r in runs] == [("openai", "ok", 0)] and runs[0][0] == doc["run_id"]
    assert len(rows) == len(doc["rows"]) and all(r[2] is None for r in rows)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM calls").fetchone() == (len(calls),)  # calls untouched
    con.close()


def test_openai_drift_is_attributed_missing_call_mispriced_model_and_unseen_traffic(tmp_path, api):
    calls = openai_calls()
    api.events += [openai_event(c) for c in calls]
    # the provider also saw: a second gpt-4o-mini call the sidecar lost, and another client's o3 traffic
    lost = Call(DAY0 + 3 * timedelta(hours=1), "gpt-4o-mini-2024-07-18", 1000, 100, Decimal("0.00015"), Decimal("0.00006"))
    other = Call(DAY0 + timedelta(days=2, hours=1), "o3-2025-04-16", 5000, 1000, Decimal("0.01"), Decimal("0.008"))
    api.events += [openai_event(lost), openai_event(other)]
    # and the ledger priced gpt-4o at a stale price: same tokens, other dollars
    ledger_calls = [Call(c.at, c.model, c.uncached, c.output, c.usd_in * 2, c.usd_out * 2, c.cache_read, c.cache_write,
                         c.operation) if c.model == "gpt-4o-2024-08-06" else c for c in calls]
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "openai", ledger_calls)

    out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--db", str(db), "--format", "json")
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    causes = {(r["bucket"][:10], r["model"]): r["cause"] for r in doc["rows"]}
    assert causes == {
        ("2026-11-20", "gpt-4o-mini-2024-07-18"): "missing_calls",
        ("2026-11-21", "gpt-4o-2024-08-06"): "mispriced",
        ("2026-11-21", "text-embedding-3-small"): None,
        ("2026-11-22", "o3-2025-04-16"): "unseen",
    }
    mini = next(r for r in doc["rows"] if r["model"] == "gpt-4o-mini-2024-07-18")
    assert mini["metrics"]["requests"] == {"ledger": 2, "provider": 3, "drift": -1, "drift_relative": str(Decimal(-1) / 3)}
    provider_usd = sum(c.usd for c in calls + [lost, other])
    assert Decimal(doc["provider_usd"]) == provider_usd
    covered = sum(c.usd for c in calls)  # min(ledger, provider) per day and model
    assert Decimal(doc["covered_share"]) == covered / provider_usd
    runs, rows = stored(db)
    assert runs[0][2] == "drift" and runs[0][6] == 3
    assert sorted(r[2] for r in rows if r[2]) == ["mispriced", "missing_calls", "unseen"]
    # the table says the same, for people
    table = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--db", str(db))
    assert table.returncode == 1
    assert "unseen: 1 row: traffic the sidecar never saw" in table.stdout
    assert "mispriced: 1 row" in table.stdout and "missing_calls: 1 row" in table.stdout
    assert "the ledger covers" in table.stdout


def test_anthropic_hourly_pages_and_cents_strings_are_exact(tmp_path, api):
    h = timedelta(hours=1)
    # amounts finer than a cent: the cost report says "0.0123456789" cents and so on
    calls = [
        Call(DAY0 + 1 * h, "claude-sonnet-4-20250514", 100, 20, Decimal("0.000123456789"), Decimal("0.000300000001"),
             cache_read=400, cache_write=50),
        Call(DAY0 + 1 * h, "claude-sonnet-4-20250514", 7, 3, Decimal("0.000000000001"), Decimal("0.000000000002")),
        Call(DAY0 + 26 * h, "claude-haiku-4-5-20251001", 300, 90, Decimal("0.0003"), Decimal("0.00045"), cache_write=1000),
    ]
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "anthropic", calls)
    api.events += [anthropic_event(c) for c in calls]
    api.page_size = 2

    out = reconcile(tmp_path, "anthropic", *WINDOW, "--bucket", "1h", "--base-url", api.base_url, "--db", str(db),
                    "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert Decimal(doc["provider_usd"]) == Decimal("0.001173456793")  # not 0.0011734567930000001
    assert Decimal(doc["provider_usd"]) == sum(c.usd for c in calls) == Decimal(doc["ledger_usd"])
    hourly = [r for r in doc["rows"] if r["width"] == "1h"]
    assert [(r["bucket"], r["model"]) for r in hourly] == [
        ("2026-11-20T01:00:00+00:00", "claude-sonnet-4-20250514"), ("2026-11-21T02:00:00+00:00", "claude-haiku-4-5-20251001")]
    sonnet = hourly[0]["metrics"]
    assert sonnet["uncached_input"]["provider"] == 107 and sonnet["cache_read"]["provider"] == 400
    assert sonnet["cache_write"]["provider"] == 50 and "requests" not in sonnet  # the usage report counts no requests
    usage_pages = [q for p, q in api.requests if p == "/v1/organizations/usage_report/messages"]
    assert len(usage_pages) == 36  # 72 hourly buckets, two a page
    assert usage_pages[0]["group_by"] == ["model"] and usage_pages[0]["starting_at"] == ["2026-11-20T00:00:00Z"]
    assert len([p for p, _ in api.requests if p == "/v1/organizations/cost_report"]) == 2
    runs, _ = stored(db)
    assert runs[0][3] == runs[0][4] == Decimal("0.001173456793")


def test_anthropic_scope_filters_both_sides_from_the_config(tmp_path, api):
    h = timedelta(hours=1)
    mine = Call(DAY0 + h, "claude-sonnet-4-20250514", 100, 20, Decimal("0.0003"), Decimal("0.0003"),
                fingerprint="kf-mine", workspace_id="wrkspc_mine")
    theirs = Call(DAY0 + 2 * h, "claude-sonnet-4-20250514", 500, 50, Decimal("0.0015"), Decimal("0.00075"),
                  fingerprint="kf-other", workspace_id="wrkspc_other")
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "anthropic", [mine, theirs])
    api.events += [anthropic_event(mine), anthropic_event(theirs)]
    config = ("listen: 127.0.0.1:1\nreconcile:\n  anthropic:\n    admin_key: ${MY_ANTHROPIC_ADMIN}\n"
              f"    base_url: {api.base_url}\n    workspace_ids: [wrkspc_mine]\n    key_fingerprints: [kf-mine]\n")
    out = reconcile(tmp_path, "anthropic", *WINDOW, "--db", str(db), "--format", "json",
                    env={"MY_ANTHROPIC_ADMIN": KEY}, config=config)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert Decimal(doc["provider_usd"]) == Decimal(doc["ledger_usd"]) == mine.usd
    assert all(q.get("workspace_ids") == ["wrkspc_mine"] for _, q in api.requests)
    # unscoped, the other workspace's traffic and the other key's calls both count
    unscoped = reconcile(tmp_path, "anthropic", *WINDOW, "--db", str(db), "--format", "json",
                         config=f"listen: 127.0.0.1:1\nreconcile: {{anthropic: {{base_url: '{api.base_url}'}}}}\n")
    assert unscoped.returncode == 0, unscoped.stderr
    assert Decimal(json.loads(unscoped.stdout)["provider_usd"]) == mine.usd + theirs.usd


def test_the_admin_key_appears_nowhere(tmp_path, api):
    calls = openai_calls()
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "openai", calls)
    api.events += [openai_event(c) for c in calls[:2]]  # drift too: the report has much to say
    for fmt in ("table", "json"):
        out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--db", str(db), "--format", fmt)
        assert out.returncode == 1, out.stderr
        assert KEY not in out.stdout and KEY not in out.stderr
    con = duckdb.connect(str(db), read_only=True)
    dump = repr(con.execute("SELECT * FROM reconciliations").fetchall()) + \
        repr(con.execute("SELECT * FROM reconciliation_rows").fetchall())
    con.close()
    assert "reconciliations" not in dump and KEY not in dump and len(dump) > 100
    assert KEY.encode() not in db.read_bytes()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_refused_key_is_one_line_and_exit_2(tmp_path, api, provider):
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, provider, [])
    wrong = "sk-admin-WRONG-0000111122223333"
    out = reconcile(tmp_path, provider, *WINDOW, "--base-url", api.base_url, "--db", str(db),
                    env={"OPENAI_ADMIN_KEY": wrong, "ANTHROPIC_ADMIN_KEY": wrong})
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and lines[0].startswith("meterline: ")
    assert wrong not in out.stderr  # the fake's OpenAI message quotes the key: it is scrubbed
    con = duckdb.connect(str(db), read_only=True)
    assert "reconciliations" not in {t for (t,) in con.execute("SHOW TABLES").fetchall()}
    con.close()


def test_an_unreachable_provider_or_missing_key_is_exit_2(tmp_path):
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "openai", [])
    out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", "http://127.0.0.1:1", "--db", str(db), "--timeout", "5")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "cannot reach the openai admin API" in out.stderr and KEY not in out.stderr
    out = reconcile(tmp_path, "openai", *WINDOW, "--db", str(db), env={})
    assert out.returncode == 2 and "OPENAI_ADMIN_KEY" in out.stderr


def test_config_errors_name_the_key():
    with pytest.raises(reconcile_config.ReconcileConfigError, match=r"'reconcile.openai.admin_key'.*NOPE_UNSET"):
        reconcile_config.parse({"openai": {"admin_key": "${NOPE_UNSET}"}}, environ={})
    with pytest.raises(reconcile_config.ReconcileConfigError, match=r"'reconcile.openai.workspace_ids': unknown"):
        reconcile_config.parse({"openai": {"workspace_ids": ["w"]}})
    with pytest.raises(reconcile_config.ReconcileConfigError, match=r"'reconcile.gemini': unknown provider"):
        reconcile_config.parse({"gemini": {}})
    with pytest.raises(reconcile_config.ReconcileConfigError, match=r"'reconcile.anthropic.key_fingerprints'"):
        reconcile_config.parse({"anthropic": {"key_fingerprints": "kf"}})
    cfg = reconcile_config.parse({"openai": {"admin_key": "${K}", "project_ids": ["proj_1"]}}, environ={"K": "s3cret"})
    scope = cfg.scope("openai", environ={})
    assert scope.admin_key == "s3cret" and scope.base_url == "https://api.openai.com"
    assert scope.filters == {"project_ids": ["proj_1"]} and "s3cret" not in repr(scope)


def test_with_a_sidecar_running_the_ledger_is_read_and_the_run_stored_through_it(tmp_path, api, start_sidecar):
    calls = openai_calls()
    workdir = tmp_path / "sc"
    workdir.mkdir()
    make_ledger(workdir / "ledger.duckdb", "openai", calls)
    api.events += [openai_event(c) for c in calls]
    sidecar = start_sidecar(workdir=workdir)  # owns the ledger file from now on

    out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--url", sidecar.url, "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert Decimal(doc["ledger_usd"]) == Decimal(doc["provider_usd"]) == sum(c.usd for c in calls)
    assert doc["stored"].startswith(f"stored through the sidecar at {sidecar.url}")
    assert f"run {doc['run_id']} stored through the sidecar" in out.stderr
    # the sinks process wrote it: the run, its rows, exact money; the calls untouched
    runs = sidecar.sql("SELECT run_id, status, ledger_usd, provider_usd, covered_share, rows_over, "
                       "scope->>'ledger' AS ledger FROM reconciliations")
    assert runs == [{"run_id": doc["run_id"], "status": "ok", "ledger_usd": f"{sum(c.usd for c in calls):.12f}",
                     "provider_usd": f"{sum(c.usd for c in calls):.12f}", "covered_share": "1.000000000000",
                     "rows_over": 0, "ledger": f"sidecar at {sidecar.url}"}]
    rows = sidecar.sql(f"SELECT model, width, ledger_usd, provider_usd, ledger_requests, cause FROM reconciliation_rows "
                       f"WHERE run_id = '{doc['run_id']}' ORDER BY model")
    assert len(rows) == len(doc["rows"]) == 3 and all(r["cause"] is None for r in rows)
    mini = next(r for r in rows if r["model"] == "gpt-4o-mini-2024-07-18")
    assert Decimal(mini["ledger_usd"]) == calls[0].usd + calls[1].usd and mini["ledger_requests"] == 2
    assert sidecar.sql("SELECT count(*) AS n FROM calls") == [{"n": len(calls)}]


def test_a_report_not_in_the_documented_shape_is_one_line_and_exit_2(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Odd(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b'{"object": "page", "data": [{"results": [{"input_tokens": 5}]}], "has_more": false}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        db = tmp_path / "ledger.duckdb"
        make_ledger(db, "openai", [])
        out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", f"http://127.0.0.1:{server.server_address[1]}",
                        "--db", str(db))
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "meterline: openai admin API sent a report of an unexpected shape (KeyError: 'start_time')"]


def test_anthropic_drift_unpriced_extra_and_not_at_provider(tmp_path, api):
    h = timedelta(hours=1)
    sonnet = Call(DAY0 + h, "claude-sonnet-4-20250514", 100, 20, Decimal("0.0003"), Decimal("0.0003"))
    haiku = Call(DAY0 + 2 * h, "claude-haiku-4-5-20251001", 300, 90, Decimal("0.0003"), Decimal("0.00045"))
    retried = Call(DAY0 + 3 * h, "claude-haiku-4-5-20251001", 300, 90, Decimal("0.0003"), Decimal("0.00045"))
    late = Call(DAY0 + 50 * h, "claude-opus-4-1-20250805", 10, 10, Decimal("0.00015"), Decimal("0.00075"))
    api.events += [anthropic_event(c) for c in (sonnet, haiku)]
    db = tmp_path / "ledger.duckdb"
    # the ledger: sonnet with no known price, haiku counted twice, and an opus call the reports lack
    unpriced = Call(sonnet.at, sonnet.model, sonnet.uncached, sonnet.output, None, None)  # type: ignore[arg-type]
    make_ledger(db, "anthropic", [unpriced, haiku, retried, late])
    out = reconcile(tmp_path, "anthropic", *WINDOW, "--base-url", api.base_url, "--db", str(db), "--format", "json")
    assert out.returncode == 1, out.stderr
    causes = {r["model"]: r["cause"] for r in json.loads(out.stdout)["rows"]}
    assert causes == {"claude-sonnet-4-20250514": "unpriced", "claude-haiku-4-5-20251001": "extra_calls",
                      "claude-opus-4-1-20250805": "not_at_provider"}


def test_openai_images_and_audio_compare_what_both_sides_count(tmp_path, api):
    h = timedelta(hours=1)
    dalle = Call(DAY0 + h, "dall-e-3", 0, 0, Decimal("0.08"), Decimal(0), operation="image_generation",
                 endpoint="/v1/images/generations", units={"images": 2})
    # token-billed images: the ledger has tokens, not an image count; the provider counts its image
    gpt_image = Call(DAY0 + 2 * h, "gpt-image-1", 50, 4000, Decimal("0.00025"), Decimal("0.16"),
                     operation="image_generation", endpoint="/v1/images/generations")
    whisper = Call(DAY0 + 3 * h, "whisper-1", 0, 0, Decimal("0.0042"), Decimal(0), operation="transcription",
                   endpoint="/v1/audio/transcriptions", units={"audio_seconds": 42, "input_audio_seconds": 42})
    # speech: the adapter records it as `other`, priced unknown; the provider counts characters
    tts = Call(DAY0 + 4 * h, "tts-1", 0, 0, None, None, operation="other", endpoint="/v1/audio/speech",  # type: ignore[arg-type]
               extra={"characters": 1200})
    chat = openai_calls()[0]
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "openai", [dalle, gpt_image, whisper, tts, chat])
    api.events += [openai_event(c) for c in (dalle, whisper, chat)]
    api.events.append(UsageEvent(gpt_image.at, "gpt-image-1", kind="images", images=1,
                                 costs={"input": gpt_image.usd_in, "output": gpt_image.usd_out}))
    api.events.append(UsageEvent(tts.at, "tts-1", kind="audio_speeches", characters=1200,
                                 costs={"characters": Decimal("0.018")}))

    out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--db", str(db), "--format", "json")
    assert out.returncode == 1, out.stderr  # only the speech's dollars differ: the ledger has no price for it
    doc = json.loads(out.stdout)
    rows = {r["model"]: r for r in doc["rows"]}
    assert set(rows["dall-e-3"]["metrics"]) == {"requests", "images", "usd"}
    assert rows["dall-e-3"]["metrics"]["images"] == {"ledger": 2, "provider": 2, "drift": 0, "drift_relative": "0"}
    assert set(rows["gpt-image-1"]["metrics"]) == {"requests", "usd"}  # no image count in the ledger: not compared
    assert rows["whisper-1"]["metrics"]["seconds"]["provider"] == "42" and rows["whisper-1"]["cause"] is None
    assert set(rows["tts-1"]["metrics"]) == {"requests", "usd"} and rows["tts-1"]["metrics"]["requests"]["drift"] == 0
    assert rows["tts-1"]["cause"] == "unpriced" and rows["tts-1"]["unpriced_calls"] == 1
    assert [r["cause"] for m, r in rows.items() if m != "tts-1"] == [None] * 4
    kinds = {p.removeprefix("/v1/organization/usage/") for p, _ in api.requests if "/usage/" in p}
    assert kinds == {"completions", "embeddings", "images", "audio_speeches", "audio_transcriptions"}
    # stored with the new columns
    con = duckdb.connect(str(db), read_only=True)
    stored_rows = con.execute("SELECT model, ledger_images, provider_images, ledger_seconds, provider_seconds "
                              "FROM reconciliation_rows ORDER BY model").fetchall()
    con.close()
    assert ("dall-e-3", 2, 2, None, None) in stored_rows
    assert ("whisper-1", None, None, Decimal("42.000"), Decimal("42.000")) in stored_rows

    # the provider made three images where the ledger saw two: a missing call, in the table too
    api.events.append(UsageEvent(dalle.at, "dall-e-3", kind="images", images=1, costs={"input": Decimal("0.04")}))
    out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--db", str(db))
    assert out.returncode == 1
    line = next(line for line in out.stdout.splitlines() if "dall-e-3" in line)
    assert "2 / 3 (-1, -33.33%)" in line and "missing_calls" in line
    header = out.stdout.splitlines()[1]
    assert "images" in header and "audio s" in header


def test_scoping_to_the_apps_project_and_key_covers_the_providers_whole_spend(tmp_path, api):
    """Another client on the same organization: unscoped, the report says which share the ledger covers;
    scoped to the app's project (provider side) and key (ledger side), the two agree."""
    h = timedelta(hours=1)
    mine = [Call(DAY0 + h, "gpt-4o-mini", 1000, 100, Decimal("0.00015"), Decimal("0.00006"), project_id="proj_app"),
            Call(DAY0 + 26 * h, "gpt-4o-mini", 3000, 300, Decimal("0.00045"), Decimal("0.00018"), project_id="proj_app")]
    # the other client: the same model the same day, through its own key, never through the sidecar
    theirs = Call(DAY0 + 2 * h, "gpt-4o-mini", 1000, 100, Decimal("0.00015"), Decimal("0.00006"),
                  project_id="proj_other", fingerprint="kf-other")
    # and a call on another key that did go through this sidecar (another app sharing it)
    neighbour = Call(DAY0 + 27 * h, "gpt-4o-mini", 500, 50, Decimal("0.000075"), Decimal("0.00003"),
                     project_id="proj_other", fingerprint="kf-neighbour")
    db = tmp_path / "ledger.duckdb"
    make_ledger(db, "openai", [*mine, neighbour])
    api.events += [openai_event(c) for c in (*mine, theirs, neighbour)]

    out = reconcile(tmp_path, "openai", *WINDOW, "--base-url", api.base_url, "--db", str(db))
    assert out.returncode == 1
    total = sum(c.usd for c in (*mine, theirs, neighbour))
    covered = sum(c.usd for c in (*mine, neighbour))
    share = covered / total * 100
    assert f"the ledger covers {share:.2f}% of the provider's spend" in out.stdout
    assert "missing_calls: 1 row" in out.stdout  # day one: the provider counts the other client's call too

    config = ("listen: 127.0.0.1:1\nreconcile:\n  openai:\n"
              f"    base_url: {api.base_url}\n    project_ids: [proj_app]\n    key_fingerprints: [kf-app]\n")
    scoped = reconcile(tmp_path, "openai", *WINDOW, "--db", str(db), "--format", "json", config=config)
    assert scoped.returncode == 0, scoped.stderr
    doc = json.loads(scoped.stdout)
    assert Decimal(doc["covered_share"]) == 1 and Decimal(doc["provider_usd"]) == sum(c.usd for c in mine)
    assert doc["scope"]["project_ids"] == ["proj_app"] and doc["scope"]["key_fingerprints"] == ["kf-app"]
    usage = [q for p, q in api.requests if p.startswith("/v1/organization/")]
    assert usage and all(q.get("project_ids") == ["proj_app"] for q in usage[-6:])
    con = duckdb.connect(str(db), read_only=True)
    scopes = con.execute("SELECT covered_share, scope->>'project_ids' FROM reconciliations ORDER BY ran_at").fetchall()
    con.close()
    assert scopes[-1] == (Decimal(1), '["proj_app"]') and scopes[0][0] == (covered / total).quantize(Decimal("1e-12"))
