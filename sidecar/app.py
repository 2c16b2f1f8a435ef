"""Assembles the sidecar: the aiohttp application, its routes, and the start-up and shutdown of its parts."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys

from aiohttp import web

from exporters.alerts import AlertDispatcher
from exporters.telemetry import Telemetry
from ledger import budget_store
from ledger.budgets import CrossingNote
from ledger.pricing import Pricer
from ledger.writer import LedgerWriter

from . import admin, dashboard, proxy, server
from .config import Config
from .guard import Guard
from .runtime import Runtime
from .upstream import Pool

log = logging.getLogger("meterline")
GC_THRESHOLD = 10_000  # allocations between young-generation collections (Python's default: 700)
SWITCH_INTERVAL_S = 0.0005  # how long a thread may keep the GIL when another wants it (default 5 ms)


def build(config: Config) -> web.Application:
    """The application; the ledger opens (and the journal replays) when it starts up."""
    app = web.Application(client_max_size=server.MAX_BODY)
    writer = LedgerWriter(config.ledger_path, memory_limit=config.ledger_memory_limit, threads=config.ledger_threads)
    pricer = Pricer(config.prices, config.default_max_output_tokens)
    alerts = AlertDispatcher(config.alerts, persist=lambda crossing, call_id: _persist_alert(writer, crossing, call_id))
    telemetry = Telemetry(config.telemetry, os.environ, config.app)
    rt = Runtime(config=config, writer=writer, pricer=pricer,
                 guard=Guard(config.budgets, pricer, writer, alerts, telemetry.set_budget_utilization),
                 telemetry=telemetry, tracing=telemetry.tracing_enabled, capture_content=telemetry.capture_content)
    writer.sinks.append(telemetry)
    telemetry.register_gauge("meterline.ledger.pending", "{record}", "Call records not yet committed to the ledger",
                             lambda: writer.pending)
    telemetry.register_gauge("meterline.ledger.write_lag", "s", "From a call's end to its row being committed",
                             lambda: writer.last_lag_s)
    app[proxy.RUNTIME] = rt
    admin.add_routes(app)
    dashboard.add_routes(app)
    app.router.add_route("*", "/{upstream}/{tail:.*}", proxy.handle)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application):
    rt = app[proxy.RUNTIME]
    loop = asyncio.get_running_loop()
    # DuckDB and the price catalogue load on a thread: start-up I/O stays off the loop too
    replayed = await loop.run_in_executor(None, rt.writer.open)
    await loop.run_in_executor(None, rt.pricer.warm)
    if replayed:
        log.info("recovered %d calls from the journal", replayed)
    rt.writer.journal.defer = loop.call_soon
    rt.writer.start()
    rt.telemetry.start()
    await rt.guard.start()
    rt.pool = Pool(rt.config.connect_timeout_s, rt.config.read_timeout_s)
    rt.guard.alerts.start()  # webhooks on its own httpx2 client
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
    # The ledger writer and the span exporter run Python on their threads in bursts; when the loop
    # wants the GIL back it waits up to the switch interval each time (5 ms by default: p99 at one
    # connection 11-14 ms; at 0.5 ms, 6.5-8 ms)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    yield
    sys.setswitchinterval(switch)
    gc.set_threshold(*thresholds)
    gc.unfreeze()  # shutting down: let what start-up made be collected (DuckDB's objects among them)
    await rt.guard.alerts.stop()
    rt.pool.close()
    await loop.run_in_executor(None, rt.writer.stop)
    await loop.run_in_executor(None, rt.telemetry.shutdown, 5.0)


def _persist_alert(writer: LedgerWriter, crossing: CrossingNote, call_id: str | None) -> None:
    cur = writer.cursor()
    try:
        budget_store.save_alert(cur, crossing, call_id)
    finally:
        cur.close()


async def serve(config: Config) -> None:
    """Runs until cancelled (SIGINT/SIGTERM handled by the caller)."""
    app = build(config)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    assert runner.server is not None
    # the front takes proxied calls itself and hands every other connection to aiohttp's protocol
    try:
        listener = await server.serve(app[proxy.RUNTIME], proxy.forward, runner.server, config.host, config.port)
    except BaseException:  # e.g. the port is taken: close the ledger before the error is reported
        await runner.cleanup()
        raise
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
