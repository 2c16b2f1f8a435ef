"""Runs the real sidecar as users do (`meterline serve` in its own process) and reads its ledger over HTTP."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import urllib.error
import urllib.request

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sidecar:
    workdir: Path
    config: dict[str, Any]
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)  # added to the sidecar's environment
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.workdir / "ledger.duckdb"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sidecar.log"

    def start(self, timeout: float = 30.0) -> Sidecar:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "meterline.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "serve", "--config", str(cfg), "--port", str(self.port),
             "--db", str(self.db)],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
                 "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **self.env},
        )
        return self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> Sidecar:
        """Polls healthz until this sidecar answers (and, when started here, its process still runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            try:
                health = self.health()
            except OSError:
                time.sleep(0.05)
                continue
            if health["ledger"]["path"] != str(self.db):
                raise RuntimeError(f"another process answers on port {self.port}")
            return self
        raise RuntimeError(f"sidecar did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown code runs
        self.proc.wait()

    def forwarder_pid(self) -> int:
        """The forwarder process (the one that takes calls; `proc` is the supervisor)."""
        return self.health()["forwarder"]["pid"]

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_meterline/healthz", timeout=2) as r:
            return orjson.loads(r.read())

    def sql(self, query: str) -> list[dict[str, Any]]:
        req = urllib.request.Request(f"{self.url}/_meterline/sql", data=query.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            doc = orjson.loads(r.read())
        return [dict(zip(doc["columns"], row)) for row in doc["rows"]]

    def sql_status(self, query: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"{self.url}/_meterline/sql", data=query.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, orjson.loads(e.read())

    def rows(self, where: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Waits until the ledger holds `count` rows matching `where` (writes are asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.sql(f"SELECT * FROM calls WHERE {where} ORDER BY started_at")
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
