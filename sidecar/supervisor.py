"""`meterline serve`: binds the port, then starts and watches the sinks process and N forwarders.

    supervisor ── sinks (1): journals into DuckDB, telemetry, alerts, SQL    (sinks/main.py)
               └─ forwarder (1..N): the front, upstream calls, budgets, journal (sidecar/app.py)

The supervisor binds one listening socket per forwarder slot (SO_REUSEPORT when N > 1: the kernel
spreads connections) and keeps it: a forwarder restarted in its slot takes the same socket, so the
connections that arrived while it was down wait in the backlog instead of being refused. Children
are forked from this process before it starts any thread or loop, and die with it
(PR_SET_PDEATHSIG): a killed supervisor leaves nothing holding the ledger or the port.

A child that exits is started again: at once if it ran STABLE_S, else after a wait that doubles
from 0.2 s up to 5 s while it keeps failing quickly. The first start of the sinks process failing
(a ledger in use, a bad file) ends `serve` with its message. SIGTERM or SIGINT drains: forwarders
first (their calls in flight finish and are journaled), then the sinks process (it reads the
journals one last time and commits).
Children ignore SIGINT: a Ctrl-C reaches the whole process group, and the order matters.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from sinks import rpc

from .config import Config

log = logging.getLogger("meterline.supervisor")

READY_WAIT_S = 120.0  # the sinks process's first start: opening the ledger and catching up on the journals
STOP_WAIT_S = 15.0  # per stage of a drain, before SIGKILL
MAX_BACKOFF_S = 5.0
STABLE_S = 10.0  # a child that ran this long and then exited is restarted at once
_PR_SET_PDEATHSIG = 1
SINKS_NICE = 10


@dataclass
class _Child:
    role: str  # "sinks" or "forwarder <k>"
    pid: int = 0
    started: float = 0.0
    backoff: float = 0.1
    restarts: int = 0
    due: float = 0.0  # when to start it again, after it exited


@dataclass
class _State:
    stopping: bool = False
    children: dict[str, _Child] = field(default_factory=dict)


def bind(host: str, port: int, workers: int) -> list[socket.socket]:
    """The listening sockets, one per forwarder slot; OSError (e.g. EADDRINUSE) before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(workers):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if workers > 1:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            port = s.getsockname()[1]  # --port 0: every slot on the port the first one got
            s.listen(1024)
            s.set_inheritable(True)
            socks.append(s)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def run(config: Config, workers: int) -> int:
    """Serves until SIGTERM/SIGINT; returns the process's exit status."""
    socks = bind(config.host, config.port, workers)
    private = tempfile.mkdtemp(prefix="meterline-")  # 0700: the sinks socket is this user's alone
    path = os.path.join(private, "sinks.sock")
    state = _State()
    me = os.getpid()

    def on_signal(signum: int, frame: object) -> None:
        state.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sinks = state.children["sinks"] = _Child("sinks")
        _start(sinks, lambda: _sinks_main(config, path, me))
        failure = _wait_ready(sinks, path, state)
        if failure is not None:
            return failure
        for k in range(workers):
            child = state.children[f"forwarder {k}"] = _Child(f"forwarder {k}")
            _start(child, lambda k=k: _forwarder_main(config, k, path, socks[k], me))
        where = f"http://{config.host}:{socks[0].getsockname()[1]}"
        shown = f"{workers} forwarders" if workers > 1 else "1 forwarder"
        log.info("meterline listening on %s (ledger %s; %s and the sinks process)", where, config.ledger_path, shown)
        print(f"meterline listening on {where}  ledger: {config.ledger_path}", flush=True)
        _watch(state, config, path, socks, me)
        return 0
    finally:
        _drain(state)
        for s in socks:
            s.close()
        shutil.rmtree(private, ignore_errors=True)


