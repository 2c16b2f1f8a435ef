"""The journal: the forwarder appends every call to local files; the sinks process reads them into the ledger.

A call writes two lines: when it starts, a provisional record with outcome `interrupted`; when
it ends, the final record (with what telemetry and alerts need beyond the row: CallExtras). The
last line of a call wins, so a call whose forwarder died before it ended is recorded as
interrupted, and one that ended is recorded exactly as it ended. Lines go to numbered segment
files in the forwarder's own directory (`<ledger>.journal/w<k>/`); the sinks process tails them
(sinks/tail.py) and deletes a segment once every call in it is in the ledger. The forwarder never
deletes: it only appends, and holds `lock` in its directory while it lives, so the sinks process
can tell a live forwarder's calls in flight from a dead one's.

Appends are plain `write(2)`s on the event loop (a few microseconds, no fsync): they survive the
process being killed, not the machine losing power. A final record is written at once, before the
response's last bytes go out; provisional lines wait for the end of the event loop's current
turn (`defer`), so the calls that start together share one write.

An append never fails a call. Lines the disk refuses (full, I/O error) stay in memory, up to
MAX_UNWRITTEN_BYTES, and are written on a later append once one line goes through again; after a
partial write the next write starts with a newline, so the torn fragment stays a line of its own
(which the reader quarantines) and is never glued onto a whole one. Failures are counted for
healthz and logged at most once per LOG_INTERVAL_S.

Line format: a segment's first line is a header naming the fields and the writing process's
incarnation; a provisional line is the record's fields as a JSON array; a final line has one more
element, its CallExtras as an object (or null). `recover` reads a directory whole: the single-
process layout of earlier versions (segments directly in `<ledger>.journal/`) is replayed with it.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
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
from .records import CallExtras, CallRecord

log = logging.getLogger("meterline.journal")

_DATETIMES = ("started_at", "ended_at")
_MONEY = ("input_cost_usd", "output_cost_usd", "cost_usd")
_FIELDS = tuple(f.name for f in dataclasses.fields(CallRecord))
_ROW = operator.attrgetter(*_FIELDS)
# A segment's first line names the fields; every other line is one record as a JSON array in that
# order: a third of the cost of encoding the dataclass by name, on the event loop, twice a call.
_HEADER = orjson.dumps({"meterline_journal": 2, "fields": _FIELDS}, option=orjson.OPT_APPEND_NEWLINE)
_EXTRAS = tuple(f.name for f in dataclasses.fields(CallExtras))
LOCK_FILE = "lock"
MAX_UNWRITTEN_BYTES = 64 * 1024 * 1024  # lines kept in memory while the disk refuses them
LOG_INTERVAL_S = 60.0  # a full disk logs once per interval, not once per call


def encode(record: CallRecord) -> bytes:
    return orjson.dumps(_ROW(record), default=_default, option=orjson.OPT_APPEND_NEWLINE)


def encode_final(record: CallRecord, extras: CallExtras | None) -> bytes:
    """A final line: the record's fields and then its extras (orjson writes the dataclass as an object)."""
    return orjson.dumps((*_ROW(record), extras), default=_default, option=orjson.OPT_APPEND_NEWLINE)


def header(incarnation: str, torn: bool = False) -> bytes:
    """A segment's first line; again, with `torn`, after a line the disk took only part of."""
    doc: dict[str, Any] = {"meterline_journal": 3, "fields": _FIELDS, "incarnation": incarnation}
    if torn:
        doc["torn"] = True
    return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    fields: tuple[str, ...]
    incarnation: str | None  # None: written by a version before incarnations
    torn: bool = False  # the line before it is a fragment whose whole line was written later


@dataclasses.dataclass(slots=True)
class Line:
    record: CallRecord
    final: bool  # False: the provisional line a call writes as it starts
    extras: CallExtras | None = None


