"""The crash journal's line format: records survive a round trip exactly, and segments written by an
earlier version (objects keyed by field name) or with their fields in another order still replay."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import orjson

from ledger.journal import Journal, decode, encode
from ledger.records import CallRecord

STARTED = datetime(2026, 11, 26, 3, 0, 1, 123456, tzinfo=timezone.utc)


def record(call_id: str = "c1", **changes: object) -> CallRecord:
    base = CallRecord(
        call_id=call_id, started_at=STARTED, ended_at=datetime(2026, 11, 26, 3, 0, 2, tzinfo=timezone.utc),
        duration_ms=877.5, ttft_ms=None, overhead_ms=0.2, app="app", upstream="openai", provider="openai",
        operation="chat", endpoint="/v1/chat/completions", request_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18", response_id="chatcmpl-1", stream=True, status_code=200,
        outcome="ok", error_type=None, finish_reason="stop", input_tokens=16, output_tokens=150,
        cache_read_tokens=0, cache_write_tokens=None, reasoning_tokens=0, units={"images": 2},
        input_cost_usd=Decimal("0.0000024"), output_cost_usd=Decimal("0.00009"), cost_usd=Decimal("0.0000924"),
        price_source="genai-prices", user_id="u1", key_fingerprint="abcd", tags={"team": "search"},
        trace_id="a" * 32, span_id="b" * 16, request_bytes=80, response_bytes=1157, anomaly=None,
        service_tier="default")
    return dataclasses.replace(base, **changes)


def test_a_record_survives_its_line_exactly() -> None:
    original = record()
    line = encode(original)
    assert line.endswith(b"\n") and line.startswith(b"[")
    back = decode(line)
    assert back == original
    assert isinstance(back.cost_usd, Decimal) and back.cost_usd == Decimal("0.0000924")
    assert back.started_at == STARTED and back.started_at.tzinfo is not None


def test_journal_replays_its_own_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    segment = journal.begin(record("c1", outcome="interrupted", ended_at=None, cost_usd=None))
    journal.begin(record("c2", outcome="interrupted", ended_at=None))
    journal.end(record("c1"), segment)
    journal.close()
    again = Journal(tmp_path)
    found = {r.call_id: r for r in again.recover()}
    assert found["c1"] == record("c1")  # the last line of a call wins
    assert found["c2"].outcome == "interrupted"


def test_segments_of_an_earlier_version_still_replay(tmp_path: Path) -> None:
    old = record("old")
    doc = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
    line = orjson.dumps(doc, default=str, option=orjson.OPT_APPEND_NEWLINE)  # objects, no header line
    (tmp_path / "000000000001.jsonl").write_bytes(line)
    assert Journal(tmp_path).recover() == [old]


def test_fields_are_read_by_the_names_in_the_header(tmp_path: Path) -> None:
    # a version whose fields came in another order, and one this version lacks
    fields = ["outcome", "call_id", "started_at", "gone_column"]
    header = orjson.dumps({"meterline_journal": 2, "fields": fields}) + b"\n"
    rows = orjson.dumps(["interrupted", "x1", STARTED.isoformat(), 7]) + b"\n"
    (tmp_path / "000000000003.jsonl").write_bytes(header + rows + b'["ok", "torn')
    (got,) = Journal(tmp_path).recover()
    assert (got.call_id, got.outcome, got.started_at, got.cost_usd) == ("x1", "interrupted", STARTED, None)


def test_a_lazy_final_line_waits_for_flush_unless_its_call_began_in_an_older_segment(tmp_path: Path) -> None:
    scheduled: list[object] = []
    journal = Journal(tmp_path, segment_bytes=10)  # every line starts a new segment
    journal.open()
    journal.defer = scheduled.append
    first = journal.begin(record("c1", outcome="interrupted"))
    journal.flush()
    journal.end(record("c1"), first, lazily=True)  # began in an older segment: written at once
    assert {r.call_id: r.outcome for r in Journal(tmp_path).recover()}["c1"] == "ok"

    journal.segment_bytes = 1 << 20
    second = journal.begin(record("c2", outcome="interrupted"))
    journal.flush()
    journal.end(record("c2"), second, lazily=True)
    on_disk = {r.call_id: r.outcome for r in Journal(tmp_path).recover()}
    assert on_disk["c2"] == "interrupted" and journal.buffer  # held until the loop's turn ends
    journal.flush()
    assert {r.call_id: r.outcome for r in Journal(tmp_path).recover()}["c2"] == "ok"
