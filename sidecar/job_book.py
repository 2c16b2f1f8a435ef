"""The forwarder's book of async jobs: which jobs it holds budget reservations for, their batch output files, and recent idempotent submits.

It lives in the guard (`Guard.jobs`), keyed by (upstream, provider job id), and runs on the event
loop: every method is a dict operation. After a restart it is filled again from the ledger's
unsettled jobs (Guard.start), so a reservation survives the forwarder.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from jobs.model import JobAsk
from jobs.settings import JobsConfig
from ledger.budgets import Reservation

MAX_REPLAYS = 10_000  # idempotent submits remembered at most (the oldest go first)


@dataclass(slots=True)
class Held:
    """A job the forwarder knows: what settles it, and the reservation it holds until then."""

    job_id: str | None  # None: a job first seen by a poll (submitted before this sidecar saw it)
    upstream: str
    provider: str
    kind: str  # the job module's KIND ("" when rebuilt: the upstream's adapter says)
    model: str | None
    units: dict[str, Any]
    estimate: Decimal | None
    reservation: Reservation
    submitted_at: datetime | None
    provider_job_id: str | None = None
    output_file_id: str | None = None


@dataclass(slots=True)
class Replay:
    """A submit made with an Idempotency-Key: repeated soon with the same body, it gets this answer."""

    at: float  # time.monotonic()
    digest: bytes
    status: int | None = None  # None while the first is still in flight
    body: bytes = b""
    job_id: str | None = None


@dataclass(slots=True)
class JobBook:
    config: JobsConfig = field(default_factory=JobsConfig)
    held: dict[tuple[str, str], Held] = field(default_factory=dict)
    files: dict[tuple[str, str], Held] = field(default_factory=dict)
    replays: dict[tuple[str, str], Replay] = field(default_factory=dict)

    def hold(self, h: Held) -> None:
        if h.provider_job_id:
            self.held[(h.upstream, h.provider_job_id)] = h
        if h.output_file_id:
            self.files[(h.upstream, h.output_file_id)] = h

    def drop(self, h: Held) -> None:
        if h.provider_job_id and self.held.get((h.upstream, h.provider_job_id)) is h:
            del self.held[(h.upstream, h.provider_job_id)]
        if h.output_file_id and self.files.get((h.upstream, h.output_file_id)) is h:
            del self.files[(h.upstream, h.output_file_id)]

    def by_job_id(self) -> dict[str, Held]:
        return {h.job_id: h for h in {id(h): h for h in (*self.held.values(), *self.files.values())}.values()
                if h.job_id}

    # --- Idempotency-Key ------------------------------------------------------------------------

    def replay_of(self, upstream: str, key: str, ask: JobAsk, raw: bytes) -> tuple[Replay | None, bytes]:
        """The earlier submit this one repeats (same key, same body, within `idempotency_s`), and the
        digest to remember this one by."""
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        now = time.monotonic()
        found = self.replays.get((upstream, key))
        if found is not None and (now - found.at > self.config.idempotency_s or found.digest != digest):
            del self.replays[(upstream, key)]
            found = None
        return found, digest

    def remember(self, upstream: str, key: str, digest: bytes) -> Replay:
        if len(self.replays) >= MAX_REPLAYS:
            del self.replays[next(iter(self.replays))]
        r = self.replays[(upstream, key)] = Replay(time.monotonic(), digest)
        return r

    def forget(self, upstream: str, key: str, replay: Replay) -> None:
        if self.replays.get((upstream, key)) is replay:
            del self.replays[(upstream, key)]
