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
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import os
import threading
from datetime import datetime
from decimal import Decimal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from .records import CallRecord

log = logging.getLogger("meterline.journal")

_DATETIMES = ("started_at", "ended_at")
_MONEY = ("input_cost_usd", "output_cost_usd", "cost_usd")
_FIELDS = tuple(f.name for f in dataclasses.fields(CallRecord))
_ROW = operator.attrgetter(*_FIELDS)
# A segment's first line names the fields; every other line is one record as a JSON array in that
# order: a third of the cost of encoding the dataclass by name, on the event loop, twice a call.
_HEADER = orjson.dumps({"meterline_journal": 2, "fields": _FIELDS}, option=orjson.OPT_APPEND_NEWLINE)


def encode(record: CallRecord) -> bytes:
    return orjson.dumps(_ROW(record), default=_default, option=orjson.OPT_APPEND_NEWLINE)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


def decode(line: bytes, fields: tuple[str, ...] = _FIELDS) -> CallRecord | tuple[str, ...]:
    """A record, or (for a segment's header line) the field names its records use. Lines written
    before the header existed are objects keyed by field name, and still read."""
    doc = orjson.loads(line)
    if isinstance(doc, list):
        doc = dict(zip(fields, doc))
    elif "meterline_journal" in doc:
        return tuple(doc["fields"])
    for name in _DATETIMES:
        if doc.get(name):
            doc[name] = datetime.fromisoformat(doc[name])
    for name in _MONEY:
        if doc.get(name) is not None:
            doc[name] = Decimal(doc[name])
    return CallRecord(**{name: doc.get(name) for name in _FIELDS})


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

    # --- start-up ------------------------------------------------------------------------------

    def recover(self) -> list[CallRecord]:
        """Every call the journal still holds (last line per call wins), oldest segment first."""
        self.dir.mkdir(parents=True, exist_ok=True)
        latest: dict[str, CallRecord] = {}
        for path in self._segments():
            fields = _FIELDS
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break  # a torn last write: that line never completed
                    try:
                        record = decode(line, fields)
                    except (ValueError, TypeError, KeyError):
                        log.warning("journal %s line %d is unreadable; skipped", path.name, n)
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
            for segment, left in list(self.outstanding.items()):
                if left == 0:
                    self._delete(segment)

    # --- internals (lock held) -----------------------------------------------------------------

    def _flush(self) -> None:
        if self.buffer and self.fd >= 0:
            data = self.buffer[0] if len(self.buffer) == 1 else b"".join(self.buffer)
            self.buffer.clear()
            while data:  # a regular file takes it all at once; the loop is for the rule, not the case
                data = data[os.write(self.fd, data):]

    def _rotate(self, segment: int) -> None:
        if self.fd >= 0:
            self._flush()  # queued lines belong to the segment they were counted in
            os.close(self.fd)
        previous = self.segment
        self.segment, self.size = segment, 0
        self.outstanding[segment] = 0
        self.fd = os.open(self.dir / f"{segment:012d}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(self.fd, _HEADER)
        self.size = len(_HEADER)
        if previous in self.outstanding and self.outstanding[previous] == 0:
            self._delete(previous)

    def _release(self, segment: int) -> None:
        left = self.outstanding[segment] - 1
        self.outstanding[segment] = left
        if left == 0 and segment != self.segment:
            self._delete(segment)

    def _delete(self, segment: int) -> None:
        del self.outstanding[segment]
        try:
            os.unlink(self.dir / f"{segment:012d}.jsonl")
        except OSError:
            log.warning("could not delete journal segment %d", segment, exc_info=True)
