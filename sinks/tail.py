"""Reads the forwarders' journals as they grow: finished calls go to the ledger writer, in order.

Each forwarder appends to its own directory (`<ledger>.journal/w<k>/`, ledger/journal.py). A call
writes a provisional line as it starts and its final line as it ends; the tail holds each
provisional line until the call's final line arrives. A provisional line whose forwarder is gone
becomes the call's record as it stands (outcome `interrupted`): a forwarder is gone when its
directory's lock is free, or when a newer incarnation wrote the directory's newest segment (a
restarted forwarder waits for the old one's lock, so an older incarnation cannot be alive).

A segment is deleted once the writer has committed every record read from it and no call in it is
still open, except the newest of each directory: segment numbers must keep growing across
restarts. Nothing here is persisted: after a restart the tail reads what the directories still
hold from the start, and the caller writes only the calls the ledger does not have (`catch_up`).
"""
from __future__ import annotations

import collections
import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ledger.journal import _FIELDS, LOCK_FILE, Header, Line, read_line, segments
from ledger.records import CallExtras, CallRecord

log = logging.getLogger("meterline.tail")

READ_BYTES = 4 * 1024 * 1024  # read at most this much of one segment per pass
MAX_ITEMS = 20_000  # a pass stops reading further segments past this many records (a backlog stays on disk)


@dataclass(frozen=True, slots=True)
class Token:
    """Where a record was read: handed back through `committed` once the ledger has it."""

    worker: str
    segment: int


Item = tuple[CallRecord, Token, CallExtras | None]
SENT = -1  # the "segment" of lines that came over the socket: no file to delete


class _Worker:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.name = directory.name
        self.segment = 0  # reading this segment (0: none yet)
        self.offset = 0
        self.fields: tuple[str, ...] = _FIELDS
        self.incarnation: str | None = None  # of the segment being read
        self.open: dict[str, tuple[CallRecord, int, str | None]] = {}  # call_id -> provisional, segment, incarnation
        self.held: collections.Counter[int] = collections.Counter()  # segment -> records not committed + open calls
        self.newest = 0  # the newest segment seen in the directory
        # calls whose final line came over the socket (the journal's disk was full): their lines,
        # when the disk takes them later, are skipped
        self.sent_final: set[str] = set()
        self.unread = 0  # bytes on disk not read yet (for healthz)
        self.bad = False  # the last line read was quarantined (a torn fragment, if a torn header follows)


