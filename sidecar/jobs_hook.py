"""Async jobs on the forwarder's path: recognising a submit or a poll, reading its answer, and settling the job's reservation.

proxy.forward calls, in order: `classify` (after the adapter's describe), `replay` (a repeated
Idempotency-Key submit is answered from memory, not forwarded), `admit`, `observer` (instead of
the adapter's, for a job's answer), and `conclude` (instead of Guard.settle). Every step is dict
work on the event loop; the job's row is written by the sinks process from the events put on the
call's final journal line (CallExtras.jobs).
"""
from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from jobs import openai_batch
from jobs.kinds import BY_ADAPTER
from jobs.model import SUBMITTED, TERMINAL, JobAsk, JobEvent, JobPoll, JobSeen, settle_cost
from ledger.budgets import CallAttrs, Refusal, Reservation
from ledger.records import CallExtras, CallInfo, CallRecord, Observation, Usage

from .adapters.base import JsonObserver
from .config import Upstream
from .guard import NO_RESERVATION, Pending
from .job_book import Held, Replay
from .runtime import Runtime

log = logging.getLogger("meterline.jobs")
IDEMPOTENCY_HEADER = "idempotency-key"
REPLAY_HEADER = "x-meterline-idempotent-replay"
MAX_LINE = 4 * 1024 * 1024  # a batch output line longer than this is not read (its bytes still pass)


def classify(rt: Runtime, upstream: Upstream, method: str, path: str, body: Any) -> JobAsk | JobPoll | None:
    module = BY_ADAPTER.get(upstream.adapter)
    if module is None:
        return None
    job = module.ask(method, path, body, rt.config.jobs.fields)
    if job is not None:
        return job
    job = module.poll(method, path)
    if job is not None and job.file_id is not None and (upstream.name, job.file_id) not in rt.guard.jobs.files:
        return None  # a file that is no batch's output we know: an ordinary download
    return job


def model_of(rt: Runtime, upstream: Upstream, poll: JobPoll) -> str | None:
    """The model of a polled job, when this forwarder holds it."""
    book = rt.guard.jobs
    held = (book.files.get((upstream.name, poll.file_id)) if poll.file_id
            else book.held.get((upstream.name, poll.provider_job_id or "")))
    return held.model if held is not None else None


def estimate(rt: Runtime, info: CallInfo, ask: JobAsk, at: datetime) -> Decimal | None:
    return rt.pricer.units_cost(info.provider, ask.model, ask.units, at)


def admit(rt: Runtime, info: CallInfo, attrs: CallAttrs, at: datetime,
          ) -> tuple[Reservation | Refusal | Pending, Decimal | None]:
    ask = info.job
    usd = estimate(rt, info, ask, at)
    return rt.guard.admit_job(info, attrs, at, usd), usd


# --- idempotent submits --------------------------------------------------------------------------

def replay(rt: Runtime, upstream: str, headers: Any, raw: bytes, ask: JobAsk) -> tuple[Replay | None, Replay | None, str | None]:
    """(the earlier submit to answer from, this submit's own entry to fill, the key). A submit with an
    Idempotency-Key is remembered; the same key and body again within jobs.idempotency_s is
    answered with the first one's answer (or 409 while that one is in flight)."""
    key = headers.get(IDEMPOTENCY_HEADER)
    if not key:
        return None, None, None
    book = rt.guard.jobs
    found, digest = book.replay_of(upstream, key, ask, raw)
    if found is not None:
        return found, None, key
    return None, book.remember(upstream, key, digest), key


def replay_answer(found: Replay) -> tuple[int, bytes, dict[str, str]]:
    if found.status is None:
        return 409, orjson.dumps({"error": {"message": "meterline: a request with this Idempotency-Key is still "
                                                       "in flight; retry when it has been answered",
                                            "type": "idempotency_conflict"}}), {REPLAY_HEADER: "in-flight"}
    return found.status, found.body, {REPLAY_HEADER: "true"}


# --- reading the answer --------------------------------------------------------------------------

