"""One bad value never stops the ledger: an upstream's absurd usage count, a journal line with junk in
it, or a record DuckDB refuses becomes a NULL with an anomaly, or a row of `rejected`, and every other
call is still written; the sidecar restarts on the same ledger."""
from __future__ import annotations

import dataclasses
import http.client
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import duckdb
import orjson
import pytest

from ledger.journal import _FIELDS, _HEADER, Journal, encode
from ledger.writer import LedgerWriter, journal_dir
from tests.fakes.poison import HEADER, PoisonUpstream
from tests.sidecar_process import Sidecar
from tests.test_journal import record

HUGE = "18446744073709551615"  # a valid JSON integer (2**64 - 1), beyond BIGINT


def _call(sidecar: Sidecar, prompt_tokens: str | None, tag: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
    headers = {"content-type": "application/json", "authorization": "Bearer sk-poison",
               "x-meterline-tags": f"n={tag}"}
    if prompt_tokens is not None:
        headers[HEADER] = prompt_tokens
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/poison/v1/chat/completions", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def _rows(sidecar: Sidecar, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    return sidecar.rows("upstream = 'poison'", count=count, timeout=timeout)


def test_a_huge_usage_count_does_not_stop_the_ledger(start_sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    with PoisonUpstream() as upstream:
        extra = {"upstreams": {"poison": {"base_url": upstream.base_url, "adapter": "openai", "provider": "openai"}}}
        workdir = tmp_path / "poisoned"
        first = start_sidecar(extra, workdir=workdir)
        assert _call(first, HUGE, "bad") == 200  # the app gets its response whatever the count
        for i in range(3):
            assert _call(first, None, f"after{i}") == 200
        rows = _rows(first, 4)
        assert len(rows) == 4, f"the ledger stopped writing after the bad call: {rows}"
        bad = [r for r in rows if r["tags"] == {"n": "bad"}]
        assert len(bad) == 1
        assert bad[0]["input_tokens"] is None and bad[0]["output_tokens"] == 3
        assert "out_of_range" in bad[0]["anomaly"]
        assert bad[0]["cost_usd"] is None  # a cost from an unknown count is unknown, not a fortune
        good = [r for r in rows if r is not bad[0] and r["tags"] != {"n": "bad"}]
        assert all(r["input_tokens"] == 12 and r["anomaly"] is None for r in good)
        assert first.health()["anomalies"].get("out_of_range") == 1
        first.kill()  # the journal still holds the bad call: replay must not choke on it

        second = start_sidecar(extra, workdir=workdir)
        assert _call(second, None, "restarted") == 200
        rows = _rows(second, 5)
        assert len(rows) == 5
        assert sum(r["tags"] == {"n": "bad"} for r in rows) == 1
        assert second.health()["status"] == "ok"


# --- journal lines with junk in them --------------------------------------------------------


def _line(id_: str, **changes: Any) -> bytes:
    """A journal line as the sidecar writes it, with some fields replaced by raw JSON values."""
    row = orjson.loads(encode(record(id_)))
    for name, value in changes.items():
        row[_FIELDS.index(name)] = value
    return orjson.dumps(row) + b"\n"


BAD_LINES = {
    "cost_text": _line("cost_text", cost_usd="abc"),
    "cost_nan": _line("cost_nan", cost_usd="NaN"),
    "cost_huge": _line("cost_huge", cost_usd="1e400", input_cost_usd="1e300"),
    "tokens_fraction": _line("tokens_fraction", input_tokens=1.5),
    "tokens_huge": _line("tokens_huge", output_tokens=int(HUGE)),
    "tokens_negative": _line("tokens_negative", output_tokens=-4),
    "tags_list": _line("tags_list", tags=["team", "search"]),
    "units_huge": _line("units_huge", units={"images": int(HUGE)}),
    "model_number": _line("model_number", response_model=12),
}
NULL_ID = _line("ignored", call_id=None)
NO_START = _line("no_start", started_at="yesterday")


def _write_segment(directory: Path, lines: list[bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "000000000001.jsonl").write_bytes(_HEADER + b"".join(lines))


def test_replay_cleans_or_quarantines_junk_journal_lines(tmp_path: Path) -> None:
    db = tmp_path / "ledger.duckdb"
    _write_segment(journal_dir(db), [_line("good1"), *BAD_LINES.values(), NULL_ID, NO_START, b"{not json\n",
                                     _line("good2")])
    writer = LedgerWriter(db)
    writer.open()  # before: InvalidOperation, ArrowInvalid or OverflowError out of start-up
    con = writer.cursor()
    names = ["call_id", "input_tokens", "output_tokens", "cost_usd", "input_cost_usd", "tags", "anomaly", "units",
             "response_model"]
    rows = {r[0]: dict(zip(names, r)) for r in con.execute(f"SELECT {', '.join(names)} FROM calls").fetchall()}
    rejected = con.execute("SELECT source, reason, data FROM rejected").fetchall()
    writer.stop()
    assert rows["good1"]["anomaly"] is None and rows["good2"]["anomaly"] is None
    assert rows["good1"]["cost_usd"] == Decimal("0.0000924")
    for call_id in BAD_LINES:
        assert call_id in rows, f"{call_id} was neither written nor quarantined: {rejected}"
        anomaly = rows[call_id]["anomaly"] or ""
        assert "out_of_range" in anomaly or "invalid_value" in anomaly, rows[call_id]
    assert rows["cost_text"]["cost_usd"] is None and rows["cost_nan"]["cost_usd"] is None
    assert rows["cost_huge"]["cost_usd"] is None and rows["cost_huge"]["input_cost_usd"] is None
    assert rows["tokens_fraction"]["input_tokens"] is None and rows["tokens_huge"]["output_tokens"] is None
    assert rows["tokens_negative"]["output_tokens"] is None and rows["tags_list"]["tags"] == {}
    assert rows["units_huge"]["units"] is None and rows["model_number"]["response_model"] is None
    assert rows["cost_text"]["input_tokens"] == 16  # the rest of a cleaned row is kept as it was
    assert rows["tags_list"]["cost_usd"] == Decimal("0.0000924")
    assert "ignored" not in rows and None not in rows and "no_start" not in rows
    assert len(rejected) == 3, rejected  # null call_id, unusable started_at, not JSON
    assert all(source == "journal" and reason for source, reason, _ in rejected)
    assert any(b"{not json" == data.encode() for _, _, data in rejected)
    # a second start replays nothing twice and quarantines nothing twice
    again = LedgerWriter(db)
    again.open()
    count = again.cursor().execute("SELECT count(*) FROM calls").fetchone()[0]
    rejected_again = again.cursor().execute("SELECT count(*) FROM rejected").fetchone()[0]
    again.stop()
    assert count == len(rows) and rejected_again == 3


def test_the_writer_quarantines_a_record_duckdb_refuses_and_carries_on(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "ledger.duckdb", flush_interval_s=0.01)
    writer.open()
    writer.start()
    # straight to the writer, past any validation on the request path: the writer's own safety net
    records = [record(f"w{i}") for i in range(20)]
    records[7] = dataclasses.replace(records[7], input_tokens=int(HUGE))
    records[13] = dataclasses.replace(records[13], cost_usd=Decimal("1e300"))
    for r in records:
        writer.submit(r, None)
    assert writer.wait_written(20, timeout=10), "the writer stuck on the bad batch"
    writer.submit(record("later"), None)
    assert writer.wait_written(21, timeout=10)
    con = writer.cursor()
    ids = {r[0] for r in con.execute("SELECT call_id FROM calls").fetchall()}
    rejected = con.execute("SELECT source, reason, data FROM rejected ORDER BY data").fetchall()
    writer.stop()
    assert ids == {f"w{i}" for i in range(20)} - {"w7", "w13"} | {"later"}
    assert [json.loads(data)["call_id"] for _, _, data in rejected] == ["w13", "w7"]
    assert all(source == "writer" and reason for source, reason, _ in rejected)
    assert writer.rejected == 2


def test_replay_quarantines_a_record_duckdb_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the line checks (turned off here), replay isolates what the ledger refuses, as the writer does."""
    monkeypatch.setattr("ledger.journal.validate.full", lambda record: record)
    db = tmp_path / "ledger.duckdb"
    _write_segment(journal_dir(db), [_line("r1"), BAD_LINES["tokens_huge"], BAD_LINES["cost_nan"], _line("r2")])
    writer = LedgerWriter(db)
    assert writer.open() == 2
    ids = {r[0] for r in writer.cursor().execute("SELECT call_id FROM calls").fetchall()}
    rejected = writer.cursor().execute("SELECT source, data FROM rejected").fetchall()
    writer.stop()
    assert ids == {"r1", "r2"}
    assert sorted(json.loads(data)["call_id"] for _, data in rejected) == ["cost_nan", "tokens_huge"]
    assert {source for source, _ in rejected} == {"journal"} and writer.rejected_at_start == 2
