"""Drives HTTP load with wrk (bench/wrk_post.lua) and returns its numbers as plain data."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from systems import MODEL, System

LUA = Path(__file__).resolve().parent / "wrk_post.lua"


@dataclass
class WrkResult:
    system: str
    connections: int
    threads: int
    requests: int
    duration_s: float
    rps: float  # every response, whatever its status
    ok_rps: float  # responses that were neither errors nor non-2xx/3xx
    errors: dict[str, int]
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class WrkFailed(RuntimeError):
    pass


def wrk_path() -> str:
    found = shutil.which("wrk")
    if not found:
        raise WrkFailed("wrk is not installed (apt-get install wrk)")
    return found


def run_wrk(system: System, body_file: Path, connections: int, duration_s: float, threads: int = 1,
            max_requests: int = 0, timeout_s: float = 10.0) -> WrkResult:
    """One wrk run against `system`; bounded by `duration_s` and, when given, by `max_requests` in all."""
    assert system.url.startswith("http://127.0.0.1:"), "load goes to loopback only"
    if system.model != MODEL:  # a route's name: the same body with that model, next to the common one
        routed = body_file.with_name(f"body-{system.model}.json")
        if not routed.exists():
            routed.write_bytes(system.body())
        body_file = routed
    threads = max(1, min(threads, connections))
    per_thread = -(-max_requests // threads) if max_requests else 0
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file),
           "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in system.all_headers().items()),
           "BENCH_MAX_REQUESTS": str(per_thread)}
    cmd = [wrk_path(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
           f"--timeout={timeout_s:g}s", "-s", str(LUA), system.url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines: list[str] = []
    finished = [0]

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("WRKMAX"):
                finished[0] += 1
                if finished[0] == threads:
                    proc.send_signal(signal.SIGINT)  # wrk then reports as if -d had run out

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=duration_s + timeout_s + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise WrkFailed(f"wrk against {system.name} did not finish") from None
    reader.join(5)
    stderr = proc.stderr.read() if proc.stderr else ""
    found = [line for line in lines if line.startswith("WRKJSON ")]
    if not found:
        raise WrkFailed(f"wrk against {system.name} printed no result (exit {proc.returncode}): "
                        f"{stderr.strip()[-300:]} {''.join(lines)[-300:]}")
    doc = json.loads(found[-1][len("WRKJSON "):])
    return _result(system.name, connections, threads, doc)


def _result(name: str, connections: int, threads: int, doc: dict) -> WrkResult:
    seconds = doc["duration_us"] / 1e6
    errors = doc["errors"]
    failed = errors["status"] + errors["read"] + errors["write"] + errors["timeout"]
    lat = doc["latency_us"]
    p = lat["p"]
    return WrkResult(
        system=name, connections=connections, threads=threads, requests=doc["requests"], duration_s=seconds,
        rps=doc["requests"] / seconds, ok_rps=max(0, doc["requests"] - failed) / seconds, errors=errors,
        p50_ms=p["50"] / 1000, p75_ms=p["75"] / 1000, p90_ms=p["90"] / 1000, p99_ms=p["99"] / 1000,
        p999_ms=p["99.9"] / 1000, mean_ms=lat["mean"] / 1000, max_ms=lat["max"] / 1000,
    )


def settle(seconds: float = 0.5) -> None:
    """A short pause between runs, so one run's tail does not overlap the next."""
    time.sleep(seconds)
