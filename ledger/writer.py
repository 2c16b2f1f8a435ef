"""The ledger's owner: opens the DuckDB file, replays the journal, and writes records in batches on its own thread.

The event loop only ever calls `submit` (a non-blocking queue put). One thread owns the write
connection; queries get their own cursors from `cursor()` and run on other threads.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import duckdb

from . import budget_store, schema
from .journal import Journal
from .records import CallExtras, CallRecord

log = logging.getLogger("meterline.ledger")

_STOP = object()
MAX_BATCH = 5000
# Each DuckDB commit costs CPU and a WAL sync whatever its size: gather records for this long
# after the first before writing (the journal already holds them), so busy traffic makes a few
# large commits and a lone call's row is written a quarter second after it ends.
FLUSH_INTERVAL_S = 0.25


# DuckDB caches every block it writes until its memory_limit (by default 80% of the machine's RAM),
# so a long-running ledger would grow the sidecar without bound; capped, old blocks are evicted
DEFAULT_MEMORY_LIMIT = "128MB"
DEFAULT_THREADS = 1  # DuckDB's threads: a sidecar leaves the machine's cores to the app
# Settings for the ledger's DuckDB that a sidecar wants whatever the config says. Appended rows
# stay in memory (a block per column) until a checkpoint writes them out: checkpointing at a
# small WAL keeps that little. DuckDB's allocator keeps freed memory unless told to flush it.
_DUCKDB_SETTINGS = {
    "checkpoint_threshold": "2MB",
    "allocator_flush_threshold": "2MB",
    "allocator_background_threads": True,
}


def journal_dir(db_path: str | Path) -> Path:
    return Path(f"{db_path}.journal")


class Sink(Protocol):
    """Something that receives every record off the request path, in batches, on the writer thread."""

    def consume(self, batch: list[tuple[CallRecord, CallExtras | None]]) -> None: ...


class LedgerWriter:
    def __init__(self, db_path: str | Path, journal: Journal | None = None,
                 flush_interval_s: float = FLUSH_INTERVAL_S, memory_limit: str = DEFAULT_MEMORY_LIMIT,
                 threads: int = DEFAULT_THREADS) -> None:
        self.path = Path(db_path)
        self.duckdb_config = {**_DUCKDB_SETTINGS, "memory_limit": memory_limit, "threads": threads}
        self.flush_interval_s = flush_interval_s
        self.journal = journal or Journal(journal_dir(self.path))
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.con: duckdb.DuckDBPyConnection | None = None
        self.thread: threading.Thread | None = None
        self.salt = b""  # salt for API-key fingerprints, kept in the ledger so they stay stable
        self.sinks: list[Sink] = []  # telemetry and the like; a failing sink never stops the ledger
        # visible state, for health and metrics
        self.submitted = 0  # counted on the event loop
        self.written = 0  # counted on the writer thread
        self.failures = 0
        self.last_lag_s = 0.0  # from a record's end to its commit, for the last batch

    def open(self) -> int:
        """Opens the ledger, replays what the journal holds, locks down file access. Returns calls replayed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.path), config=self.duckdb_config)
        schema.create(self.con)
        budget_store.create(self.con)
        self.salt = bytes.fromhex(schema.meta_value(self.con, "fingerprint_salt", lambda: os.urandom(16).hex()))
        recovered = self.journal.recover()
        self.journal.open()
        replayed = self._replay(recovered) if recovered else 0
        self.journal.discard_recovered()
        # from here on no statement on this database can touch files, attach or install anything
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        return replayed

    def _replay(self, records: list[CallRecord]) -> int:
        cur = self.con.cursor()
        cur.register("replay", schema.to_arrow(records))
        new = "FROM replay WHERE call_id NOT IN (SELECT call_id FROM calls)"
        cur.execute("BEGIN")
        (count,) = cur.execute(f"SELECT count(*) {new}").fetchone()
        cur.execute(f"INSERT INTO calls BY NAME SELECT * {new}")
        cur.execute("COMMIT")
        cur.unregister("replay")
        cur.close()
        interrupted = sum(1 for r in records if r.outcome == "interrupted")
        log.info("journal replay: %d calls in the journal (%d interrupted), %d new to the ledger",
                 len(records), interrupted, count)
        return count

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="meterline-ledger", daemon=True)
        self.thread.start()

    def submit(self, record: CallRecord, segment: int | None, extras: CallExtras | None = None) -> None:
        self.submitted += 1
        self.queue.put((record, segment, extras))

    @property
    def pending(self) -> int:
        """Records submitted and not yet committed."""
        return self.submitted - self.written

    def wait_written(self, target: int, timeout: float) -> bool:
        """Blocks (a worker thread, never the loop) until `target` records are committed."""
        deadline = time.monotonic() + timeout
        while self.written < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def cursor(self) -> duckdb.DuckDBPyConnection:
        assert self.con is not None
        return self.con.cursor()

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread is not None:
            self.queue.put(_STOP)
            self.thread.join(timeout)
            self.thread = None
        self.journal.close()
        if self.con is not None:
            self.con.close()
            self.con = None

    # --- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        cur = self.con.cursor()
        stopping = False
        retry: list[tuple[CallRecord, int | None, CallExtras | None]] = []  # a batch DuckDB refused
        while not stopping:
            new = []
            if not retry:
                item = self.queue.get()
                if item is _STOP:
                    break
                new.append(item)
                # Wait even when the writer has been idle: writing the moment a call ends would land
                # on the start of the app's next call (agents call one after another) and slow it.
                time.sleep(self.flush_interval_s)
            while len(retry) + len(new) < MAX_BATCH:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                new.append(item)
            self._fan_out(new)
            batch = retry + new
            retry = [] if self._write(cur, batch) else batch
            if retry and not stopping:
                time.sleep(min(5.0, 0.1 * 2 ** min(self.failures, 6)))
        if retry:
            self._write(cur, retry)
        cur.close()

    def _fan_out(self, batch: list[tuple[CallRecord, int | None, CallExtras | None]]) -> None:
        if not self.sinks:
            return
        items = [(record, extras) for record, _, extras in batch]
        for sink in self.sinks:
            try:
                sink.consume(items)
            except Exception:  # noqa: BLE001 - telemetry faults never touch the ledger
                log.exception("sink %s failed on a batch of %d", type(sink).__name__, len(items))

    def _write(self, cur: duckdb.DuckDBPyConnection, batch: list[tuple[CallRecord, int | None, CallExtras | None]]) -> bool:
        records = [r for r, _, _ in batch]
        try:
            cur.register("batch", schema.to_arrow(records))
            cur.execute("BEGIN")
            cur.execute("INSERT INTO calls BY NAME SELECT * FROM batch")
            cur.execute("COMMIT")
        except Exception:  # noqa: BLE001 - keep the batch (it is in the journal too) and retry
            self.failures += 1
            log.exception("ledger write of %d records failed; will retry", len(batch))
            try:
                cur.execute("ROLLBACK")
            except Exception:  # noqa: BLE001
                pass
            return False
        finally:
            try:
                cur.unregister("batch")
            except Exception:  # noqa: BLE001
                pass
        self.journal.committed([s for _, s, _ in batch if s is not None])
        self.written += len(batch)
        newest = max((r.ended_at or r.started_at) for r in records)
        self.last_lag_s = max(0.0, time.time() - newest.timestamp())
        return True
