"""The ledger's files are private and its secrets out of SQL's reach: the fingerprint salt lives in
`<ledger>.salt` (0600), not in a table `POST /_meterline/sql` can read; an older ledger's salt moves
there, so fingerprints stay what they were; the DuckDB file, its WAL and the journal are mode 0600."""
from __future__ import annotations

import http.client
import json
import os
import stat
from pathlib import Path
from typing import Callable

import duckdb
import orjson

from sidecar.attribution import fingerprint
from tests.fakes.poison import PoisonUpstream
from tests.sidecar_process import Sidecar

OLD_SALT = "00112233445566778899aabbccddeeff"


def _call(sidecar: Sidecar, key: str, tag: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/poison/v1/chat/completions", body=body,
                 headers={"content-type": "application/json", "authorization": f"Bearer {key}",
                          "x-meterline-tags": f"n={tag}"})
    assert conn.getresponse().status == 200
    conn.close()


def _fingerprint(sidecar: Sidecar, tag: str) -> str:
    rows = sidecar.rows(f"tags['n'] = '{tag}'")
    assert len(rows) == 1, f"no single row for {tag}: {rows}"
    return rows[0]["key_fingerprint"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _salt_is_not_readable(sidecar: Sidecar, salt: str) -> None:
    for query in ("SELECT * FROM meta", "SELECT * FROM duckdb_tables()"):
        status, body = sidecar.sql_status(query)
        assert salt not in orjson.dumps(body).decode(), (query, body)


def test_salt_stays_out_of_sql_and_files_are_private(start_sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    workdir = tmp_path / "private"
    with PoisonUpstream() as upstream:
        extra = {"upstreams": {"poison": {"base_url": upstream.base_url, "adapter": "openai"}}}
        first = start_sidecar(extra, workdir=workdir)
        _call(first, "sk-private-1", "one")
        fp = _fingerprint(first, "one")
        salt_file = Path(f"{first.db}.salt")
        salt = salt_file.read_text().strip()
        assert fp == fingerprint("sk-private-1", bytes.fromhex(salt))
        _salt_is_not_readable(first, salt)
        journal = list(Path(f"{first.db}.journal").rglob("*.jsonl"))  # in the forwarder's directory, w0/
        assert journal
        wal = Path(f"{first.db}.wal")
        files = [first.db, salt_file, *journal, *([wal] if wal.exists() else [])]
        assert {str(p): oct(_mode(p)) for p in files} == {str(p): "0o600" for p in files}
        first.stop()

        second = start_sidecar(extra, workdir=workdir)
        _call(second, "sk-private-1", "two")
        assert _fingerprint(second, "two") == fp  # stable across a restart


def test_an_older_ledgers_salt_moves_out_of_meta(start_sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    workdir = tmp_path / "old"
    workdir.mkdir()
    con = duckdb.connect(str(workdir / "ledger.duckdb"))  # what an earlier version left: the salt in meta
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('fingerprint_salt', ?)", [OLD_SALT])
    con.close()
    with PoisonUpstream() as upstream:
        extra = {"upstreams": {"poison": {"base_url": upstream.base_url, "adapter": "openai"}}}
        sidecar = start_sidecar(extra, workdir=workdir)
        _call(sidecar, "sk-old-key", "migrated")
        # the fingerprint an earlier version gave this key: spend by key stays one series
        assert _fingerprint(sidecar, "migrated") == fingerprint("sk-old-key", bytes.fromhex(OLD_SALT))
        _salt_is_not_readable(sidecar, OLD_SALT)
        assert Path(f"{sidecar.db}.salt").read_text().strip() == OLD_SALT
        assert _mode(Path(f"{sidecar.db}.salt")) == 0o600 and _mode(sidecar.db) == 0o600
