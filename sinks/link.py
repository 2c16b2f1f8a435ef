"""The forwarder's side of the local socket to the sinks process: what it asks, with the waits that suit each."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import rpc

log = logging.getLogger("meterline.link")

START_WAIT_S = 120.0  # a forwarder starting while the sinks process restarts waits this long for it


class Link:
    def __init__(self, path: str) -> None:
        self.path = path
        self.waiting: set[asyncio.Task[Any]] = set()

    async def call(self, op: str, *args: Any, timeout: float | None = 30.0) -> Any:
        task = asyncio.ensure_future(rpc.call(self.path, op, *args, timeout=timeout))
        self.waiting.add(task)
        task.add_done_callback(self.waiting.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()  # the asker went away: closing the connection stops the work there
            raise

    def cancel_all(self) -> None:
        """At shutdown: every request still waiting is given up (a running query is interrupted)."""
        for task in list(self.waiting):
            task.cancel()

    async def db(self, name: str, *args: Any) -> Any:
        """A ledger/budget_store function, run by the sinks process on the ledger."""
        return await self.call("db", name, *args)

    async def sync(self, timeout: float = 10.0) -> bool:
        """Waits until the sinks process has committed everything journaled before this call."""
        return await self.call("sync", timeout, timeout=timeout + 5.0)

    async def wait_ready(self, timeout: float = START_WAIT_S) -> None:
        """Start-up: budgets need the ledger's history, so a forwarder waits for the sinks process."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        said = False
        while True:
            try:
                await self.call("ping", timeout=5.0)
                return
            except rpc.Unavailable as e:
                if loop.time() > deadline:
                    raise RuntimeError(f"{e}; waited {timeout:.0f} s") from None
                if not said and loop.time() > deadline - timeout + 2.0:
                    log.warning("waiting for the sinks process (%s)", e)
                    said = True
                await asyncio.sleep(0.05)
