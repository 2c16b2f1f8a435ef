"""The SQL endpoint's queries in the sinks process: a bounded pool of threads, a timer that interrupts each."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor

from ledger import sql


class Busy(Exception):
    """Too many queries at once, or shutting down: the answer is a 503."""


class Queries:
    """The SQL endpoint's queries: a bounded pool of threads of their own (the loop's default executor
    stays free for the rest), each query with a timer that interrupts it. Up to QUEUED_PER_THREAD
    queries per thread wait their turn (the dashboard sends 7 at once); past that, 503."""

    QUEUED_PER_THREAD = 8
    REPEAT_S = 0.2

    def __init__(self, max_concurrent: int, timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_admitted = max_concurrent * self.QUEUED_PER_THREAD
        self.timeout_s = timeout_s
        self.executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="meterline-sql")
        self.running: dict[sql.Handle, Future] = {}  # admitted, until their thread is done with them
        self.closed = False

    async def run(self, con: object, query: str, max_rows: int) -> sql.Result:
        if self.closed:
            raise Busy("the sidecar is shutting down")
        if len(self.running) >= self.max_admitted:
            raise Busy(f"{len(self.running)} queries are running or waiting ({self.max_concurrent} at a time, "
                        "sql.max_concurrent): try again shortly")
        loop = asyncio.get_running_loop()
        handle = sql.Handle()
        future = self.executor.submit(sql.run, con, query, max_rows, handle)
        self.running[handle] = future
        future.add_done_callback(lambda _: self._done(loop, handle))
        timer = loop.call_later(self.timeout_s, self._stop, handle,
                                f"it ran longer than {self.timeout_s:g} s (sql.timeout_s)")
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler)
            self._stop(handle, "the client went away")
            raise
        finally:
            timer.cancel()

    def _stop(self, handle: sql.Handle, reason: str) -> None:
        """Interrupts the query, again every REPEAT_S until its thread is done with it: DuckDB clears an
        interrupt that lands between two statements (the read-only BEGIN and the query) when the next starts."""
        future = self.running.get(handle)
        if future is None or future.done():
            return
        handle.interrupt(reason)
        asyncio.get_running_loop().call_later(self.REPEAT_S, self._stop, handle, reason)

    def _done(self, loop: asyncio.AbstractEventLoop, handle: sql.Handle) -> None:
        try:
            loop.call_soon_threadsafe(self.running.pop, handle, None)
        except RuntimeError:  # the loop is closed: nothing left to count
            pass

    def close(self) -> None:
        """Interrupts every running query; the threads end as soon as DuckDB notices (milliseconds)."""
        self.closed = True
        for handle in list(self.running):
            self._stop(handle, "the sidecar is shutting down")
        self.executor.shutdown(wait=False, cancel_futures=True)