class JournalTail:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.workers: dict[str, _Worker] = {}
        self.lock = threading.Lock()  # `poll` runs on the tail thread, `committed` on the writer's
        self.rejected_lines: list[tuple[bytes, str]] = []  # lines that are not records: the writer stores them
        self.read = 0  # records handed out
        self.interrupted = 0  # provisional records handed out for forwarders that died

    @property
    def backlog_bytes(self) -> int:
        return sum(w.unread for w in self.workers.values())

    @property
    def open_calls(self) -> int:
        return sum(len(w.open) for w in self.workers.values())

    def poll(self) -> list[Item]:
        """What every directory gained since the last poll, and the calls of dead forwarders."""
        items: list[Item] = []
        try:
            dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("w"))
        except FileNotFoundError:
            return items
        for d in dirs:
            worker = self.workers.get(d.name)
            if worker is None:
                worker = self.workers[d.name] = _Worker(d)
            dead = self._dead_incarnations(worker)
            with self.lock:
                self._read(worker, items)
                self._resolve(worker, dead, items)
        self.read += len(items)
        return items

    def ends(self) -> dict[str, tuple[int, int]]:
        """Where each directory's journal ends now: (newest segment, its size)."""
        out = {}
        try:
            dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("w")]
        except FileNotFoundError:
            return out
        for d in dirs:
            paths = segments(d)
            if paths:
                try:
                    out[d.name] = (int(paths[-1].stem), paths[-1].stat().st_size)
                except FileNotFoundError:
                    pass
        return out

    def read_past(self, ends: dict[str, tuple[int, int]]) -> bool:
        """Whether every directory has been read up to `ends` (lines before it may be in the ledger)."""
        for name, end in ends.items():
            worker = self.workers.get(name)
            if worker is None or (worker.segment, worker.offset) < end:
                return False
        return True

    def take_sent(self, worker_name: str, lines: list[bytes]) -> list[Item]:
        """Lines a forwarder sent over the socket because its journal's disk refused them."""
        items: list[Item] = []
        with self.lock:
            worker = self.workers.get(worker_name)
            if worker is None:
                worker = self.workers[worker_name] = _Worker(self.root / worker_name)
            for raw in lines:
                self._take(worker, raw.rstrip(b"\n"), "(sent)", items, sent=True)
        self.read += len(items)
        return items

    def committed(self, tokens: list[Token]) -> None:
        """The writer has these records in the ledger: their segments may go."""
        with self.lock:
            for t in tokens:
                worker = self.workers[t.worker]
                worker.held[t.segment] -= 1
            for worker in self.workers.values():
                self._trim(worker)

    # --- inside --------------------------------------------------------------------------------

    def _dead_incarnations(self, worker: _Worker) -> set[str | None]:
        """With the directory's lock free, every incarnation seen so far is gone. Checked before
        reading, so a final line written just before the forwarder died is read first."""
        if not worker.open:
            return set()
        try:
            fd = os.open(worker.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return set()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return set()  # a forwarder lives there
        finally:
            os.close(fd)  # (closing releases the lock when it was taken)
        return {inc for _, _, inc in worker.open.values()}

    def _read(self, worker: _Worker, items: list[Item]) -> None:
        paths = segments(worker.dir)
        numbers = [int(p.stem) for p in paths]
        if not numbers:
            worker.unread = 0
            return
        worker.newest = numbers[-1]
        if worker.segment not in numbers:  # the first pass, or the segment was removed by hand
            later = [n for n in numbers if n > worker.segment]
            if not later:
                return
            worker.segment, worker.offset, worker.fields, worker.incarnation = later[0], 0, _FIELDS, None
        while True:
            done = self._read_segment(worker, items)
            if not done or worker.segment == worker.newest or len(items) >= MAX_ITEMS:
                break
            # the forwarder moved on to a newer segment: this one is complete
            following = [n for n in numbers if n > worker.segment]
            worker.segment, worker.offset, worker.fields, worker.incarnation = following[0], 0, _FIELDS, None
        unread = 0
        for n, p in zip(numbers, paths):
            if n >= worker.segment:
                try:
                    unread += p.stat().st_size - (worker.offset if n == worker.segment else 0)
                except FileNotFoundError:
                    pass
        worker.unread = max(0, unread)
        self._trim(worker)

    def _read_segment(self, worker: _Worker, items: list[Item]) -> bool:
        """Reads the current segment from the offset; True when it was read to its end."""
        path = worker.dir / f"{worker.segment:012d}.jsonl"
        try:
            with open(path, "rb") as f:
                if worker.offset == 0 or worker.incarnation is None:
                    first = f.readline()  # the header: the field order and the incarnation
                    if first.endswith(b"\n"):
                        try:
                            got = read_line(first)
                        except (ValueError, TypeError, KeyError, ArithmeticError):
                            got = None
                        if isinstance(got, Header):
                            worker.fields, worker.incarnation = got.fields, got.incarnation
                            if worker.offset == 0:
                                worker.offset = len(first)
                f.seek(worker.offset)
                data = f.read(READ_BYTES)
        except FileNotFoundError:
            return True
        end = data.rfind(b"\n") + 1
        complete = len(data) < READ_BYTES
        last_segment = worker.segment == worker.newest
        if complete and end < len(data) and not last_segment:
            # a torn last write in a segment the forwarder has left: the forwarder kept the whole
            # line and wrote it at the top of its next segment, so the fragment is dropped
            end_offset = worker.offset + len(data)
        else:
            end_offset = worker.offset + end
        start = worker.offset
        for raw in data[:end].splitlines():
            if not raw:
                continue
            self._take(worker, raw, path.name, items)
        worker.offset = end_offset
        if start == end_offset and not complete:
            log.error("journal %s/%s has a line over %d bytes; skipped", worker.name, path.name, READ_BYTES)
            worker.offset += len(data)
        return complete

    def _take(self, worker: _Worker, raw: bytes, name: str, items: list[Item], sent: bool = False) -> None:
        try:
            got = read_line(raw, worker.fields)
        except (ValueError, TypeError, KeyError, ArithmeticError) as e:
            self.rejected_lines.append((raw, f"{worker.name}/{name}: {e}"))
            worker.bad = True
            return
        if isinstance(got, Header):  # mid-file: after a torn write (or a hand edit)
            worker.fields, worker.incarnation = got.fields, got.incarnation or worker.incarnation
            if got.torn and worker.bad and self.rejected_lines:
                self.rejected_lines.pop()  # the fragment of a line written whole after this header
            worker.bad = False
            return
        worker.bad = False
        assert isinstance(got, Line)
        record = got.record
        segment = SENT if sent else worker.segment
        if record.call_id in worker.sent_final:  # it reached the ledger over the socket already
            if not sent and got.final:
                worker.sent_final.discard(record.call_id)  # the disk's copy: the last line of the call
            return
        if not got.final:
            if record.call_id not in worker.open:
                worker.held[segment] += 1
            worker.open[record.call_id] = (record, segment, worker.incarnation)
            return
        begun = worker.open.pop(record.call_id, None)
        if begun is not None:
            worker.held[begun[1]] -= 1
        if sent:
            worker.sent_final.add(record.call_id)
        worker.held[segment] += 1
        items.append((record, Token(worker.name, segment), got.extras))

    def _resolve(self, worker: _Worker, dead: set[str | None], items: list[Item]) -> None:
        """Calls whose forwarder is gone: their provisional record is all there will be."""
        if not worker.open:
            return
        current = worker.incarnation if worker.segment == worker.newest else None
        for call_id, (record, segment, incarnation) in list(worker.open.items()):
            if incarnation in dead or (current is not None and incarnation != current):
                del worker.open[call_id]
                # the count it held for its segment now stands for the record handed out
                items.append((record, Token(worker.name, segment), None))
                self.interrupted += 1

    def _trim(self, worker: _Worker) -> None:
        for segment in [s for s, n in worker.held.items() if n <= 0]:
            del worker.held[segment]
        for path in segments(worker.dir):
            n = int(path.stem)
            if n >= worker.segment or n >= worker.newest:
                break
            if worker.held.get(n, 0) == 0:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    log.warning("could not delete journal segment %s", path, exc_info=True)
