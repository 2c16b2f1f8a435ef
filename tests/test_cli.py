"""`meterline sql` and `meterline budgets` as a user runs them: finding the sidecar, --db, one-line errors,
and exports that hold every row or say they were cut; `meterline serve`'s start-up errors."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from tests.sidecar_process import Sidecar, free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("METERLINE_URL", "METERLINE_ADMIN_TOKEN")},
       "PYTHONPATH": str(ROOT)}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with exactly one line on stderr, naming what went wrong."""
    assert done.returncode != 0, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("meterline: ") and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sidecar_config() -> dict[str, Any]:
    return {"budgets": [{"name": "cli-cap", "window": "day", "limit_usd": 5}]}


@pytest.fixture
def other_ledger(tmp_path: Path) -> Path:
    """A second ledger file, not the running sidecar's, with rows of its own."""
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE calls AS SELECT 'other-' || range AS call_id FROM range(7)")
    con.close()
    return path


def test_the_sidecar_is_found_through_meterline_url_and_a_url_without_scheme(sidecar: Sidecar, tmp_path: Path) -> None:
    assert sidecar.port != 8720  # the default port is not where it listens
    env = {"METERLINE_URL": f"127.0.0.1:{sidecar.port}"}
    done = cli("sql", "SELECT 'via-sidecar' AS v", "--format", "json", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == [{"v": "via-sidecar"}]
    done = cli("budgets", "--format", "json", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert [r["rule"] for r in orjson.loads(done.stdout)] == ["cli-cap"]
    for url in (f"127.0.0.1:{sidecar.port}", f"localhost:{sidecar.port}/", sidecar.url):
        done = cli("sql", "SELECT 1 AS one", "--format", "csv", "--url", url, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.split() == ["one", "1"], (url, done.stderr)


def test_db_names_the_file_that_is_read(sidecar: Sidecar, other_ledger: Path, tmp_path: Path) -> None:
    query = "SELECT count(*) AS n, min(call_id) AS first FROM calls"
    # a file the sidecar does not own is read itself
    done = cli("sql", query, "--format", "json", "--url", sidecar.url, "--db", str(other_ledger), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == [{"n": 7, "first": "other-0"}]
    # the sidecar's own file is read through it (DuckDB's lock would refuse a second opener)
    own = sidecar.sql(query)
    done = cli("sql", query, "--format", "json", "--url", sidecar.url, "--db", str(sidecar.db), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == own
    done = cli("budgets", "--format", "json", "--url", sidecar.url, "--db", str(sidecar.db), cwd=tmp_path)
    assert done.returncode == 0 and "cli-cap" in done.stdout, done.stderr


def test_a_ledger_locked_by_a_running_sidecar_is_one_line(sidecar: Sidecar, start_sidecar: Any,
                                                           tmp_path: Path) -> None:
    locked = start_sidecar()  # owns its ledger; the CLI is pointed at the other sidecar
    for args in (["sql", "SELECT 1"], ["budgets"]):
        done = cli(*args, "--url", sidecar.url, "--db", str(locked.db), cwd=tmp_path)
        one_line_error(done, str(locked.db), "in use by another process", "--url")
    # and with no sidecar answering at all
    done = cli("sql", "SELECT 1", "--url", f"127.0.0.1:{free_port()}", "--db", str(locked.db), cwd=tmp_path)
    one_line_error(done, "in use by another process")


def test_a_second_serve_on_the_same_ledger_is_one_line(sidecar: Sidecar, tmp_path: Path) -> None:
    done = cli("serve", "--port", str(free_port()), "--db", str(sidecar.db), cwd=tmp_path)
    one_line_error(done, str(sidecar.db), "in use by another process")
    assert sidecar.health()["status"]  # the first one is untouched


def test_a_port_in_use_is_one_line(sidecar: Sidecar, tmp_path: Path) -> None:
    done = cli("serve", "--port", str(sidecar.port), "--db", str(tmp_path / "mine.duckdb"), cwd=tmp_path)
    one_line_error(done, f"cannot listen on 127.0.0.1:{sidecar.port}", "in use")


class _NotUs(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"<html>some other web server</html>"
        self.send_response(200 if self.path == "/_meterline/healthz" else 404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def not_meterline() -> Iterator[list[str]]:
    """An HTTP server that is not a sidecar, and a port that does not speak HTTP at all."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotUs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = garbage.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    yield [f"127.0.0.1:{server.server_address[1]}", f"127.0.0.1:{garbage.getsockname()[1]}"]
    server.shutdown()
    server.server_close()
    garbage.close()


def test_a_url_that_is_not_a_sidecar_is_one_line(not_meterline: list[str], tmp_path: Path) -> None:
    for url in not_meterline:
        for args in (["sql", "SELECT 1"], ["budgets"]):
            done = cli(*args, "--url", url, cwd=tmp_path)
            one_line_error(done, url, "not")
    one_line_error(cli("sql", "SELECT 1", "--url", "ftp://example.com", cwd=tmp_path), "ftp://example.com")


def test_exports_hold_every_row_or_say_they_were_cut(sidecar: Sidecar, tmp_path: Path) -> None:
    from ledger.sql import MAX_EXPORT_ROWS, MAX_ROWS

    many = MAX_ROWS * 2 + 5
    for fmt in ("csv", "json"):
        done = cli("sql", f"SELECT range AS i FROM range({many})", "--format", fmt, "--url", sidecar.url,
                   cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        got = done.stdout.strip().splitlines()[1:] if fmt == "csv" else [r["i"] for r in orjson.loads(done.stdout)]
        assert len(got) == many and done.stderr == "", (fmt, len(got), done.stderr)
    # past what the sidecar holds in memory for one answer: the rows it sent, and a warning
    done = cli("sql", f"SELECT range AS i FROM range({MAX_EXPORT_ROWS + 10})", "--format", "csv", "--url", sidecar.url,
               cwd=tmp_path)
    assert done.returncode == 0
    assert len(done.stdout.strip().splitlines()) == MAX_EXPORT_ROWS + 1
    line = one_line_error(subprocess.CompletedProcess(done.args, 1, done.stdout, done.stderr), "cut at")
    assert f"{MAX_EXPORT_ROWS:,}" in line


def test_exports_from_the_file_hold_every_row(tmp_path: Path) -> None:
    from ledger.sql import MAX_ROWS

    path = tmp_path / "big.duckdb"
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE calls AS SELECT range AS i FROM range({MAX_ROWS + 123})")
    con.close()
    done = cli("sql", "SELECT i FROM calls", "--format", "csv", "--url", f"127.0.0.1:{free_port()}", "--db", str(path),
               cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(done.stdout.strip().splitlines()) == MAX_ROWS + 124


@pytest.fixture
def env_proxy() -> Iterator[Any]:
    from tests.fakes.env_proxy import RecordingProxy

    proxy = RecordingProxy().start()
    yield proxy
    proxy.close()


def test_a_proxy_in_the_environment_does_not_capture_calls_to_a_local_sidecar(sidecar: Sidecar, env_proxy: Any,
                                                                               tmp_path: Path) -> None:
    env = env_proxy.env()  # what a container or CI runner often sets, with no NO_PROXY
    for url in (f"127.0.0.1:{sidecar.port}", f"localhost:{sidecar.port}"):
        done = cli("sql", "SELECT 'direct' AS v", "--format", "json", "--url", url, cwd=tmp_path, env=env)
        assert done.returncode == 0, (url, done.stderr)
        assert orjson.loads(done.stdout) == [{"v": "direct"}]
        done = cli("budgets", "--format", "json", "--url", url, cwd=tmp_path, env=env)
        assert done.returncode == 0 and "cli-cap" in done.stdout, (url, done.stderr)
    assert env_proxy.requests == []


def test_a_remote_sidecar_is_reached_through_the_environments_proxy(env_proxy: Any, tmp_path: Path) -> None:
    # not loopback: the environment's proxy applies, as it does for any other HTTP client there
    done = cli("sql", "SELECT 1", "--url", "http://meterline.example:8720", cwd=tmp_path, env=env_proxy.env())
    one_line_error(done, "http://meterline.example:8720", "does not answer as a meterline sidecar", "HTTP 502")
    assert env_proxy.requests == ["http://meterline.example:8720/_meterline/healthz"]


class _OpenAiShaped(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server (the provider, or another proxy) where the sidecar was expected:
    its error bodies have an `error` object, not the sidecar's `error` string."""

    def do_GET(self) -> None:  # noqa: N802
        body = orjson.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_an_openai_compatible_server_is_not_taken_for_a_sidecar(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenAiShaped)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"127.0.0.1:{server.server_address[1]}"
        for args in (["sql", "SELECT 1"], ["budgets"]):
            one_line_error(cli(*args, "--url", url, cwd=tmp_path), url, "does not answer as a meterline sidecar",
                           "HTTP 401")
    finally:
        server.shutdown()
        server.server_close()