def decode(line: bytes, fields: tuple[str, ...] = _FIELDS) -> CallRecord | tuple[str, ...]:
    """A record, or (for a segment's header line) the field names its records use."""
    got = read_line(line, fields)
    return got.fields if isinstance(got, Header) else got.record


def read_line(line: bytes, fields: tuple[str, ...] = _FIELDS) -> Line | Header:
    """One journal line. Lines written before the header existed are objects keyed by field name,
    and still read. Every value is checked (`validate.full`): a bad one becomes NULL and an
    anomaly; a line that cannot be a record at all raises ValueError."""
    doc = orjson.loads(line)
    extras: CallExtras | None = None
    final = True  # lines of earlier versions: the last line of a call wins, whatever it is
    if isinstance(doc, list):
        final = len(doc) > len(fields)
        if final:
            extras = _extras(doc[len(fields)])
        doc = dict(zip(fields, doc))
    elif not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not a record")
    elif "meterline_journal" in doc:
        names = doc.get("fields")
        if not isinstance(names, list) or not all(type(n) is str for n in names):
            raise ValueError("a header line without its field names")
        incarnation = doc.get("incarnation")
        return Header(tuple(names), incarnation if type(incarnation) is str else None, doc.get("torn") is True)
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
    return Line(validate.full(CallRecord(**{name: doc.get(name) for name in _FIELDS})), final, extras)


def _extras(doc: Any) -> CallExtras | None:
    """A final line's extras; what does not read as extras is dropped (the row matters, not its span)."""
    if not isinstance(doc, dict):
        return None
    try:
        extras = CallExtras(**{k: v for k, v in doc.items() if k in _EXTRAS})
        extras.events = [(name, datetime.fromisoformat(at), attrs) for name, at, attrs in extras.events or ()]
    except (TypeError, ValueError):
        return None
    return extras


