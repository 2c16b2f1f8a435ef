"""Process helpers for the benchmarks: free loopback ports, starting a server (and a redis-server) and waiting until
it answers, RSS and CPU of a process tree (meterline's supervisor, sinks process and forwarders), stopping."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    """Resident set size from /proc/PID/status (VmRSS), in MiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_split_mib(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) from /proc/PID/status, in MiB: heap and native allocators, and the pages
    of mapped files (mostly shared libraries' code, resident once first run)."""
    found = {"RssAnon:": float("nan"), "RssFile:": float("nan")}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(" ", 1)[0].split("\t", 1)[0]
            if key in found:
                found[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found["RssAnon:"], found["RssFile:"]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET (any status counts as an answer), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


class StartFailed(RuntimeError):
    pass


@dataclass
class Service:
    """One server process of the benchmark, with its log file."""

    name: str
    cmd: list[str]
    ready_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, cwd=self.cwd, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartFailed(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if http_status(self.ready_url, timeout=1.0) is not None:
                return self
            time.sleep(0.1)
        self.stop()
        raise StartFailed(f"{self.name} did not answer {self.ready_url} within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip()[:300] for line in text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL; only this process group (the server and any workers it started)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class RedisService:
    """A redis-server of the benchmark's own: a free loopback port, a temp directory, no persistence;
    ready once it answers PING. Stopped like a Service (its own session, SIGTERM then SIGKILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> RedisService:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StartFailed("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartFailed(f"redis-server exited with {self.proc.returncode}: see {log}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise StartFailed(f"redis-server did not answer PING on port {self.port} within {timeout:.0f} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


_TICK = os.sysconf("SC_CLK_TCK")


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICK


def process_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / _TICK  # utime, stime, cutime, cstime


def pss_mib(pid: int) -> float:
    """Proportional set size from /proc/PID/smaps_rollup, in MiB: pages shared between processes (forked
    children share the supervisor's) count once across them, so a tree's PSS adds up; NaN once gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process: /proc/PID/task/*/children, or a scan of every process's parent."""
    out: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
        return out
    except FileNotFoundError:  # no CONFIG_PROC_CHILDREN (or the process is gone): scan the parents
        pass
    except OSError:
        return out
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants, parent first."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        if p not in seen:
            seen.append(p)
            todo += child_pids(p)
    return seen


def tree_roles(root: int, sinks_pid: int | None = None) -> dict[int, str]:
    """pid -> role for a process tree: the root is "supervisor"; each child of the root (and what it
    started) is "sinks" when it is `sinks_pid`, else "forwarder". Without `sinks_pid` (a system of one
    process, or healthz did not say) the root is "main" and everything below it "children"."""
    roles = {root: "supervisor" if sinks_pid is not None else "main"}
    for child in child_pids(root):
        role = "children" if sinks_pid is None else ("sinks" if child == sinks_pid else "forwarder")
        for p in tree_pids(child):
            roles[p] = role
    return roles


@dataclass
class TreeSample:
    """CPU seconds and RSS of a process tree at one moment, per role and in total ("total")."""

    cpu_s: dict[str, float]
    rss_mib: dict[str, float]
    pids: dict[str, list[int]]

    def cpu_since(self, before: TreeSample) -> dict[str, float]:
        """CPU seconds per role between two samples. A child that exited and was reaped in between moves
        its CPU into the supervisor's (cutime), so the total stays right while the split shifts."""
        return {role: self.cpu_s[role] - before.cpu_s.get(role, 0.0) for role in self.cpu_s}


def sample_tree(root: int, sinks_pid: int | None = None, companions: dict[str, int] | None = None) -> TreeSample:
    """The tree under `root` by role, plus `companions` (role -> pid of a server the system depends on and
    nothing else uses, e.g. its redis-server), so their work counts in its CPU per call."""
    roles = tree_roles(root, sinks_pid)
    for role, pid in (companions or {}).items():
        for p in tree_pids(pid):
            roles[p] = role
    cpu: dict[str, float] = {"total": 0.0}
    rss: dict[str, float] = {"total": 0.0}
    pids: dict[str, list[int]] = {}
    for pid, role in roles.items():
        c, r = process_cpu_s(pid), rss_mib(pid) or 0.0
        cpu[role] = cpu.get(role, 0.0) + c
        rss[role] = rss.get(role, 0.0) + r
        cpu["total"] += c
        rss["total"] += r
        pids.setdefault(role, []).append(pid)
    return TreeSample(cpu, rss, pids)


class ForeignCpu:
    """How many cores processes other than this benchmark's used during a window (others' tests, say).
    `pids` are the roots of the benchmark's servers; their whole trees count as the benchmark's."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system + sum(
            process_cpu_s(p) for root in self.pids for p in tree_pids(root))
        return time.monotonic(), _busy_cpu_s(), ours

    def cores(self) -> float:
        wall0, busy0, ours0 = self.start
        wall1, busy1, ours1 = self._snapshot()
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / max(1e-9, wall1 - wall0))
