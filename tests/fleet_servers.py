"""Real Redis and PostgreSQL servers for the fleet tests, each on a free loopback port in its own temp directory.

The tests use the Debian packages (`.ci/run` installs redis-server and postgresql). PostgreSQL
refuses to run as root, so as root its programs run as the `postgres` user (`runuser`), in a
directory that user owns. Each server can be stopped and started again on the same port and data,
for the outage tests. Use the fixtures `redis_server` and `postgres_server` (session-scoped:
one server of each for the run) and, per test, `redis_url` (a flushed database) and
`postgres_url` (a new, empty database).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

PG_USER = "meterline"
PG_PASSWORD = "s3cret-pg-Pa55"  # tests check that it never appears in logs, healthz or errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, up: bool, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not {'open' if up else 'close'} within {timeout} s")


class RedisServer:
    """redis-server with no persistence, on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
        self.dir = tempfile.mkdtemp(prefix="meterline-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, up=True)

    def stop(self) -> None:
        """Ends the server (its data goes with it: no persistence, like a restarted cache)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
            _wait_port(self.port, up=False)

    def flush(self) -> None:
        import redis
        r = redis.Redis.from_url(self.url)
        try:
            r.flushall()
        finally:
            r.close()


class PostgresServer:
    """A PostgreSQL cluster of its own: password auth over TCP on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
        self.bin = os.path.dirname(found[-1])
        self.root = tempfile.mkdtemp(prefix="meterline-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "postgres.log")
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root
            pwd.getpwnam("postgres")  # the Debian package makes this user
            shutil.chown(self.root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w") as f:
            f.write(PG_PASSWORD + "\n")
        if self._as:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-U", PG_USER, "--pwfile", pwfile,
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        os.unlink(pwfile)

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", self.log, "-o", opts, "-w", "start")
        _wait_port(self.port, up=True)

    def stop(self) -> None:
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")
        _wait_port(self.port, up=False)

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        try:
            self.stop()
        except (subprocess.CalledProcessError, RuntimeError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A running server with nothing in it (a test that stopped it has it started again)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new empty database on a running server (a test that stopped it has it started again)."""
    try:
        _wait_port(postgres_server.port, up=True, timeout=0.5)
    except RuntimeError:
        postgres_server.start()
    return postgres_server.create_database()
