"""The sinks process's work: journals into DuckDB, telemetry and alerts; SQL, metrics and budget storage for the forwarders.

Threads: the tail thread polls the forwarders' journals every POLL_S and hands finished calls to
the ledger writer's thread, which commits them in batches and passes each batch to telemetry and
to `consume` here (alerts and the budget gauge). The event loop answers the forwarders' requests
(sinks/rpc.py) and delivers webhooks. Nothing here is on a call's path: a forwarder only appends
to its journal; when this process is down, calls flow and its records wait on disk.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

from exporters import http_client
from exporters.alerts import AlertDispatcher
from exporters.telemetry import Telemetry
from fleet import postgres_query
from fleet.postgres_shipper import Shipper, ShipperSettings
from jobs import reconcile_store
from jobs import store as job_store
from jobs.model import JobEvent
from jobs.poller import Poller, Target
from ledger import budget_store, sql
from ledger.budgets import CrossingNote
from ledger.pricing import Pricer
from ledger.records import CallExtras, CallRecord, Usage
from ledger.writer import LedgerWriter, journal_dir
from sidecar import memory
from sidecar.config import Config

from .queries import Busy, Queries
from .tail import JournalTail

log = logging.getLogger("meterline.sinks")

POLL_S = 0.05  # how often the journals are looked at: a call's row lands within this plus the writer's batching
# Records read but not yet committed: past this the tail stops reading, and a backlog (calls faster
# than this process can write and export them) waits in the journal on disk rather than in memory
MAX_PENDING = 20_000
# what a forwarder may ask the ledger for, by name (ledger/budget_store.py): nothing else is callable
DB_FUNCTIONS = {f.__name__: f for f in (budget_store.api_rules, budget_store.history, budget_store.recent_outputs,
                                        budget_store.save_rule, budget_store.delete_rule, budget_store.save_topup,
                                        job_store.unsettled_jobs, job_store.job_settlements, job_store.job_spend)}


class Sinks:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.writer = LedgerWriter(config.ledger_path, memory_limit=config.ledger_memory_limit,
                                   threads=config.ledger_threads)
        self.tail = JournalTail(journal_dir(config.ledger_path))
        self.writer.on_committed = self.tail.committed
        self.writer.instance = config.fleet.instance
        self.telemetry = Telemetry(config.telemetry, os.environ, config.app)
        self.alerts = AlertDispatcher(config.alerts, persist=self._persist_alert)
        self.queries = Queries(config.sql_max_concurrent, config.sql_timeout_s)
        self.reconciliations = reconcile_store.Uploads(config.fleet.instance)  # runs `meterline reconcile` hands over, part by part
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.time()
        self._polling = threading.Lock()  # the tail thread and `sync` take turns reading the journals
        self._stop = threading.Event()
        self._backlogged = False  # reading paused at MAX_PENDING since the last trim
        self._thread: threading.Thread | None = None
        # async jobs: rows upserted from the calls' job events; unfinished ones polled here (jobs/poller.py)
        self.pricer = Pricer(config.prices, config.default_max_output_tokens)
        self.poller = Poller(config.jobs, {name: Target(u.base_url, u.adapter, u.api_key)
                                           for name, u in config.upstreams.items()},
                             self._fetch, self._run_jobs, self.pricer.units_cost, self._batch_line_cost)
        self._poller_task: asyncio.Task[None] | None = None
        self._http: Any = None
        self.job_failures = 0
        self._skip_jobs = False  # during catch-up, whose job events were applied already
        self.writer.sinks.append(self.telemetry)
        self.writer.sinks.append(self)
        self.telemetry.register_gauge("meterline.ledger.pending", "{record}",
                                      "Call records not yet committed to the ledger", lambda: self.writer.pending)
        self.telemetry.register_gauge("meterline.ledger.write_lag", "s", "From a call's end to its row being committed",
                                      lambda: self.writer.last_lag_s)
        self.shipper: Shipper | None = None  # rows to the fleet ledger (fleet.postgres)
        fleet = config.fleet
        if fleet.postgres:
            self.shipper = Shipper(ShipperSettings(fleet.postgres, fleet.ship_interval_s, fleet.retry_s,
                                                   fleet.batch_rows, fleet.connect_timeout_s), self.writer.cursor)
            shipper = self.shipper
            self.telemetry.register_gauge("meterline.fleet.postgres.backlog", "{row}",
                                          "Ledger rows not yet shipped to the fleet ledger", lambda: shipper.backlog_rows)
            self.telemetry.register_gauge("meterline.fleet.postgres.lag", "s",
                                          "Age of the oldest ledger row not yet shipped to the fleet ledger",
                                          lambda: shipper.lag_s)
            self.telemetry.register_gauge("meterline.fleet.postgres.up", "1",
                                          "1 while the fleet ledger takes rows, 0 while it fails",
                                          lambda: 1 if shipper.up else 0)

    # --- life ----------------------------------------------------------------------------------

    def open(self) -> int:
        """Opens the ledger and writes what the journals hold that it lacks (a thread, not the loop)."""
        self.writer.open()
        if self.shipper is not None:
            self.shipper.open()
        self.telemetry.start()
        # What the journals held at start may be in the ledger already (this process was killed
        # after a commit, before the segments went): read up to there writing only the calls the
        # ledger lacks. Lines written after that are new. (The second pass resolves dead calls.)
        ends = self.tail.ends()
        caught = passes = 0
        items: list = [None]
        # (a pass that finds nothing ends it too: a torn last line is never read past)
        while passes < 2 or (items and not self.tail.read_past(ends)):
            items = self.tail.poll()
            self._quarantine_lines()
            passes += 1
            if items:
                # job events first, for every call read again: the ledger may hold a call whose job
                # events were not applied (killed between the two); applying them again is harmless
                self._apply_jobs(self._job_events((r, x) for r, _, x in items))
                self._skip_jobs = True
                try:
                    caught += self.writer.catch_up(items)
                finally:
                    self._skip_jobs = False
        if caught:
            log.info("wrote %d calls from the journals", caught)
        return caught

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.alerts.start()
        self.writer.start()
        self._thread = threading.Thread(target=self._tail_loop, name="meterline-tail", daemon=True)
        self._thread.start()
        if self.shipper is not None:
            self.shipper.start()
        self._poller_task = loop.create_task(self.poller.forever(), name="meterline-job-poller")

    async def stop(self) -> None:
        """Reads the journals one last time, commits, flushes telemetry, closes the ledger."""
        loop = asyncio.get_running_loop()
        self._stop.set()
        self.queries.close()
        if self._poller_task is not None:
            self._poller_task.cancel()
        if self._http is not None:
            await self._http.aclose()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join, 10.0)
        await loop.run_in_executor(None, self._poll_once)
        await self.alerts.stop()
        if self.shipper is not None:  # before the ledger closes: it reads from it
            # the last poll's records committed first, so that the shipper's last pass sends them
            await loop.run_in_executor(None, self.writer.wait_written, self.writer.submitted, 5.0)
            await loop.run_in_executor(None, self.shipper.stop)
        await loop.run_in_executor(None, self.writer.stop)
        await loop.run_in_executor(None, self.telemetry.shutdown, 5.0)

    def _tail_loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._poll_once()
            except Exception:  # noqa: BLE001 - a bad pass is logged; the next one tries again
                log.exception("reading the journals failed")
                time.sleep(1.0)

    def _poll_once(self) -> int:
        with self._polling:
            if self.writer.pending >= MAX_PENDING:
                self._backlogged = True
                return self.writer.submitted
            if self._backlogged and self.writer.pending < MAX_PENDING // 20:
                self._backlogged = False
                memory.trim()  # what the backlog's records took goes back to the system
            items = self.tail.poll()
            for record, token, extras in items:
                self.writer.submit(record, token, extras)
            self._quarantine_lines()
            return self.writer.submitted

    def _quarantine_lines(self) -> None:
        if self.tail.rejected_lines:
            lines, self.tail.rejected_lines = self.tail.rejected_lines, []
            log.warning("%d unusable journal lines quarantined in `rejected` (%s)", len(lines), lines[0][1])
            self.writer.quarantine_lines(lines)

    # --- a sink of the writer: alerts and the budget gauge ---------------------------------------

    def consume(self, batch: list[tuple[CallRecord, CallExtras | None]]) -> None:
        loop = self.loop
        if not self._skip_jobs:
            self._apply_jobs(self._job_events(batch))
        for record, extras in batch:
            if extras is None:
                continue
            for rule, key, value in extras.utilization:
                self.telemetry.set_budget_utilization(rule, key, Decimal(value))
            for doc in extras.alerts:
                try:
                    note = CrossingNote.from_json(doc)
                except ValueError as e:
                    log.warning("a budget alert of call %s is unreadable (%s)", record.call_id, e)
                    continue
                if loop is not None:
                    loop.call_soon_threadsafe(self.alerts.fire, note, record.call_id)

    @staticmethod
    def _job_events(batch: Any) -> list[JobEvent]:
        events: list[JobEvent] = []
        for record, extras in batch:
            for doc in (extras.jobs if extras is not None else None) or ():
                try:
                    events.append(JobEvent.from_json(doc))
                except ValueError as e:
                    log.warning("a job event of call %s is unreadable (%s)", record.call_id, e)
        return events

    def _apply_jobs(self, events: list[JobEvent]) -> None:
        """Upserts `jobs` rows (the writer's thread, after the calls' commit: a job's row follows its
        call's). The poller may be writing the same row: a write conflict is tried again."""
        if not events:
            return
        for attempt in range(5):
            cur = self.writer.cursor()
            try:
                job_store.apply_job_events(cur, events, self.pricer.units_cost, self.config.fleet.instance)
                return
            except Exception:  # noqa: BLE001 - the calls are written; a job row fault is logged, counted
                if attempt == 4:
                    break
                time.sleep(0.05 * (attempt + 1))
            finally:
                cur.close()
        # one by one, so an event the table refuses costs only itself
        for event in events:
            cur = self.writer.cursor()
            try:
                job_store.apply_job_events(cur, [event], self.pricer.units_cost, self.config.fleet.instance)
            except Exception:  # noqa: BLE001 - the calls are written; a job row fault is logged, counted
                self.job_failures += 1
                log.exception("a job event of job %s could not be written", event.job_id or event.provider_job_id)
            finally:
                cur.close()

    # --- the job poller's ends -------------------------------------------------------------------

    def _batch_line_cost(self, provider: str, model: str | None, counts: dict[str, int], at: datetime) -> Decimal | None:
        return self.pricer.batch_cost(provider, model, Usage(**counts), at).total_usd

    async def _fetch(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        if self._http is None:
            self._http = http_client.async_client(30.0)
        r = await self._http.get(url, headers=headers)
        return r.status_code, r.content

    async def _run_jobs(self, name: str, *args: Any) -> Any:
        fn = {"unsettled_jobs": job_store.unsettled_jobs, "apply_job_events": job_store.apply_job_events}[name]
        if name == "apply_job_events":
            args = (*args, self.pricer.units_cost, self.config.fleet.instance)
        return await asyncio.get_running_loop().run_in_executor(None, self._db, fn, list(args))

    def _persist_alert(self, note: CrossingNote, call_id: str | None) -> None:
        cur = self.writer.cursor()
        try:
            budget_store.save_alert(cur, note, call_id, self.config.fleet.instance)
        finally:
            cur.close()

    # --- what the forwarders ask ----------------------------------------------------------------

    async def handle(self, op: str, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        if op == "health":
            return self.health()
        if op == "metrics":
            return await loop.run_in_executor(None, self.telemetry.prometheus)
        if op == "sql":
            query, max_rows = args
            con = self.writer.con
            if con is None:
                raise RuntimeError("ledger not open")
            try:
                return ("ok", sql.to_json(await self.queries.run(con, query, max_rows)))
            except Busy as e:
                return ("busy", str(e))
            except sql.QueryRefused as e:
                return ("refused", str(e))
            except sql.QueryInterrupted as e:
                return ("interrupted", str(e))
            except Exception as e:  # noqa: BLE001 - a bad query is the caller's error, shown as DuckDB says it
                return ("error", str(e))
        if op == "fleet_sql":
            return await self._fleet_sql(*args)
        if op == "db":
            name, *rest = args
            fn = DB_FUNCTIONS.get(name)
            if fn is None:
                raise ValueError(f"no ledger function {name!r}")
            if fn is budget_store.save_topup:  # the row names this sidecar (the forwarder does not say)
                rest = [*rest[:4], self.config.fleet.instance]
            return await loop.run_in_executor(None, self._db, fn, rest)
        if op == "reconciliation":  # one part of a finished run (jobs/reconcile_store.py), as the CLI sent it
            try:
                return ("ok", await loop.run_in_executor(None, self._db, self.reconciliations.receive, list(args)))
            except reconcile_store.Refused as e:
                return ("refused", str(e))
        if op == "sync":
            return await loop.run_in_executor(None, self._sync, float(args[0]) if args else 10.0)
        if op == "lines":  # a forwarder whose journal disk is full sends its lines instead
            return await loop.run_in_executor(None, self._take_sent, *args)
        if op == "alerts":  # fleet budget alerts this forwarder claimed first (fleet/redis_leases.py)
            for doc, call_id in args[0]:
                self.alerts.fire(CrossingNote.from_json(doc), call_id)
            return len(args[0])
        if op == "ping":
            return os.getpid()
        raise ValueError(f"unknown request {op!r}")

    async def _fleet_sql(self, query: str, max_rows: int) -> tuple[str, Any]:
        """The dashboard's "whole fleet": one read-only query on the fleet ledger (fleet/postgres_query.py)."""
        fleet = self.config.fleet
        if not fleet.postgres:
            return ("unavailable", "no fleet ledger: config key 'fleet.postgres' is not set")
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, postgres_query.run, fleet.postgres, query, max_rows,
                                                self.config.sql_timeout_s, fleet.connect_timeout_s)
        except sql.QueryRefused as e:
            return ("refused", str(e))
        except sql.QueryInterrupted as e:
            return ("interrupted", str(e))
        except postgres_query.FleetUnavailable as e:
            return ("unavailable", str(e))
        except ValueError as e:
            return ("error", str(e))
        return ("ok", sql.to_json(result))

    def _take_sent(self, worker: str, lines: list[bytes]) -> int:
        with self._polling:
            for record, token, extras in self.tail.take_sent(worker, lines):
                self.writer.submit(record, token, extras)
        return len(lines)

    def _db(self, fn: Any, args: list[Any]) -> Any:
        cur = self.writer.cursor()
        try:
            return fn(cur, *args)
        finally:
            cur.close()

    def _sync(self, timeout: float) -> bool:
        """Waits until everything the journals hold now is committed (the asker flushed its journal)."""
        target = self._poll_once()
        return self.writer.wait_written(target, timeout)

    def health(self) -> dict[str, Any]:
        w = self.writer
        return {
            "pid": os.getpid(),
            "ledger": {"path": str(w.path), "written": w.written, "pending": w.pending,
                       "write_failures": w.failures, "last_lag_s": round(w.last_lag_s, 4),
                       "failing": w.failing, "rejected": w.rejected + w.rejected_at_start},
            "backlog_bytes": self.tail.backlog_bytes,
            "open_calls": self.tail.open_calls,
            "interrupted": self.tail.interrupted,
            "telemetry": self.telemetry.stats(),
            "fleet": {"instance": self.config.fleet.instance,
                      "postgres": self.shipper.health() if self.shipper is not None else None},
            "jobs": {"polled": self.poller.polled, "poll_failures": self.poller.failed,
                     "settled_by_poller": self.poller.settled, "write_failures": self.job_failures},
            "alerts": {"fired": self.alerts.stats.fired, "delivered": self.alerts.stats.delivered,
                       "failed": self.alerts.stats.failed, "dropped": self.alerts.stats.dropped},
        }
