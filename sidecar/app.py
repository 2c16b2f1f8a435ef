"""Assembles a forwarder: the aiohttp application, its routes, and the start-up and shutdown of its parts.

A forwarder takes calls and journals them; the sinks process (sinks/) turns the journal into the
ledger, telemetry and alerts, and answers the forwarder's questions over a local socket. `serve`
runs a forwarder under the supervisor (sidecar/supervisor.py). Without a sinks socket given,
`build` runs a sinks service inside the forwarder's process, on its loop: the same code, for the
demo and for tests that drive the application in-process.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from exporters.settings import load_settings, tracing_enabled
from ledger.journal import Journal
from ledger.pricing import Pricer
from ledger.defaults import journal_dir, read_salt
from sinks import rpc
from sinks.link import Link

from . import admin, dashboard, proxy, server
from .config import Config
from .guard import Guard
from .runtime import Runtime
from .routes import attempts as route_attempts
from .upstream import Pool

log = logging.getLogger("meterline")
GC_THRESHOLD = 10_000  # allocations between young-generation collections (Python's default: 700)
SWITCH_INTERVAL_S = 0.0005  # how long a thread may keep the GIL when another wants it (default 5 ms)
FALLBACK_EVERY_S = 0.25  # how often lines the journal's disk refused are sent to the sinks process
EMBEDDED_SINKS = web.AppKey("embedded_sinks", object)


def worker_dir(config: Config, worker: int) -> Path:
    """A forwarder's journal directory: one per worker slot, read by the sinks process."""
    return journal_dir(config.ledger_path) / f"w{worker}"


def build(config: Config, worker: int = 0, sinks_socket: str | None = None) -> web.Application:
    """The forwarder's application; its journal opens and its budgets load when it starts up."""
    app = web.Application(client_max_size=server.MAX_BODY)
    if sinks_socket is None:
        private = tempfile.mkdtemp(prefix="meterline-")  # mode 0700: the socket is this user's alone
        sinks_socket = os.path.join(private, "sinks.sock")
        app[EMBEDDED_SINKS] = private
    settings = load_settings(config.telemetry, os.environ, config.app)
    journal = Journal(worker_dir(config, worker))
    link = Link(sinks_socket)
    pricer = Pricer(config.prices, config.default_max_output_tokens)
    tracing = tracing_enabled(settings)
    rt = Runtime(config=config, journal=journal, link=link, pricer=pricer,
                 guard=Guard(config.budgets, pricer, link, journal.flush, config.jobs, config.fleet),
                 tracing=tracing, capture_content=settings.capture_content and tracing,
                 routes=route_attempts.table(config.routes, config.upstreams))
    app[proxy.RUNTIME] = rt
    admin.add_routes(app)
    dashboard.add_routes(app)
    app.router.add_route("*", "/{upstream}/{tail:.*}", proxy.handle)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application):
    rt = app[proxy.RUNTIME]
    loop = asyncio.get_running_loop()
    embedded = None
    if EMBEDDED_SINKS in app:
        embedded = await _start_embedded(rt)
    await rt.link.wait_ready()
    rt.salt = await loop.run_in_executor(None, read_salt, rt.config.ledger_path)
    await loop.run_in_executor(None, rt.journal.open)  # waits for the lock of a forwarder still exiting
    rt.journal.defer = loop.call_soon
    await loop.run_in_executor(None, rt.pricer.warm)
    await rt.guard.start()
    rt.pool = Pool(rt.config.connect_timeout_s, rt.config.read_timeout_s)
    sender = loop.create_task(_send_unwritten(rt), name="meterline-journal-fallback")
    job_sync = loop.create_task(rt.guard.sync_jobs_forever(), name="meterline-job-settlements")
    # what start-up loaded (the price catalogue, DuckDB's and Arrow's modules) lives as long as the
    # process: moved out of the collector's sight, a full collection walks only what calls create
    # (75 ms pauses at 1 connection before, by gc.callbacks)
    gc.collect()
    gc.freeze()
    # A call frees its own objects as it ends (no reference cycles: tests/test_call_garbage.py), so
    # the collector has little to find; at the default threshold (700 allocations) it still ran
    # every ~30 calls under load, walking every object in flight, and held the GIL while it did.
    thresholds = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
    # Threads that run Python in bursts (the embedded sinks' writer and exporter; the executor's
    # workers): when the loop wants the GIL back it waits up to the switch interval each time
    # (5 ms by default: p99 at one connection 11-14 ms with the sinks in-process; at 0.5 ms, 6.5-8 ms)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    yield
    sys.setswitchinterval(switch)
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    sender.cancel()
    job_sync.cancel()
    await rt.guard.stop()
    rt.pool.close()
    await loop.run_in_executor(None, rt.journal.close)
    if embedded is not None:
        sinks, listener = embedded
        listener.close()
        await sinks.stop()
        shutil.rmtree(app[EMBEDDED_SINKS], ignore_errors=True)


async def _send_unwritten(rt: Runtime) -> None:
    """While the journal's disk refuses lines, copies of them go to the sinks process over the
    socket, so the ledger keeps up (the journal writes them too once the disk has room)."""
    while True:
        await asyncio.sleep(FALLBACK_EVERY_S)
        lines = rt.journal.uncopied()
        if lines:
            try:
                await rt.link.call("lines", rt.journal.dir.name, lines)
            except (rpc.Unavailable, rpc.Failed) as e:
                rt.journal.copied = 0  # sent again next time (the sinks process skips what it has)
                log.warning("could not send %d journal lines to the sinks process: %s", len(lines), e)


async def _start_embedded(rt: Runtime):  # -> (Sinks, server)
    from sinks.service import Sinks  # DuckDB and the OpenTelemetry SDK load only where they are used

    sinks = Sinks(rt.config)
    await asyncio.get_running_loop().run_in_executor(None, sinks.open)
    listener = await rpc.serve(rt.link.path, sinks.handle)
    sinks.start(asyncio.get_running_loop())
    return sinks, listener


async def serve(config: Config, worker: int = 0, sinks_socket: str | None = None,
                sock: socket.socket | None = None) -> None:
    """Runs a forwarder until cancelled (SIGINT/SIGTERM handled by the caller), on `sock` when the
    supervisor gives one (it binds the port), else on config.host:config.port."""
    app = build(config, worker, sinks_socket)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    assert runner.server is not None
    # the front takes proxied calls itself and hands every other connection to aiohttp's protocol
    try:
        listener = await server.serve(app[proxy.RUNTIME], proxy.forward, runner.server, config.host, config.port,
                                      sock=sock)
    except BaseException:  # e.g. the port is taken: close the journal before the error is reported
        await runner.cleanup()
        raise
    if sinks_socket is None:  # under the supervisor, it says where it listens
        log.info("meterline listening on http://%s:%d (ledger %s)", config.host, config.port, config.ledger_path)
        print(f"meterline listening on http://{config.host}:{config.port}  ledger: {config.ledger_path}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        listener.close()
        server.close_idle()
        await _drain(app[proxy.RUNTIME], timeout_s=10.0)
        server.close_idle()
        await runner.cleanup()


async def _drain(rt: Runtime, timeout_s: float) -> None:
    """Lets the calls in flight on the front's connections finish (aiohttp drains its own)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while rt.in_flight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
