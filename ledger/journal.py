"""The crash journal: every call is appended to a local file before its response ends, and replayed after a crash.

A call writes two lines: when it starts, a provisional record with outcome `interrupted`; when
it ends, the final record. The last line of a call wins, so after a kill a call that never ended
is recorded as interrupted, and one that ended is recorded exactly as it ended. Lines go to
numbered segment files; a segment is deleted once every call it mentions has ended and its
final record is committed to DuckDB. Replay is idempotent: the ledger keeps one row per call_id.

Appends are plain `write(2)`s on the event loop (a few microseconds, no fsync): they survive the
process being killed, not the machine losing power. A final record is written at once, before the
response's last bytes go out; provisional lines wait for the end of the event loop's current
turn (`defer`), so the calls that start together share one write.

An append never fails a call. Lines the disk refuses (full, I/O error) stay in memory, up to
MAX_UNWRITTEN_BYTES, and are written on a later append once one line goes through again; after a
partial write the next write starts with a newline, so the torn fragment stays a line of its own
(which replay quarantines) and is never glued onto a whole one. Failures are counted for healthz
and logged at most once per LOG_INTERVAL_S. A line replay cannot read or turn into a record is
kept in `rejected_lines` (the writer stores them in the ledger's `rejected` table).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import operator
import os
import threading
import time
from datetime import datetime
from decimal import Decimal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import validate
from .records import CallRecord

log = logging.getLogger("meterline.journal")

_DATETIMES = ("started_at", "ended_at")
_MONEY = ("input_cost_usd", "output_cost_usd", "cost_usd")
_FIELDS = tuple(f.name for f in dataclasses.fields(CallRecord))
_ROW = operator.attrgetter(*_FIELDS)
# A segment's first line names the fields; every other line is one record as a JSON array in that
# order: a third of the cost of encoding the dataclass by name, on the event loop, twice a call.
_HEADER = orjson.dumps({"meterline_journal": 2, "fields": _FIELDS}, option=orjson.OPT_APPEND_NEWLINE)
MAX_UNWRITTEN_BYTES = 64 * 1024 * 1024  # lines kept in memory while the disk refuses them
LOG_INTERVAL_S = 60.0  # a full disk logs once per interval, not once per call


def encode(record: CallRecord) -> bytes:
    return orjson.dumps(_ROW(record), default=_default, option=orjson.OPT_APPEND_NEWLINE)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


def decode(line: bytes, fields: tuple[str, ...] = _FIELDS) -> CallRecord | tuple[str, ...]:
    """A record, or (for a segment's header line) the field names its records use. Lines written
    before the header existed are objects keyed by field name, and still read. Every value is
    checked (`validate.full`): a bad one becomes NULL and an anomaly; a line that cannot be a
    record at all raises ValueError."""
    doc = orjson.loads(line)
    if isinstance(doc, list):
        doc = dict(zip(fields, doc))
    elif not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not a record")
    elif "meterline_journal" in doc:
        names = doc.get("fields")
        if not isinstance(names, list) or not all(type(n) is str for n in names):
            raise ValueError("a header line without its field names")
        return tuple(names)
    for name in _DATETIMES:
        value = doc.get(name)
        if value and type(value) is str:
            try:
                doc[name] = datetime.fromisoformat(value)
            except ValueError:
                pass  # left as text: validate.full refuses it or makes it NULL
    for name in _MONEY:
        value = doc.get(name)
        if type(value) is str:
            try:
                doc[name] = Decimal(value)
            except ArithmeticError:
                pass
    return validate.full(CallRecord(**{name: doc.get(name) for name in _FIELDS}))


class Journal:
    """Segmented append-only journal. `begin`/`end` run on the event loop; `committed` on the writer."""

    def __init__(self, directory: str | os.PathLike[str], segment_bytes: int = 4 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.lock = threading.Lock()
        self.outstanding: dict[int, int] = {}  # segment -> begun-but-not-ended calls + uncommitted records
        self.first_live = 1  # segments below it were recovered at start-up (see `open`)
        self.segment = 0
        self.fd = -1
        self.size = 0
        self.buffer: list[bytes] = []  # provisional lines not yet written
        # schedules a function for the end of the event loop's turn (loop.call_soon); None: write at once
        self.defer: Callable[[Callable[[], None]], object] | None = None
        self.closed = False
        self.unwritten: list[bytes] = []  # lines the disk refused, oldest first; retried on the next flush
        self.unwritten_bytes = 0
        self.torn = False  # the file ends inside a line: the next write starts with a newline
        self.append_failures = 0  # writes the disk refused (counted for healthz)
        self.lost = 0  # lines dropped because more than MAX_UNWRITTEN_BYTES were waiting
        self.rejected_lines: list[tuple[bytes, str]] = []  # (line, reason) that replay could not use
        self._logged_at = -LOG_INTERVAL_S

    # --- start-up ------------------------------------------------------------------------------

    def recover(self) -> list[CallRecord]:
        """Every call the journal still holds (last line per call wins), oldest segment first."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        latest: dict[str, CallRecord] = {}
        for path in self._segments():
            fields = _FIELDS
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break  # a torn last write: that line never completed
                    try:
                        record = decode(line, fields)
                    except (ValueError, TypeError, KeyError, ArithmeticError) as e:
                        # a torn fragment (full disk) or a line edited by hand: kept aside, not replayed
                        log.warning("journal %s line %d is unusable (%s); quarantined", path.name, n, e)
                        self.rejected_lines.append((line.rstrip(b"\n"), f"{path.name} line {n}: {e}"))
                        continue
                    if isinstance(record, tuple):
                        fields = record
                    else:
                        latest[record.call_id] = record
        return list(latest.values())

    def open(self) -> None:
        """Starts a new segment after the ones recovered (which `discard_recovered` removes)."""
        existing = self._segments()
        self.first_live = int(existing[-1].stem) + 1 if existing else 1
        self._rotate(self.first_live)

    def discard_recovered(self) -> None:
        """Called once the recovered calls are safely in the ledger."""
        for path in self._segments():
            if int(path.stem) < self.first_live:
                path.unlink(missing_ok=True)

    def _segments(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.jsonl") if p.stem.isdigit())

    # --- the request path ----------------------------------------------------------------------

    def begin(self, provisional: CallRecord) -> int:
        """Queues the provisional (interrupted) record; returns the segment to pass to `end`."""
        line = encode(provisional)
        with self.lock:
            if self.size >= self.segment_bytes:
                self._rotate(self.segment + 1)
            self.buffer.append(line)
            self.size += len(line)
            self.outstanding[self.segment] += 1
            if self.defer is None:
                self._flush()
            elif len(self.buffer) == 1:
                self.defer(self.flush)
            return self.segment

    def end(self, record: CallRecord, begun_in: int | None, lazily: bool = False) -> int:
        """Writes the final record (and any queued provisional ones) now, or with `lazily` at the
        end of the loop's turn, when the caller holds back the response's last bytes until `flush`.
        Returns the segment to pass to `committed`."""
        line = encode(record)
        with self.lock:
            if self.size >= self.segment_bytes:
                self._rotate(self.segment + 1)
            self.buffer.append(line)
            self.size += len(line)
            if not lazily or self.defer is None or (begun_in is not None and begun_in != self.segment):
                # (the provisional line's segment may be deleted below: the final line must be on disk first)
                self._flush()
            elif len(self.buffer) == 1:
                self.defer(self.flush)
            segment = self.segment
            self.outstanding[segment] += 1
            if begun_in is not None:
                self._release(begun_in)
            return segment

    def flush(self) -> None:
        with self.lock:
            self._flush()

    # --- the writer ----------------------------------------------------------------------------

    def committed(self, segments: list[int]) -> None:
        """The final records written to these segments are now in DuckDB."""
        with self.lock:
            for segment in segments:
                self._release(segment)

    def close(self) -> None:
        """At a clean shutdown: segments whose calls are all committed are not needed again."""
        with self.lock:
            if self.fd >= 0:
                self._flush()
                os.close(self.fd)
                self.fd = -1
            self.closed = True
            for segment, left in list(self.outstanding.items()):
                if left == 0:
                    self._delete(segment)

    # --- internals (lock held) -----------------------------------------------------------------

    def _flush(self) -> None:
        if self.unwritten:
            # the disk refused lines before: while it still does, a flush costs one small write
            # (the oldest line), not a write of everything waiting
            self._keep(self.buffer)
            self.buffer.clear()
            if (self.fd < 0 and not self._reopen()) or self._write(self.unwritten[:1]) == 0:
                return
            lines = self.unwritten[1:]
            self.unwritten, self.unwritten_bytes = [], 0
            log.warning("journal appends work again; %d waiting lines written", len(lines) + 1)
        elif self.buffer and self.fd >= 0:
            lines, self.buffer = self.buffer, []
        else:
            return
        if lines:
            done = self._write(lines)
            if done < len(lines):
                self._keep(lines[done:])

    def _write(self, lines: list[bytes]) -> int:
        """Writes whole lines; returns how many went out complete (the rest are the caller's)."""
        data = lines[0] if len(lines) == 1 else b"".join(lines)
        if self.torn:
            data = b"\n" + data
        sent = 0
        try:
            while sent < len(data):  # a regular file takes it all at once unless the disk fills up
                n = os.write(self.fd, memoryview(data)[sent:] if sent else data)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                sent += n
        except OSError as e:
            self._failed(e)
        else:
            self.torn = False
            return len(lines)
        if self.torn:
            if sent == 0:
                return 0
            sent -= 1
        done = 0
        for line in lines:
            if sent < len(line):
                break
            sent -= len(line)
            done += 1
        self.torn = sent > 0  # part of a line is in the file: the next write begins a new line
        return done

    def _keep(self, lines: list[bytes]) -> None:
        self.unwritten.extend(lines)
        self.unwritten_bytes += sum(map(len, lines))
        while self.unwritten_bytes > MAX_UNWRITTEN_BYTES and len(self.unwritten) > 1:
            self.unwritten_bytes -= len(self.unwritten.pop(0))
            self.lost += 1

    def _failed(self, error: OSError) -> None:
        self.append_failures += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL_S:
            self._logged_at = now
            log.error("journal append failed (%s): %d lines kept in memory to retry, %d lost so far "
                      "(%d failed writes; logged at most every %.0f s)", error.strerror or error,
                      len(self.unwritten) + len(self.buffer), self.lost, self.append_failures, LOG_INTERVAL_S)

    def _path(self, segment: int) -> Path:
        return self.dir / f"{segment:012d}.jsonl"

    def _reopen(self) -> bool:
        if self.closed:
            return False
        try:
            self.fd = os.open(self._path(self.segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as e:
            self._failed(e)
            return False
        return True

    def _rotate(self, segment: int) -> None:
        if self.fd >= 0:
            self._flush()  # queued lines belong to the segment they were counted in
            os.close(self.fd)
            self.fd = -1
        previous = self.segment
        self.segment, self.size = segment, len(_HEADER)
        self.outstanding[segment] = 0
        self.torn = False  # a new file starts on a new line
        # lines the disk refused go to the new segment, after its header
        lines = [_HEADER, *self.unwritten]
        self.unwritten, self.unwritten_bytes = [], 0
        if self._reopen():
            done = self._write(lines)
            lines = lines[done:]
        self._keep(lines)
        if previous in self.outstanding and self.outstanding[previous] == 0:
            self._delete(previous)

    def _release(self, segment: int) -> None:
        left = self.outstanding[segment] - 1
        self.outstanding[segment] = left
        # while lines wait in memory, a final record may be among them: keep the segment holding
        # its provisional line (close() or the next rotation deletes it)
        if left == 0 and segment != self.segment and not self.unwritten:
            self._delete(segment)

    def _delete(self, segment: int) -> None:
        del self.outstanding[segment]
        try:
            os.unlink(self._path(segment))
        except OSError:
            log.warning("could not delete journal segment %d", segment, exc_info=True)
