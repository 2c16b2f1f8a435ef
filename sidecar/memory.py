"""Gives memory back to the system after a call that buffered a lot (glibc's `malloc_trim`).

glibc keeps what a process frees for its own reuse: after a call with a 100 MB body its heap stays
grown (and its mmap threshold rises, so the next big buffer lands there too). `malloc_trim(0)`
returns the free pages. It runs on a worker thread, at most once per MIN_INTERVAL_S, and only after
a call whose request and response together passed TRIM_AFTER_BYTES: ordinary calls cost one
comparison. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging

TRIM_AFTER_BYTES = 8 * 1024 * 1024
MIN_INTERVAL_S = 5.0
DELAY_S = 0.5  # lets the call's buffers be freed first (the app may still be reading the response)

log = logging.getLogger("meterline")


def _load_trim():
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


class _State:
    scheduled = False
    last = -MIN_INTERVAL_S  # loop time of the last trim
    trims = 0


def after_call(buffered: int) -> None:
    """Called as a call ends with the bytes it buffered (request and response)."""
    if buffered < TRIM_AFTER_BYTES or _TRIM is None or _State.scheduled:
        return
    loop = asyncio.get_running_loop()
    _State.scheduled = True
    loop.call_later(max(DELAY_S, _State.last + MIN_INTERVAL_S - loop.time()), _run, loop)


def _run(loop: asyncio.AbstractEventLoop) -> None:
    _State.last = loop.time()
    try:
        loop.run_in_executor(None, _trim).add_done_callback(_done)
    except RuntimeError:  # shutting down: the executor is gone
        _State.scheduled = False


def _trim() -> int:
    return _TRIM(0) if _TRIM is not None else 0


def trim() -> int:
    """Gives freed heap back to the system now (any thread; it takes milliseconds): for the sinks
    process once a backlog it held in memory is written."""
    return _trim()


def _done(future: asyncio.Future) -> None:
    _State.scheduled = False
    _State.trims += 1
    if future.exception() is not None:
        log.debug("malloc_trim failed: %s", future.exception())