class _BatchFile:
    """Reads a batch's output file (JSON lines) as it passes: each line's model and usage, counted
    by identical (model, usage) so a million lines of a few shapes stay a few entries."""

    __slots__ = ("tail", "lines", "bad", "overflow")
    done = False

    def __init__(self) -> None:
        self.tail = bytearray()
        self.lines: Counter[tuple[str | None, tuple[tuple[str, int], ...]]] = Counter()
        self.bad = 0
        self.overflow = False

    def feed(self, chunk: bytes) -> bytes:
        if self.overflow:
            return chunk
        self.tail += chunk
        start = 0
        while (end := self.tail.find(b"\n", start)) >= 0:
            self._line(bytes(self.tail[start:end]))
            start = end + 1
        del self.tail[:start]
        if len(self.tail) > MAX_LINE:
            self.overflow = True
            self.tail.clear()
        return chunk

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            got = openai_batch.line_usage(orjson.loads(line))
        except orjson.JSONDecodeError:
            self.bad += 1
            return
        if got is not None:
            model, counts = got
            self.lines[(model, tuple(sorted(counts.items())))] += 1

    def leftover(self) -> bytes:
        return b""

    def finish(self) -> Observation:
        if self.tail and not self.overflow:
            self._line(bytes(self.tail))
        seen = JobSeen(lines=[(model, dict(counts), n) for (model, counts), n in self.lines.items()])
        anomaly = "event_too_large" if self.overflow else "malformed_event" if self.bad else None
        return Observation(job=seen, anomaly=anomaly)


def observer(rt: Runtime, upstream: Upstream, info: CallInfo, status: int) -> Any:
    """The observer of a job call's answer (None: the adapter's own, e.g. for an error)."""
    job = info.job
    if job is None or status >= 400:
        return None
    if isinstance(job, JobPoll) and job.file_id is not None:
        return _BatchFile()
    module = BY_ADAPTER[upstream.adapter]

    def extract(doc: Any) -> Observation:
        seen = module.read(doc)
        model = seen.model if seen else None
        obs = Observation(job=seen, response_model=model)
        if seen is not None and isinstance(job, JobAsk):
            obs.response_id = seen.provider_job_id
            seen.units_made = dict(seen.units_made)
            seen.reply = orjson.dumps(doc)  # for an idempotent replay
        return obs

    return JsonObserver(extract)


# --- settling ------------------------------------------------------------------------------------

