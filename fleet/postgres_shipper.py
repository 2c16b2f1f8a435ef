"""Ships the local DuckDB ledger's rows to the fleet's Postgres in batches, from a cursor kept in DuckDB.

Runs on a thread of its own in the sinks process (reading DuckDB blocks, so it stays off the event
loop and off the ledger writer's thread). Each pass, for each table of postgres_schema.SHIPPED:

1. read up to `batch_rows` rows past the table's cursor, every value as text, so money and times
   cross exactly. The cursor is the DuckDB rowid for the tables the ledger only ever appends to
   (from one writer thread, so rowids grow in commit order); for `jobs`, whose rows change, it is
   `change_seq`, which every change of a row sets to the table's next, in commit order (jobs/store.py);
2. COPY them into a temporary staging table, then `INSERT ... SELECT ... ON CONFLICT DO NOTHING`
   into the table (idempotent by its key), or for `jobs` `ON CONFLICT DO UPDATE ... WHERE` the
   shipped row's change_seq is newer than the one there, and commit;
3. only then move the cursor (the `fleet_cursor` table in DuckDB, one row per table).

A crash between 2 and 3 ships the batch again, and the key drops the copies (a job's row sent again
is no newer, so changes nothing): nothing is lost or doubled whether Postgres is down for minutes, or
this process is killed. While Postgres fails, the
rows simply wait in DuckDB (the backlog), the error is kept (without the password) for healthz,
and the next try is `retry_s` later.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from jobs import reconcile_store

from . import postgres_schema as pgs
from .urls import redact, scrub

log = logging.getLogger("meterline.fleet")

STATEMENT_TIMEOUT_MS = 120_000  # one batch's COPY and INSERT, or a migration step waiting for its lock
# shipped_rowid: the last value of the table's cursor column sent (a rowid, or for jobs a change_seq)
CREATE_CURSOR = ("CREATE TABLE IF NOT EXISTS fleet_cursor (tbl VARCHAR, target VARCHAR, shipped_rowid BIGINT, "
                 "shipped_at TIMESTAMPTZ, PRIMARY KEY (tbl, target))")


@dataclass(slots=True)
class ShipperSettings:
    url: str
    ship_interval_s: float = 1.0
    retry_s: float = 5.0
    batch_rows: int = 5000
    connect_timeout_s: float = 5.0


def _expr(name: str, duckdb_type: str) -> str:
    """A DuckDB expression giving the column as text Postgres reads back as the same value."""
    col = f'"{name}"'
    t = duckdb_type.upper()
    if t == "TIMESTAMPTZ":
        return f"strftime({col} AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M:%S.%f') || '+00'"
    if t.startswith("MAP"):
        return f"CAST(to_json({col}) AS VARCHAR)"
    return f"CAST({col} AS VARCHAR)"


def target_of(url: str) -> str:
    """Which fleet ledger a cursor belongs to: the URL without its secrets (a new database starts over)."""
    return redact(url) or ""


def _insert(table: pgs.ShippedTable) -> str:
    """From the staging table into the table: new keys only, or for a table whose rows change, the
    rows newer (by its change column) than what the fleet ledger holds."""
    cols = ", ".join(f'"{n}"' for n, _ in table.columns)
    key = ", ".join(f'"{k}"' for k in table.key)
    head = f'INSERT INTO "{table.name}" ({cols}) SELECT {cols} FROM "ship_{table.name}" ON CONFLICT ({key}) '
    if not table.upsert:
        return head + "DO NOTHING"
    sets = ", ".join(f'"{n}" = EXCLUDED."{n}"' for n, _ in table.columns if n not in table.key)
    c = f'"{table.cursor}"'
    return head + f'DO UPDATE SET {sets} WHERE "{table.name}".{c} IS NULL OR "{table.name}".{c} < EXCLUDED.{c}'


class Shipper:
    def __init__(self, settings: ShipperSettings, duck_cursor: Any) -> None:
        """`duck_cursor()` gives a new cursor on the ledger's DuckDB connection (LedgerWriter.cursor)."""
        self.settings = settings
        self.duck_cursor = duck_cursor
        self.target = target_of(settings.url)
        self.pg: Any = None  # the psycopg connection, while it works
        self._partitions: set[Any] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # visible state (healthz, metrics); written by the shipping thread
        self.up: bool | None = None  # None until the first try: not yet known
        self.shipped = 0  # rows sent and committed (copies dropped by the key included)
        self.failures = 0
        self.last_error: str | None = None
        self.last_shipped_at: float | None = None
        self.backlog_rows = 0
        self.lag_s = 0.0  # age of the oldest row not yet shipped

    # --- life ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Creates the cursor table in DuckDB (on the ledger's own thread, before the writer starts)."""
        cur = self.duck_cursor()
        try:
            cur.execute(CREATE_CURSOR)
            reconcile_store.create(cur)  # made at a run's first store otherwise; shipped from the start
        finally:
            cur.close()
        self._measure()

    def start(self) -> None:
        log.info("fleet ledger: shipping to %s", self.target)
        self._thread = threading.Thread(target=self._run, name="meterline-fleet-pg", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, final: bool = True) -> None:
        """Ends the thread; with `final`, first ships what the ledger committed last (once the writer
        has), unless the fleet ledger is known to be down: a pod scaled away may never come back to
        ship it, and a dead Postgres must not hold up shutdown."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if final and self.up:
            try:
                self.ship_pending(final=True)
            except Exception as e:  # noqa: BLE001 - shipped at the next start instead
                self._failed(e)
        self._close()

    def health(self) -> dict[str, Any]:
        return {"up": self.up, "target": self.target, "backlog_rows": self.backlog_rows,
                "lag_s": round(self.lag_s, 3), "shipped": self.shipped, "failures": self.failures,
                "last_error": self.last_error}

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                self.ship_pending()
                wait = self.settings.ship_interval_s
            except Exception as e:  # noqa: BLE001 - Postgres down or refusing: the rows wait in DuckDB
                self._failed(e)
                wait = self.settings.retry_s
            try:
                self._measure()
            except Exception:  # noqa: BLE001 - the ledger is closing
                pass

    def ship_pending(self, final: bool = False) -> int:
        """Ships every row past the cursors, batch by batch. Returns rows shipped; raises on failure."""
        total = 0
        for table in pgs.SHIPPED:
            while final or not self._stop.is_set():
                rows, last_rowid = self._read(table)
                if not rows:
                    break
                con = self._connection()
                self._ship(con, table, rows)
                self._advance(table, last_rowid)
                total += len(rows)
                self.shipped += len(rows)
                self.last_shipped_at = time.time()
                if len(rows) < self.settings.batch_rows:
                    break
        if total == 0 and self.pg is None:
            self._connection()  # nothing to send: still say whether the fleet ledger answers
        self.up = True
        self.last_error = None
        return total

    def _failed(self, e: BaseException) -> None:
        self.failures += 1
        was_up = self.up
        self.up = False
        text = scrub(f"{type(e).__name__}: {str(e).strip() or 'failed'}".splitlines()[0], self.settings.url)
        if was_up or self.last_error != text:
            log.warning("fleet ledger %s: shipping failed (%s); rows wait in the local ledger, retry in %g s",
                        self.target, text, self.settings.retry_s)
        self.last_error = text
        self._close()

    def _close(self) -> None:
        if self.pg is not None:
            try:
                self.pg.close()
            except Exception:  # noqa: BLE001
                pass
            self.pg = None
        self._partitions = set()

    def _connection(self) -> Any:
        if self.pg is None:
            import psycopg  # only the sinks process of a fleet loads it

            con = psycopg.connect(self.settings.url, connect_timeout=max(1, round(self.settings.connect_timeout_s)),
                                  # a Postgres that hangs rather than fails must not hold the thread forever
                                  options=f"-c TimeZone=UTC -c statement_timeout={STATEMENT_TIMEOUT_MS}",
                                  application_name="meterline")
            try:
                found = pgs.migrate(con)
                if found < pgs.VERSION:
                    log.info("fleet ledger %s: schema version %d -> %d", self.target, found, pgs.VERSION)
                for table in pgs.SHIPPED:
                    con.execute(f'CREATE TEMP TABLE IF NOT EXISTS "ship_{table.name}" '
                                f'(LIKE "{table.name}") ON COMMIT DELETE ROWS')
                con.commit()
            except BaseException:
                con.close()
                raise
            self.pg = con
            if self.last_error is not None:
                log.info("fleet ledger %s: connected again", self.target)
        return self.pg

    # --- one batch -----------------------------------------------------------------------------

    def _cursor_of(self, cur: Any, table: pgs.ShippedTable) -> int:
        row = cur.execute("SELECT shipped_rowid FROM fleet_cursor WHERE tbl = ? AND target = ?",
                          [table.name, self.target]).fetchone()
        return -1 if row is None else row[0]

    def _read(self, table: pgs.ShippedTable) -> tuple[list[tuple[Any, ...]], int]:
        cur = self.duck_cursor()
        try:
            after = self._cursor_of(cur, table)
            exprs = ", ".join(_expr(n, t) for n, t in table.columns)
            c = table.cursor
            rows = cur.execute(f'SELECT {c}, {exprs} FROM "{table.name}" WHERE {c} > ? ORDER BY {c} LIMIT ?',
                               [after, self.settings.batch_rows]).fetchall()
        finally:
            cur.close()
        if not rows:
            return [], after
        return [r[1:] for r in rows], rows[-1][0]

    def _ship(self, con: Any, table: pgs.ShippedTable, rows: list[tuple[Any, ...]]) -> None:
        names = [n for n, _ in table.columns]
        cols = ", ".join(f'"{n}"' for n in names)
        months: set[tuple[int, int]] = set()
        if table.partition_by is not None:
            part = names.index(table.partition_by)
            months = {(int(r[part][:4]), int(r[part][5:7])) for r in rows if r[part]}
        try:
            with con.transaction():
                if months:
                    pgs.ensure_partitions(con, table, months, self._partitions)
                with con.cursor() as cur:
                    with cur.copy(f'COPY "ship_{table.name}" ({cols}) FROM STDIN') as copy:
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(_insert(table))
        except BaseException:
            self._partitions = set()  # what this transaction created is gone with it
            raise

    def _advance(self, table: pgs.ShippedTable, rowid: int) -> None:
        cur = self.duck_cursor()
        try:
            cur.execute("INSERT OR REPLACE INTO fleet_cursor VALUES (?, ?, ?, current_timestamp)",
                        [table.name, self.target, rowid])
        finally:
            cur.close()

    def _measure(self) -> None:
        """The backlog: rows past the cursors, and how long the oldest of them has waited."""
        cur = self.duck_cursor()
        backlog, oldest = 0, None
        try:
            for table in pgs.SHIPPED:
                after = self._cursor_of(cur, table)
                at = f'epoch(min("{table.at}"))' if table.at else "NULL"
                count, first = cur.execute(
                    f'SELECT count(*), {at} FROM "{table.name}" WHERE {table.cursor} > ?', [after]).fetchone()
                backlog += count
                if first is not None:
                    oldest = first if oldest is None else min(oldest, first)
        finally:
            cur.close()
        self.backlog_rows = backlog
        self.lag_s = max(0.0, time.time() - oldest) if oldest is not None else 0.0