class Journal:
    """Segmented append-only journal of one forwarder. `begin`/`end` run on the event loop."""

    def __init__(self, directory: str | os.PathLike[str], segment_bytes: int = 4 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.lock = threading.Lock()
        self.incarnation = os.urandom(8).hex()  # this process's: the reader tells its lines from a dead one's
        self.segment = 0
        self.fd = -1
        self.lock_fd = -1
        self.size = 0
        self.buffer: list[bytes] = []  # provisional lines not yet written
        # schedules a function for the end of the event loop's turn (loop.call_soon); None: write at once
        self.defer: Callable[[Callable[[], None]], object] | None = None
        self.closed = False
        self.unwritten: list[bytes] = []  # lines the disk refused, oldest first; retried on the next flush
        self.unwritten_bytes = 0
        self.copied = 0  # leading lines of `unwritten` already handed to the sinks process (`uncopied`)
        self.torn = False  # the file ends inside a line: the next write starts with a newline
        self.append_failures = 0  # writes the disk refused (counted for healthz)
        self.lost = 0  # lines dropped because more than MAX_UNWRITTEN_BYTES were waiting
        self.rejected_lines: list[tuple[bytes, str]] = []  # (line, reason) that `recover` could not use
        self._logged_at = -LOG_INTERVAL_S

    # --- start-up ------------------------------------------------------------------------------

    def recover(self) -> list[CallRecord]:
        """Every call the directory holds (last line per call wins), oldest segment first."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        latest: dict[str, CallRecord] = {}
        for path in segments(self.dir):
            fields = _FIELDS
            bad = False  # the previous line was quarantined
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break  # a torn last write: that line never completed
                    try:
                        got = read_line(line, fields)
                    except (ValueError, TypeError, KeyError, ArithmeticError) as e:
                        # a torn fragment (full disk) or a line edited by hand: kept aside, not replayed
                        log.warning("journal %s line %d is unusable (%s); quarantined", path.name, n, e)
                        self.rejected_lines.append((line.rstrip(b"\n"), f"{path.name} line {n}: {e}"))
                        bad = True
                        continue
                    if isinstance(got, Header):
                        fields = got.fields
                        if got.torn and bad:
                            self.rejected_lines.pop()  # a torn fragment: its whole line follows
                    else:
                        latest[got.record.call_id] = got.record
                    bad = False
        return list(latest.values())

    def discard_recovered(self) -> None:
        """Called once what `recover` read is safely in the ledger."""
        for path in segments(self.dir):
            path.unlink(missing_ok=True)

    def open(self) -> None:
        """Takes the directory's lock (held while this process lives) and starts a new segment after
        the ones there: numbers only grow, as the reader keeps the newest segment of a directory."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock_fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)  # a forwarder still dying in this slot lets go as it exits
        existing = segments(self.dir)
        self._rotate(int(existing[-1].stem) + 1 if existing else 1)

    # --- the request path ----------------------------------------------------------------------

    def begin(self, provisional: CallRecord) -> int:
        """Queues the provisional (interrupted) record; returns the segment to pass to `end`."""
        line = encode(provisional)
        with self.lock:
            if self.size >= self.segment_bytes:
                self._rotate(self.segment + 1)
            self.buffer.append(line)
            self.size += len(line)
            if self.defer is None:
                self._flush()
            elif len(self.buffer) == 1:
                self.defer(self.flush)
            return self.segment

    def end(self, record: CallRecord, begun_in: int | None, lazily: bool = False,
            extras: CallExtras | None = None) -> int:
        """Writes the final record (and any queued provisional ones) now, or with `lazily` at the
        end of the loop's turn, when the caller holds back the response's last bytes until `flush`.
        A call that began in an older segment is written at once: its lines stay in order on disk."""
        line = encode_final(record, extras)
        with self.lock:
            if self.size >= self.segment_bytes:
                self._rotate(self.segment + 1)
            self.buffer.append(line)
            self.size += len(line)
            if not lazily or self.defer is None or (begun_in is not None and begun_in != self.segment):
                self._flush()
            elif len(self.buffer) == 1:
                self.defer(self.flush)
            return self.segment

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def uncopied(self) -> list[bytes]:
        """Lines the disk refused that the sinks process has not been sent yet: while the journal's
        disk is full, the forwarder sends copies over the socket so the ledger stays current. They
        stay here too, for the disk once it has room (the sinks process skips them then)."""
        with self.lock:
            lines = self.unwritten[self.copied:]
            self.copied = len(self.unwritten)
            return lines

    def close(self) -> None:
        """At shutdown: writes what waits, closes the segment and lets go of the directory."""
        with self.lock:
            if self.fd >= 0:
                self._flush()
                os.close(self.fd)
                self.fd = -1
            self.closed = True
            if self.lock_fd >= 0:
                os.close(self.lock_fd)  # releases the flock
                self.lock_fd = -1

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
            self.unwritten, self.unwritten_bytes, self.copied = [], 0, 0
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
        # after a torn write: a newline ends the fragment, and a header saying so follows, so readers
        # drop the fragment (its whole line is among these) instead of quarantining it
        prefix = b"\n" + header(self.incarnation, torn=True) if self.torn else b""
        data = prefix + data
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
        if prefix:
            if sent < len(prefix):
                return 0  # still torn (the fragment now ends inside the marker, which says the same)
            sent -= len(prefix)
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
            self.copied = max(0, self.copied - 1)
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
        self.segment, self.size = segment, len(_HEADER)
        self.torn = False  # a new file starts on a new line
        # lines the disk refused go to the new segment, after its header
        lines = [header(self.incarnation), *self.unwritten]
        self.unwritten, self.unwritten_bytes, self.copied = [], 0, 0
        if self._reopen():
            done = self._write(lines)
            lines = lines[done:]
        self._keep(lines)


def segments(directory: Path) -> list[Path]:
    """A directory's segment files, oldest first."""
    return sorted(p for p in directory.glob("*.jsonl") if p.stem.isdigit())