def conclude(rt: Runtime, upstream: Upstream, info: CallInfo, observation: Observation, record: CallRecord,
             decision: Any, extras: CallExtras, est: Decimal | None, mine: Replay | None,
             idem_key: str | None) -> None:
    """The job call ended: record what it said of its job and settle (or keep) the reservation."""
    job = info.job
    seen: JobSeen | None = observation.job
    reply = seen.reply if seen is not None else None
    # the upstream's answer decides, not how the app's side ended: an app that left after the
    # provider accepted the job still has a job running there
    ok = record.status_code is not None and record.status_code < 400
    book = rt.guard.jobs
    if isinstance(job, JobAsk):
        if not ok or seen is None or not seen.provider_job_id:
            rt.guard.settle(decision, record, extras)  # nothing was submitted: the reservation goes
            if mine is not None and idem_key:
                book.forget(upstream.name, idem_key, mine)
            return
        job_id = uuid.uuid4().hex
        state = seen.state or SUBMITTED
        held = Held(job_id, upstream.name, info.provider, job.kind, job.model or seen.model, dict(job.units), est,
                    decision, record.started_at, seen.provider_job_id)
        extras.jobs.append(JobEvent("submit", job_id, upstream.name, seen.provider_job_id, state, record.started_at,
                                    call_id=record.call_id, provider=info.provider, model=held.model,
                                    units_asked=held.units or None, estimate_usd=est).to_json())
        if mine is not None:
            mine.status, mine.body, mine.job_id = record.status_code, reply or b"", job_id
        if state in TERMINAL:
            _settle(rt, upstream, held, seen, record, extras)
        else:
            book.hold(held)
        return
    rt.guard.settle(decision, record, extras)  # a poll is a call of its own
    if not ok or seen is None:
        return
    assert isinstance(job, JobPoll)
    if job.file_id is not None:
        held = book.files.get((upstream.name, job.file_id))
        if held is not None:
            _settle_file(rt, upstream, held, seen, record, extras)
        return
    pid = seen.provider_job_id or job.provider_job_id
    held = book.held.get((upstream.name, pid)) if pid else None
    module = BY_ADAPTER[upstream.adapter]
    at = record.ended_at or record.started_at
    waits_for_file = module is openai_batch and openai_batch.needs_file(seen)
    if held is None:
        # a job this forwarder does not hold (submitted before it saw it): its row settles in the sinks process
        extras.jobs.append(JobEvent("poll", None, upstream.name, pid, seen.state, at, provider=info.provider,
                                    model=seen.model, units_made=seen.units_made or None,
                                    cost_usd=seen.provider_cost_usd,
                                    cost_source="provider" if seen.provider_cost_usd is not None else None,
                                    output_file_id=seen.output_file_id).to_json())
        if waits_for_file:
            book.hold(Held(None, upstream.name, info.provider, openai_batch.KIND, seen.model, {}, None,
                           NO_RESERVATION, None, pid, seen.output_file_id))
        return
    if waits_for_file:
        held.output_file_id = seen.output_file_id
        book.hold(held)
        extras.jobs.append(JobEvent("poll", held.job_id, upstream.name, pid, seen.state, at,
                                    units_made=seen.units_made or None,
                                    output_file_id=seen.output_file_id).to_json())
        return
    if seen.state in TERMINAL:
        _settle(rt, upstream, held, seen, record, extras)
    else:
        extras.jobs.append(JobEvent("poll", held.job_id, upstream.name, pid, seen.state, at).to_json())


def _settle(rt: Runtime, upstream: Upstream, held: Held, seen: JobSeen, record: CallRecord,
            extras: CallExtras) -> None:
    module = BY_ADAPTER[upstream.adapter]
    made = module.units_made(held.units, seen)
    at = record.ended_at or record.started_at
    made_cost = rt.pricer.units_cost(held.provider, held.model, made, at) if made else None
    cost, source = settle_cost(seen.state, seen.provider_cost_usd, made_cost, held.estimate)
    rt.guard.jobs.drop(held)
    rt.guard.settle_job(held.reservation, cost, at, record.call_id, extras)
    extras.jobs.append(JobEvent("settle", held.job_id, upstream.name, held.provider_job_id, seen.state, at,
                                units_made=made or None, cost_usd=cost, cost_source=source).to_json())


def _settle_file(rt: Runtime, upstream: Upstream, held: Held, seen: JobSeen, record: CallRecord,
                 extras: CallExtras) -> None:
    """A batch's output file went by: every line priced at batch rates; one unpriced line leaves
    the batch's cost NULL (never a partial sum that looks whole)."""
    at = held.submitted_at or record.started_at  # priced as of the submit, as the sinks process's download is
    total: Decimal | None = Decimal(0)
    for model, counts, n in seen.lines:
        # every line priced on its own (tiers apply per request), identical lines once
        line = rt.pricer.batch_cost(held.provider, model, Usage(**counts), at).total_usd
        if line is None:
            total = None
            break
        total += line * n  # type: ignore[operator]
    models = {m for m, _, _ in seen.lines if m}
    model = held.model or (models.pop() if len(models) == 1 else None)
    made = {"requests": sum(n for _, _, n in seen.lines)}
    cost, source = (total, "price") if total is not None else (held.estimate, "estimate" if held.estimate else None)
    rt.guard.jobs.drop(held)
    rt.guard.settle_job(held.reservation, cost, at, record.call_id, extras)
    extras.jobs.append(JobEvent("settle", held.job_id, upstream.name, held.provider_job_id, None, at,
                                model=model, units_made=made, cost_usd=cost, cost_source=source).to_json())
