"""The sinks process's main: open the ledger, catch up on the journals, answer the forwarders until SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

from ledger.defaults import is_lock_error
from sidecar.config import Config

from . import rpc
from .service import Sinks

log = logging.getLogger("meterline.sinks")

LOCK_WAIT_S = 5.0  # a sinks process killed a moment ago may still hold the ledger's lock


def run(config: Config, socket_path: str) -> int:
    """Runs until SIGTERM; a start-up failure is one line on stderr and exit status 3."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    try:
        return runner(_main(config, socket_path))
    except Exception as e:  # noqa: BLE001 - one line, as `meterline serve` says it
        print(f"meterline: {describe_start_error(e, config.ledger_path)}", file=sys.stderr, flush=True)
        return 3


def describe_start_error(e: BaseException, ledger: str) -> str:
    text = str(e).strip() or type(e).__name__
    if is_lock_error(e):
        return (f"the ledger {ledger} is in use by another process (another meterline serve?): "
                "stop it, or give this one its own --db")
    return f"cannot start: {text.splitlines()[0]}"


# The span exporter's thread encodes in pure Python for tens of milliseconds at a time; at the
# default 5 ms switch interval the writer and the tail wait that long each time they want the GIL
SWITCH_INTERVAL_S = 0.001


async def _main(config: Config, socket_path: str) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sinks = Sinks(config)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            await loop.run_in_executor(None, sinks.open)
            break
        except Exception as e:  # noqa: BLE001
            if not is_lock_error(e) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            sinks = Sinks(config)
    server = await rpc.serve(socket_path, sinks.handle)
    sinks.start(loop)
    log.info("sinks ready: ledger %s", config.ledger_path)
    await stop.wait()
    server.close()
    await sinks.stop()
    return 0
