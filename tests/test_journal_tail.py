"""The sinks process's reading of the forwarders' journals (sinks/tail.py), on real files: calls come out
once, as they ended; a dead forwarder's calls in flight come out as interrupted; segments go once done."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ledger.journal import Journal, header
from sinks.tail import JournalTail
from tests.test_journal import record


def _forwarder(root: Path, worker: str = "w0", segment_bytes: int = 4 << 20) -> Journal:
    journal = Journal(root / worker, segment_bytes=segment_bytes)
    journal.open()
    return journal


def _ids(items) -> list[tuple[str, str]]:
    return [(r.call_id, r.outcome) for r, _, _ in items]


def test_a_call_comes_out_once_when_it_ends_with_its_extras(tmp_path: Path) -> None:
    from ledger.records import CallExtras

    journal = _forwarder(tmp_path)
    tail = JournalTail(tmp_path)
    begun = journal.begin(record("c1", outcome="interrupted", ended_at=None))
    assert tail.poll() == [] and tail.open_calls == 1  # in flight: held back
    journal.end(record("c1"), begun, extras=CallExtras(server_address="api.example", attributes={"a": 1}))
    items = tail.poll()
    assert _ids(items) == [("c1", "ok")] and items[0][2].server_address == "api.example"
    assert items[0][2].attributes == {"a": 1} and tail.open_calls == 0
    assert tail.poll() == []
    journal.close()


def test_a_dead_forwarders_calls_in_flight_are_interrupted_a_live_ones_are_not(tmp_path: Path) -> None:
    journal = _forwarder(tmp_path)
    tail = JournalTail(tmp_path)
    journal.begin(record("c1", outcome="interrupted", ended_at=None))
    tail.poll()
    assert tail.poll() == []  # its lock is held: still in flight
    os.close(journal.lock_fd)  # the forwarder dies (the kernel releases its flock)
    journal.lock_fd = -1
    assert _ids(tail.poll()) == [("c1", "interrupted")] and tail.interrupted == 1


def test_a_newer_incarnation_in_the_directory_ends_the_older_ones_calls(tmp_path: Path) -> None:
    old = _forwarder(tmp_path)
    tail = JournalTail(tmp_path)
    old.begin(record("c1", outcome="interrupted", ended_at=None))
    tail.poll()
    os.close(old.lock_fd)
    old.lock_fd = -1
    new = _forwarder(tmp_path)  # takes the lock at once: the lock alone cannot tell the old one is gone
    new.begin(record("c2", outcome="interrupted", ended_at=None))
    got = _ids(tail.poll()) + _ids(tail.poll())
    assert got == [("c1", "interrupted")], got  # c2 is the live forwarder's, still in flight
    assert tail.open_calls == 1
    new.close()


def test_segments_go_once_committed_except_the_newest(tmp_path: Path) -> None:
    journal = _forwarder(tmp_path, segment_bytes=10)  # every line starts a new segment
    tail = JournalTail(tmp_path)
    for n in range(3):
        begun = journal.begin(record(f"c{n}", outcome="interrupted", ended_at=None))
        journal.end(record(f"c{n}"), begun)
    items = tail.poll()
    assert len(items) == 3
    before = sorted(p.name for p in (tmp_path / "w0").glob("*.jsonl"))
    assert len(before) > 1
    tail.committed([token for _, token, _ in items])
    after = sorted(p.name for p in (tmp_path / "w0").glob("*.jsonl"))
    assert after == before[-1:]  # only the newest: numbers must keep growing across restarts
    journal.close()


def test_a_torn_fragment_is_dropped_and_its_whole_line_read(tmp_path: Path) -> None:
    journal = _forwarder(tmp_path)
    tail = JournalTail(tmp_path)
    path = journal._path(journal.segment)
    whole = b'["c1-fragment-of-a-line'
    with open(path, "ab") as f:  # what a disk that filled mid-write leaves, and the next write adds
        f.write(whole + b"\n" + header(journal.incarnation, torn=True))
    begun = journal.begin(record("c1", outcome="interrupted", ended_at=None))
    journal.end(record("c1"), begun)
    assert _ids(tail.poll()) == [("c1", "ok")]
    assert tail.rejected_lines == []  # not quarantined: nothing was lost
    journal.close()


def test_lines_sent_over_the_socket_are_skipped_when_the_disk_takes_them(tmp_path: Path) -> None:
    from ledger.journal import encode, encode_final

    journal = _forwarder(tmp_path)
    tail = JournalTail(tmp_path)
    tail.poll()
    lines = [encode(record("c1", outcome="interrupted", ended_at=None)), encode_final(record("c1"), None)]
    assert _ids(tail.take_sent("w0", lines)) == [("c1", "ok")]
    with open(journal._path(journal.segment), "ab") as f:  # the disk has room again
        f.write(b"".join(lines))
    assert tail.poll() == [] and tail.open_calls == 0
    journal.close()


def test_a_forwarder_waits_for_the_lock_of_the_one_before(tmp_path: Path) -> None:
    (tmp_path / "w0").mkdir()
    fd = os.open(tmp_path / "w0" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    import threading

    opened = threading.Event()
    journal = Journal(tmp_path / "w0")
    t = threading.Thread(target=lambda: (journal.open(), opened.set()), daemon=True)
    t.start()
    assert not opened.wait(0.3)  # the older forwarder still lives
    os.close(fd)
    assert opened.wait(5)
    journal.close()