def _start(child: _Child, main) -> None:  # main: () -> int, run in the forked child
    pid = os.fork()
    if pid == 0:  # the child
        status = 70
        try:
            multiprocessing.current_process().name = child.role  # shown in log lines (%(processName)s)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            status = main()
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a child never returns into the supervisor's code
            logging.getLogger("meterline").exception("%s failed", child.role)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    child.pid = pid
    child.started = time.monotonic()


def _die_with(parent: int) -> None:
    """Asks the kernel to SIGKILL this process when the supervisor dies (Linux); elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def _sinks_main(config: Config, path: str, parent: int) -> int:
    _die_with(parent)
    # When the machine's cores are all busy, calls come first: the sinks process's work waits in
    # the journal and is caught up as soon as a core is free (its lag shows in healthz)
    os.nice(SINKS_NICE)
    from sinks import main

    return main.run(config, path)


def _forwarder_main(config: Config, worker: int, path: str, sock: socket.socket, parent: int) -> int:
    _die_with(parent)
    import asyncio

    from . import app

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await app.serve(config, worker, path, sock)
        except asyncio.CancelledError:
            pass

    try:
        import uvloop
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(run())
    return 0


def _wait_ready(sinks: _Child, path: str, state: _State) -> int | None:
    """Until the sinks process answers; its exit before that ends `serve` (it said why on stderr)."""
    deadline = time.monotonic() + READY_WAIT_S
    while not state.stopping:
        pid, status = os.waitpid(sinks.pid, os.WNOHANG)
        if pid:
            sinks.pid = 0
            code = os.waitstatus_to_exitcode(status)
            if code != 3:
                print(f"meterline: the sinks process exited ({_how(code)}) while starting", file=sys.stderr)
            return 1
        try:
            rpc.call_blocking(path, "ping", timeout=1.0)
            return None
        except rpc.Unavailable:
            pass
        if time.monotonic() > deadline:
            print(f"meterline: the sinks process did not start within {READY_WAIT_S:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def _watch(state: _State, config: Config, path: str, socks: list[socket.socket], me: int) -> None:
    while not state.stopping:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        now = time.monotonic()
        if pid:
            for child in state.children.values():
                if child.pid == pid:
                    child.pid = 0
                    ran = now - child.started
                    child.backoff = 0.1 if ran > STABLE_S else min(MAX_BACKOFF_S, child.backoff * 2)
                    child.due = now + (0.0 if ran > STABLE_S else child.backoff)
                    log.error("%s exited (%s) after %.1f s; starting it again", child.role,
                              _how(os.waitstatus_to_exitcode(status)), ran)
            continue
        for child in state.children.values():
            if child.pid == 0 and now >= child.due:
                child.restarts += 1
                if child.role == "sinks":
                    _start(child, lambda: _sinks_main(config, path, me))
                else:
                    k = int(child.role.split()[1])
                    _start(child, lambda k=k: _forwarder_main(config, k, path, socks[k], me))
        time.sleep(0.05)


def _drain(state: _State) -> None:
    """Forwarders first, then the sinks process; SIGKILL for any that outstays STOP_WAIT_S."""
    forwarders = [c for c in state.children.values() if c.role != "sinks"]
    sinks = [c for c in state.children.values() if c.role == "sinks"]
    for stage in (forwarders, sinks):
        live = [c for c in stage if c.pid]
        for c in live:
            _signal(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while any(c.pid for c in live):
            for c in live:
                if c.pid:
                    try:
                        pid, _ = os.waitpid(c.pid, os.WNOHANG)
                    except ChildProcessError:
                        pid = c.pid
                    if pid:
                        c.pid = 0
            if time.monotonic() > deadline:
                for c in live:
                    if c.pid:
                        log.error("%s did not stop within %.0f s: killed", c.role, STOP_WAIT_S)
                        _signal(c.pid, signal.SIGKILL)
                        os.waitpid(c.pid, 0)
                        c.pid = 0
            time.sleep(0.02)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"

