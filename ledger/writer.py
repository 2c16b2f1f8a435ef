"""The ledger's owner: opens the DuckDB file, replays the journal, and writes records in batches on its own thread.

The event loop only ever calls `submit` (a non-blocking queue put). One thread owns the write
connection; queries get their own cursors from `cursor()` and run on other threads.

A batch DuckDB or Arrow refuses for its data is split in halves until the record at fault is
found; that record goes to the `rejected` table (its JSON and the reason) and the others are
written. Other failures (a full disk) keep the batch and retry it. Replay does the same, and the
journal lines replay could not read land in `rejected` too: one bad record never stops the ledger.

The ledger, its WAL, journal and salt file are private to the sidecar's user (mode 0600). The salt
of API-key fingerprints lives in `<ledger>.salt`, outside what SQL can read.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import duckdb

from . import attempt_rows, budget_store, schema
from .defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_THREADS, journal_dir, read_salt, salt_path  # noqa: F401
from .journal import Journal
from .records import CallExtras, CallRecord

log = logging.getLogger("meterline.ledger")

_STOP = object()
MAX_BATCH = 5000
# Each DuckDB commit costs CPU and a WAL sync whatever its size: gather records for this long
# after the first before writing (the journal already holds them), so busy traffic makes a few
# large commits and a lone call's row is written a quarter second after it ends.
FLUSH_INTERVAL_S = 0.25


# Settings for the ledger's DuckDB that a sidecar wants whatever the config says. Appended rows
# stay in memory (a block per column) until a checkpoint writes them out: checkpointing at a
# small WAL keeps that little. DuckDB's allocator keeps freed memory unless told to flush it.
_DUCKDB_SETTINGS = {
    "checkpoint_threshold": "2MB",
    "allocator_flush_threshold": "2MB",
    "allocator_background_threads": True,
}


# what DuckDB raises for values it will not store (rather than for a disk or lock problem)
_DATA_ERRORS = (duckdb.DataError, duckdb.IntegrityError, duckdb.InvalidInputException)


class _Refused(Exception):
    """A batch refused for its data (conversion or DuckDB): split it to find the record at fault."""


Item = tuple[CallRecord, "int | None", "CallExtras | None"]


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
        # the single-process layout of earlier versions: segments directly in `<ledger>.journal/`,
        # replayed once at `open`; the forwarders' own directories are read by sinks/tail.py
        self.journal = journal or Journal(journal_dir(self.path))
        # called on the writer thread with the tokens (`submit`'s second argument) of the records
        # just committed or quarantined: the journal tail frees their segments
        self.on_committed: Callable[[list[Any]], None] | None = None
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.con: duckdb.DuckDBPyConnection | None = None
        self.thread: threading.Thread | None = None
        self.instance: str | None = None  # fleet.instance: fills the `instance` of records without one
        self.salt = b""  # salt for API-key fingerprints, kept beside the ledger so they stay stable
        self.sinks: list[Sink] = []  # telemetry and the like; a failing sink never stops the ledger
        # visible state, for health and metrics
        self.submitted = 0  # counted on the event loop
        self.written = 0  # counted on the writer thread
        self.failures = 0  # write attempts that failed (each retried)
        self.failing = False  # the last write attempt failed: records wait in the journal
        self.rejected = 0  # records quarantined in `rejected` instead of written
        self.rejected_at_start = 0  # journal records and lines quarantined by replay
        self.last_lag_s = 0.0  # from a record's end to its commit, for the last batch

    def open(self) -> int:
        """Opens the ledger, replays what the journal holds, locks down file access. Returns calls replayed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # what the sidecar creates from here on (the ledger, the WAL DuckDB recreates after every
        # checkpoint, journal segments) is its user's alone: the process umask is the one place
        # that reaches files DuckDB creates. Files of an older version are closed down below.
        os.umask(os.umask(0o077) | 0o077)
        self.con = duckdb.connect(str(self.path), config=self.duckdb_config)
        schema.create(self.con)
        budget_store.create(self.con)
        self.salt = self._salt()
        recovered = self.journal.recover()
        replayed = self._replay(recovered) if recovered else 0
        self.quarantine_lines(self.journal.rejected_lines)
        self.journal.rejected_lines = []
        self.journal.discard_recovered()
        for path in (self.path, Path(f"{self.path}.wal"), salt_path(self.path), *self.journal.dir.glob("*.jsonl")):
            try:
                os.chmod(path, 0o600)
            except FileNotFoundError:
                pass
        # from here on no statement on this database can touch files, attach or install anything
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        return replayed

    def _salt(self) -> bytes:
        """The fingerprint salt, from `<ledger>.salt` (0600); a ledger of an older version kept it in
        its `meta` table, which SQL can read: it moves to the file, then leaves the table."""
        path = salt_path(self.path)
        row = self.con.execute("SELECT value FROM meta WHERE key = 'fingerprint_salt'").fetchone()
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            salt = bytes.fromhex(row[0]) if row else os.urandom(16)
            temporary = path.with_name(path.name + ".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, salt.hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)  # the file is complete before the old copy goes
        else:
            try:
                salt = bytes.fromhex(text)
            except ValueError:
                raise ValueError(f"{path} is not a fingerprint salt (hex); restore it or delete it "
                                 "(key fingerprints then change)") from None
        if row:
            self.con.execute("DELETE FROM meta WHERE key = 'fingerprint_salt'")
        return salt

    def _replay(self, records: list[CallRecord]) -> int:
        cur = self.con.cursor()
        count, left = self._isolate(cur, [(r, None, None) for r in records], "journal", new_only=True)
        cur.close()
        if left:  # not the records' fault (e.g. a full disk): start-up fails and the journal stays
            raise RuntimeError(f"journal replay could not write {len(left)} records; see the log above")
        interrupted = sum(1 for r in records if r.outcome == "interrupted")
        log.info("journal replay: %d calls in the journal (%d interrupted), %d new to the ledger",
                 len(records), interrupted, count)
        return count

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="meterline-ledger", daemon=True)
        self.thread.start()

    def submit(self, record: CallRecord, token: Any, extras: CallExtras | None = None) -> None:
        """Queues a record (any thread); `token` comes back through `on_committed` once it is written."""
        self.submitted += 1
        self.queue.put((record, token, extras))

    def catch_up(self, items: list[Item]) -> int:
        """Writes the records of `items` the ledger does not have yet (read again from the journals
        after a restart), hands those to the sinks, and settles every token. Before `start`.
        Returns how many were new."""
        cur = self.con.cursor()
        try:
            ids = [r.call_id for r, _, _ in items]
            have = {row[0] for row in cur.execute(
                "SELECT call_id FROM calls WHERE call_id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()}
            fresh = [item for item in items if item[0].call_id not in have]
            count, left = self._isolate(cur, fresh, "journal", new_only=False)
        finally:
            cur.close()
        if left:  # not the records' fault (e.g. a full disk): start-up fails and the journals stay
            raise RuntimeError(f"journal replay could not write {len(left)} records; see the log above")
        self._fan_out(fresh)
        if self.on_committed is not None:
            self.on_committed([t for _, t, _ in items if t is not None])
        return count

    @property
    def pending(self) -> int:
        """Records submitted and not yet committed."""
        return self.submitted - self.written - self.rejected

    def wait_written(self, target: int, timeout: float) -> bool:
        """Blocks (a worker thread, never the loop) until `target` records are committed (or quarantined)."""
        deadline = time.monotonic() + timeout
        while self.written + self.rejected < target:
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
            retry = self._write(cur, retry + new)
            self._fan_out(new)  # after the commit: a row is readable before its span and metrics are made
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

    def _write(self, cur: duckdb.DuckDBPyConnection, batch: list[Item]) -> list[Item]:
        """Writes the batch; returns what is left to retry (empty unless the failure was not the data's)."""
        _, left = self._isolate(cur, batch, "writer", new_only=False)
        if left:
            self.failures += 1
            self.failing = True
        else:
            self.failing = False
        return left

    def _isolate(self, cur: duckdb.DuckDBPyConnection, items: list[Item], source: str,
                 new_only: bool) -> tuple[int, list[Item]]:
        """Inserts `items`; a part refused for its data is halved until the record at fault is
        found and quarantined. Returns (rows inserted, items left after a failure of another kind)."""
        if not items:
            return 0, []
        try:
            count = self._insert(cur, [r for r, _, _ in items], new_only, [e for _, _, e in items])
        except _Refused as e:
            if len(items) > 1:
                mid = len(items) // 2
                first, left = self._isolate(cur, items[:mid], source, new_only)
                if left:
                    return first, left + items[mid:]
                second, left = self._isolate(cur, items[mid:], source, new_only)
                return first + second, left
            try:
                self._quarantine(cur, source, _record_json(items[0][0]), str(e.__cause__ or e))
            except Exception:  # noqa: BLE001 - the database itself fails: retry later
                log.exception("could not quarantine a refused record")
                return 0, items
            if source == "writer":
                self.rejected += 1
                self._settled(items, written=False)
            else:
                self.rejected_at_start += 1
            return 0, []
        except Exception:  # noqa: BLE001 - keep the records (they are in the journal too) and retry
            log.exception("ledger write of %d records failed; will retry", len(items))
            return 0, items
        if source == "writer":
            self._settled(items, written=True)
        return count, []

    def _insert(self, cur: duckdb.DuckDBPyConnection, records: list[CallRecord], new_only: bool,
                extras: list[CallExtras | None] | None = None) -> int:
        if self.instance is not None:  # records of an older forwarder's journal name no instance
            for record in records:
                if record.instance is None:
                    record.instance = self.instance
        try:
            table = schema.to_arrow(records)
            # a routed call's tries go to `attempts` in the same transaction as its row
            tries = [a for r, e in zip(records, extras or ()) if e is not None and e.attempts
                     for a in attempt_rows.read(e.attempts, r.call_id, r.instance)]
            tries_table = attempt_rows.to_arrow(tries) if tries else None
        except Exception as e:  # noqa: BLE001 - a value Arrow cannot hold: the data's fault
            raise _Refused(f"{type(e).__name__}: {e}") from e
        cur.register("batch", table)
        if tries_table is not None:
            cur.register("attempt_batch", tries_table)
        try:
            cur.execute("BEGIN")
            try:
                if new_only:
                    new = "FROM batch WHERE call_id NOT IN (SELECT call_id FROM calls)"
                    (count,) = cur.execute(f"SELECT count(*) {new}").fetchone()
                    cur.execute(f"INSERT INTO calls BY NAME SELECT * {new}")
                else:
                    count = len(records)
                    cur.execute("INSERT INTO calls BY NAME SELECT * FROM batch")
                if tries_table is not None:
                    cur.execute("INSERT INTO attempts BY NAME SELECT * FROM attempt_batch"
                                + (" WHERE call_id NOT IN (SELECT call_id FROM attempts)" if new_only else ""))
                cur.execute("COMMIT")
            except BaseException as e:
                try:
                    cur.execute("ROLLBACK")
                except Exception:  # noqa: BLE001
                    pass
                if isinstance(e, _DATA_ERRORS):
                    raise _Refused(f"{type(e).__name__}: {e}") from e
                raise
        finally:
            for name in ("batch", "attempt_batch"):
                try:
                    cur.unregister(name)
                except Exception:  # noqa: BLE001
                    pass
        return count

    def _settled(self, items: list[Item], written: bool) -> None:
        """Written or quarantined: the journal need not keep them."""
        if self.on_committed is not None:
            self.on_committed([t for _, t, _ in items if t is not None])
        if written:
            self.written += len(items)
            newest = max((r.ended_at or r.started_at) for r, _, _ in items)
            try:
                self.last_lag_s = max(0.0, time.time() - newest.timestamp())
            except (AttributeError, TypeError, ValueError, OverflowError):
                pass

    def _quarantine(self, cur: duckdb.DuckDBPyConnection, source: str, data: str, reason: str) -> None:
        log.error("ledger: a %s record was refused (%s); kept in the `rejected` table", source, reason)
        cur.execute("INSERT INTO rejected VALUES (current_timestamp, ?, ?, ?)", [source, reason, data])

    def quarantine_lines(self, lines: list[tuple[bytes, str]]) -> None:
        """Journal lines that are not records, kept in `rejected` (any thread)."""
        if lines:
            self.rejected_at_start += len(lines)
            cur = self.con.cursor()
            try:
                cur.executemany("INSERT INTO rejected VALUES (current_timestamp, 'journal', ?, ?)",
                                [[reason, line.decode("utf-8", "replace")] for line, reason in lines])
            finally:
                cur.close()


def _record_json(record: CallRecord) -> str:
    """Any record as JSON (stdlib json: it takes integers of any size, and escapes lone surrogates)."""
    try:
        return json.dumps(dataclasses.asdict(record), default=str)
    except Exception:  # noqa: BLE001 - e.g. an unhashable or recursive value: its repr will do
        return json.dumps({"repr": repr(record)})
