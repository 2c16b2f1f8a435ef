"""The `jobs` table's reads and writes (DuckDB, on the sinks process's threads): job events upserted, unsettled jobs for the guard and the poller.

Every function takes a DuckDB cursor: call them from a worker thread, never an event loop.

Each change of a row sets its `change_seq` to one more than the table's highest: the fleet shipper
(fleet/postgres_shipper.py) ships the rows past the last `change_seq` it sent. Writes take `_WRITING`
from their first statement to their commit, so `change_seq` order is commit order: a shipper that
saw seq N committed never later finds an N-1 it skipped.
"""
from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from .model import TERMINAL, JobEvent, settle_cost

# what a job's units cost at the config's prices: (provider, model, units, at) -> USD or None
PriceUnits = Callable[[str, "str | None", dict[str, Any], datetime], "Decimal | None"]

_COLS = ("job_id", "call_id", "upstream", "provider", "model", "provider_job_id", "state", "submitted_at",
         "settled_at", "units_asked", "units_made", "estimate_usd", "cost_usd", "cost_source")


_WRITING = threading.Lock()  # one writer of `jobs` at a time in this process (the writer thread, the poller)
_NEXT = "(SELECT coalesce(max(change_seq), 0) + 1 FROM jobs)"


def _json(units: dict[str, Any] | None) -> str | None:
    return orjson.dumps(units).decode() if units else None


def _find(con: Any, ev: JobEvent) -> tuple | None:
    if ev.job_id:
        row = con.execute("SELECT job_id, state, settled_at, provider, model, units_asked, estimate_usd "
                          "FROM jobs WHERE job_id = ?", [ev.job_id]).fetchone()
        if row:
            return row
    if ev.provider_job_id:
        return con.execute("SELECT job_id, state, settled_at, provider, model, units_asked, estimate_usd FROM jobs "
                           "WHERE upstream = ? AND provider_job_id = ? ORDER BY submitted_at LIMIT 1",
                           [ev.upstream, ev.provider_job_id]).fetchone()
    return None


def apply(con: Any, events: Iterable[JobEvent], price: PriceUnits | None = None, instance: str | None = None) -> int:
    """Upserts the rows of these events, in order; returns how many rows changed. A settled row
    never changes again (a late poll of a finished job only counts). New rows name `instance`
    (fleet.instance). Call it through apply_job_events (the lock that keeps change_seq in commit order)."""
    changed = 0
    for ev in events:
        if ev.event == "submit":
            con.execute("INSERT INTO jobs (job_id, call_id, upstream, provider, model, provider_job_id, state, "
                        "submitted_at, updated_at, units_asked, estimate_usd, output_file_id, instance, change_seq) "
                        f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {_NEXT}) ON CONFLICT (job_id) DO NOTHING",
                        [ev.job_id, ev.call_id, ev.upstream, ev.provider, ev.model, ev.provider_job_id, ev.state,
                         ev.at, ev.at, _json(ev.units_asked), ev.estimate_usd, ev.output_file_id, instance])
            changed += 1
            continue  # (a synchronous job, each::labs /run, is followed by its settle event)
        row = _find(con, ev)
        if row is None:
            # a job this ledger never saw submitted (before meterline, or another sidecar's)
            job_id = ev.job_id or uuid.uuid4().hex
            con.execute("INSERT INTO jobs (job_id, upstream, provider, model, provider_job_id, state, updated_at, "
                        f"instance, change_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, {_NEXT})",
                        [job_id, ev.upstream, ev.provider, ev.model, ev.provider_job_id, ev.state, ev.at, instance])
            row = (job_id, ev.state, None, ev.provider, ev.model, None, None)
        job_id, _, settled_at, provider, model, asked, estimate = row
        if settled_at is not None:
            con.execute(f"UPDATE jobs SET polls = polls + 1, change_seq = {_NEXT} WHERE job_id = ?", [job_id])
            continue
        cost, source = ev.cost_usd, ev.cost_source
        terminal = ev.event == "settle" or (ev.state in TERMINAL and ev.output_file_id is None)
        if terminal and ev.event != "settle":
            # a poll the forwarder could not settle (it did not hold the job): settle here the same way
            made = price(provider or "", model or ev.model, ev.units_made or {}, ev.at) \
                if price and ev.units_made else None
            cost, source = settle_cost(ev.state, ev.cost_usd if ev.cost_source == "provider" else None, made,
                                       Decimal(estimate) if estimate is not None else None)
        con.execute(f"UPDATE jobs SET state = coalesce(?, state), updated_at = ?, change_seq = {_NEXT}, "
                    "provider_job_id = coalesce(provider_job_id, ?), model = coalesce(model, ?), units_made = coalesce(?, units_made), "
                    "output_file_id = coalesce(?, output_file_id), "
                    "cost_usd = CASE WHEN ? THEN ? ELSE cost_usd END, "
                    "cost_source = CASE WHEN ? THEN ? ELSE cost_source END, "
                    "settled_at = CASE WHEN ? THEN ? ELSE settled_at END WHERE job_id = ?",
                    [ev.state, ev.at, ev.provider_job_id, ev.model, _json(ev.units_made), ev.output_file_id,
                     terminal, cost, terminal, source, terminal, ev.at, job_id])
        changed += 1
    return changed


