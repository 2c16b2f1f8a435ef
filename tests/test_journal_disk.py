"""A full disk under the journal loses no line and glues none: lines the disk refuses wait in memory and
are written once space returns, a torn fragment stays a line of its own, healthz says degraded, and the
log says so once, not once per call. The disk is a small tmpfs (needs root to mount; skipped otherwise)."""
from __future__ import annotations

import contextlib
import errno
import logging
import subprocess
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ledger.journal import Journal, decode
from tests.fakes.poison import PoisonUpstream
from tests.sidecar_process import Sidecar
from tests.test_journal import record
from tests.test_ledger_poison import _call, _rows


@contextlib.contextmanager
def small_disk(path: Path, size: str = "64k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fills the disk holding `directory` to the last byte; returns the file to delete to free it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (4096, 1):
            try:
                while True:
                    f.write(b"x" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def lines_of(directory: Path) -> list[bytes]:
    return [line for p in sorted(directory.glob("*.jsonl")) for line in p.read_bytes().splitlines(keepends=True)]


def test_journal_keeps_what_a_full_disk_refuses_and_never_glues(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with small_disk(tmp_path / "disk") as disk:
        journal = Journal(disk)
        journal.open()
        journal.begin(record("before", outcome="interrupted"))
        filler = fill(disk)
        with caplog.at_level(logging.ERROR, logger="meterline.journal"):
            for i in range(30):  # while the disk is full: no exception, the lines wait
                segment = journal.begin(record(f"full{i}", outcome="interrupted"))
                journal.end(record(f"full{i}"), segment)
        errors = [r for r in caplog.records if r.name == "meterline.journal"]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # one log line, not one per call
        assert journal.unwritten and journal.append_failures >= 30
        filler.unlink()
        journal.end(record("after"), None)  # space is back: everything waiting goes out
        assert not journal.unwritten and journal.lost == 0
        journal.close()
        lines = lines_of(disk)
        recovered = {r.call_id: r for r in Journal(disk).recover()}
    assert set(recovered) == {"before", "after", *(f"full{i}" for i in range(30))}
    assert all(recovered[f"full{i}"].outcome == "ok" for i in range(30))
    unreadable = []
    for line in lines:
        try:
            decode(line)
        except ValueError:
            unreadable.append(line)
    assert len(unreadable) <= 1, unreadable  # at most the one torn fragment, alone on its line


def test_a_full_journal_disk_loses_no_call(start_sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    workdir = tmp_path / "sidecar"
    with PoisonUpstream() as upstream, small_disk(workdir / "ledger.duckdb.journal") as disk:
        extra = {"upstreams": {"poison": {"base_url": upstream.base_url, "adapter": "openai", "provider": "openai"}}}
        sidecar = start_sidecar(extra, workdir=workdir)
        assert _call(sidecar, None, "first") == 200
        filler = fill(disk)
        tags = [f"full{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
        assert [_call(sidecar, None, tag) for tag in tags] == [200] * 10  # calls never fail on the journal
        health = sidecar.health()
        assert health["status"] == "degraded"
        assert health["journal"]["unwritten"] > 0 and health["journal"]["append_failures"] > 0
        assert len(_rows(sidecar, 11)) == 11  # the ledger itself is on another disk: rows are written
        log = sidecar.log()
        assert log.count("journal append failed") == 1 and "Traceback" not in log
        filler.unlink()
        assert _call(sidecar, None, "after") == 200
        health = sidecar.health()
        assert health["journal"]["unwritten"] == 0 and health["journal"]["lost"] == 0
        assert health["status"] == "ok"
        sidecar.kill()  # the journal must now hold every call, as if the ledger had not got them
        recovered = {tuple(r.tags.items()): r for r in Journal(disk / "w0").recover()}  # the forwarder's own
        for tag in ["first", *tags, "after"]:
            assert (("n", tag),) in recovered, f"call {tag} is missing from the journal"
            assert recovered[(("n", tag),)].outcome == "ok"
        again = start_sidecar(extra, workdir=workdir)
        rows = _rows(again, 12)
        assert sorted(r["tags"]["n"] for r in rows) == sorted(["first", *tags, "after"])
