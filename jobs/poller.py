"""The sinks process's own polls of unfinished jobs, so a job settles even when the app never asks again.

Once per tick it reads the unsettled jobs from the ledger. A job whose upstream has `api_key:` in
the config is polled at the provider (first jobs.poll_s after its submit, then at doubling
intervals up to jobs.max_poll_s); a job with no terminal state jobs.unknown_after_s after its
submit becomes `unknown` at its estimate. What it learns becomes job events, applied to the
`jobs` table like the forwarders' (jobs/store.py); the forwarders' guards read the settlements
from there (Guard.sync_jobs). A provider that fails or answers nonsense is asked again later.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson

from . import openai_batch
from .kinds import BY_ADAPTER
from .model import TERMINAL, UNKNOWN, JobEvent, settle_cost
from .settings import JobsConfig
from .store import PriceUnits

log = logging.getLogger("meterline.jobs")


@dataclass(frozen=True, slots=True)
class Target:
    """An upstream as the poller needs it (plain data: the sinks process's view of the config)."""

    base_url: str
    adapter: str
    api_key: str | None


Fetch = Callable[[str, dict[str, str]], Awaitable[tuple[int, bytes]]]  # GET url with headers -> (status, body)
Run = Callable[..., Awaitable[Any]]  # runs a jobs/store.py function on the ledger (a worker thread)
# one batch request's cost at batch rates: (provider, model, usage counts, at) -> USD, None when unpriced
PriceBatch = Callable[[str, "str | None", dict[str, int], datetime], "Decimal | None"]
MAX_OUTPUT_FILE = 512 * 1024 * 1024  # a batch output file larger than this is not downloaded here


class Poller:
    def __init__(self, config: JobsConfig, upstreams: dict[str, Target], fetch: Fetch, run: Run,
                 price: PriceUnits, price_batch: PriceBatch | None = None) -> None:
        self.config = config
        self.upstreams = upstreams
        self.fetch = fetch
        self.run = run
        self.price = price
        self.price_batch = price_batch
        self.next_at: dict[str, datetime] = {}  # job id -> when to poll it next
        self.tries: dict[str, int] = {}
        self.polled = 0
        self.failed = 0
        self.settled = 0

    @property
    def tick_s(self) -> float:
        return max(0.1, min(self.config.poll_s / 2, 5.0))

    async def forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad pass is logged; the next tick tries again
                log.exception("polling jobs failed")

    async def once(self, now: datetime | None = None) -> int:
        """One pass over the unsettled jobs; returns the events applied."""
        now = now or datetime.now(timezone.utc)
        events: list[JobEvent] = []
        jobs = await self.run("unsettled_jobs")
        live = set()
        for job in jobs:
            job_id = job["job_id"]
            live.add(job_id)
            submitted = job["submitted_at"] or now
            if now - submitted >= timedelta(seconds=self.config.unknown_after_s):
                estimate = Decimal(job["estimate_usd"]) if job["estimate_usd"] is not None else None
                cost, source = settle_cost(UNKNOWN, None, None, estimate)
                events.append(JobEvent("settle", job_id, job["upstream"], job["provider_job_id"], UNKNOWN, now,
                                       cost_usd=cost, cost_source=source))
                continue
            target = self.upstreams.get(job["upstream"])
            if target is None or not target.api_key or not job["provider_job_id"]:
                continue  # no key to poll with
            if job["output_file_id"] and (target.adapter != "openai" or self.price_batch is None):
                continue  # (only a batch has an output file)
            due = self.next_at.setdefault(job_id, submitted + timedelta(seconds=self.config.poll_s))
            if now < due:
                continue
            tries = self.tries[job_id] = self.tries.get(job_id, 0) + 1
            self.next_at[job_id] = now + timedelta(seconds=min(self.config.poll_s * 2 ** tries, self.config.max_poll_s))
            event = await (self._download(job, target, now) if job["output_file_id"] else self._poll(job, target, now))
            if event is not None:
                events.append(event)
        for gone in set(self.next_at) - live:
            self.next_at.pop(gone, None)
            self.tries.pop(gone, None)
        if events:
            await self.run("apply_job_events", events)
            self.settled += sum(1 for e in events if e.event == "settle")
        return len(events)

    async def _download(self, job: dict[str, Any], target: Target, now: datetime) -> JobEvent | None:
        """A finished batch the app has not downloaded: its output file, every line priced at batch rates."""
        assert self.price_batch is not None
        url = f"{target.base_url}/v1/files/{job['output_file_id']}/content"
        self.polled += 1
        try:
            status, body = await self.fetch(url, {"Authorization": f"Bearer {target.api_key}"})
        except Exception as e:  # noqa: BLE001 - asked again at the next interval
            self.failed += 1
            log.warning("downloading batch %s's output file failed: %s", job["provider_job_id"], e)
            return None
        if status >= 400 or len(body) > MAX_OUTPUT_FILE:
            self.failed += 1
            log.warning("batch %s's output file: %s answered %s", job["provider_job_id"], target.base_url, status)
            return None
        total: Decimal | None = Decimal(0)
        lines = 0
        models = set()
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                got = openai_batch.line_usage(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
            if got is None:
                continue
            model, counts = got
            lines += 1
            models.add(model)
            cost = self.price_batch(job["provider"] or "openai", model, counts, job["submitted_at"] or now)
            if cost is None:
                total = None
            elif total is not None:
                total += cost
        model = models.pop() if len(models) == 1 else None
        source = "price" if total is not None else None
        return JobEvent("settle", job["job_id"], job["upstream"], job["provider_job_id"], None, now, model=model,
                        units_made={"requests": lines}, cost_usd=total, cost_source=source)

    async def _poll(self, job: dict[str, Any], target: Target, now: datetime) -> JobEvent | None:
        module = BY_ADAPTER.get(target.adapter)
        if module is None:
            return None
        url, headers = module.poll_request(target.base_url, job["provider_job_id"], target.api_key or "")
        self.polled += 1
        try:
            status, body = await self.fetch(url, headers)
            seen = module.read(orjson.loads(body)) if status < 400 else None
        except Exception as e:  # noqa: BLE001 - the provider is asked again at the next interval
            self.failed += 1
            log.warning("polling job %s at %s failed: %s", job["job_id"], target.base_url, e)
            return None
        if seen is None or seen.state is None:
            self.failed += 1
            log.warning("polling job %s: %s answered %s with no job state", job["job_id"], target.base_url, status)
            return None
        if seen.state not in TERMINAL or (seen.output_file_id and module.KIND == "openai_batch"):
            return JobEvent("poll", job["job_id"], job["upstream"], job["provider_job_id"], seen.state, now,
                            output_file_id=seen.output_file_id)
        made = module.units_made(job["units_asked"] or {}, seen)
        made_cost = self.price(job["provider"] or "", job["model"], made, now) if made else None
        estimate = Decimal(job["estimate_usd"]) if job["estimate_usd"] is not None else None
        cost, source = settle_cost(seen.state, seen.provider_cost_usd, made_cost, estimate)
        return JobEvent("settle", job["job_id"], job["upstream"], job["provider_job_id"], seen.state, now,
                        units_made=made or None, cost_usd=cost, cost_source=source)