def unsettled_jobs(con: Any) -> list[dict[str, Any]]:
    """Jobs not yet settled, with what the guard matches budget rules on (from the submitting call)."""
    cur = con.execute(
        """SELECT j.job_id, j.upstream, j.provider, j.model, j.provider_job_id, j.state,
                  coalesce(j.submitted_at, j.updated_at) AS submitted_at,
                  j.units_asked, j.estimate_usd, j.output_file_id, j.polls, c.operation, coalesce(c.app, ''),
                  coalesce(c.user_id, ''), coalesce(c.key_fingerprint, ''), c.tags, c.request_model
           FROM jobs j LEFT JOIN calls c ON c.call_id = j.call_id
           WHERE j.settled_at IS NULL ORDER BY j.submitted_at""")
    names = [d[0] for d in cur.description]
    names[-6:] = ["operation", "app", "user_id", "key", "tags", "request_model"]
    out = []
    for row in cur.fetchall():
        doc = dict(zip(names, row))
        doc["units_asked"] = orjson.loads(doc["units_asked"]) if doc["units_asked"] else {}
        doc["tags"] = dict(doc["tags"] or {})
        out.append(doc)
    return out


def job_settlements(con: Any, job_ids: list[str]) -> list[tuple[str, str, Decimal | None]]:
    """(job_id, state, cost_usd) of those of `job_ids` that are settled in the ledger."""
    if not job_ids:
        return []
    return [(j, s, Decimal(c) if c is not None else None) for j, s, c in con.execute(
        "SELECT job_id, state, cost_usd FROM jobs WHERE settled_at IS NOT NULL "
        "AND job_id IN (SELECT unnest(?::VARCHAR[]))", [job_ids]).fetchall()]


def job_spend(con: Any, starts: set[datetime]) -> list[tuple[dict[str, Any], datetime, Decimal]]:
    """Settled jobs' cost since each window start (by their submit), with the submitting call's
    attributes: what a restarted guard adds to the windows `calls` rebuilt (job calls cost 0 there)."""
    out = []
    for start in sorted(starts):
        for row in con.execute(
                """SELECT c.provider, coalesce(c.request_model, j.model, ''), c.operation, coalesce(c.app, ''),
                          coalesce(c.user_id, ''), coalesce(c.key_fingerprint, ''), c.tags, sum(j.cost_usd)
                   FROM jobs j JOIN calls c ON c.call_id = j.call_id
                   WHERE j.settled_at IS NOT NULL AND j.cost_usd IS NOT NULL AND c.started_at >= ?
                   GROUP BY ALL""", [start]).fetchall():
            provider, model, operation, app, user, key, tags, usd = row
            out.append(({"provider": provider or "", "model": model, "operation": operation or "", "app": app,
                         "user": user, "key": key, "tags": dict(tags or {})}, start, Decimal(usd)))
    return out


def apply_job_events(con: Any, events: list[JobEvent], price: PriceUnits | None = None,
                     instance: str | None = None) -> int:
    """`apply` inside one transaction (the sinks process's poller and its writer-thread sink)."""
    with _WRITING:
        con.execute("BEGIN")
        try:
            n = apply(con, events, price, instance)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return n
