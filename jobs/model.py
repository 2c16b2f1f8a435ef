"""Async media jobs as plain data: states, what a submit asks for, what a submit or poll answered, and the journaled event.

Shared by the forwarder (which recognises submits and polls as they pass), the sinks process (which
upserts `jobs` rows and polls unfinished jobs) and the provider modules in this package. Nothing
here does I/O or imports `sidecar`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from ledger.money import non_negative_amount

SUBMITTED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED, UNKNOWN = (
    "submitted", "running", "succeeded", "failed", "cancelled", "expired", "unknown")
STATES = (SUBMITTED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED, UNKNOWN)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED, UNKNOWN})
# a failed, cancelled or expired job costs nothing unless the provider says it billed it
UNBILLED = frozenset({FAILED, CANCELLED, EXPIRED})

# cost_source values
PROVIDER, PRICE, ESTIMATE = "provider", "price", "estimate"

Units = dict[str, Any]  # seconds (number), images (int), resolution (str), requests (int)


@dataclass(slots=True)
class JobAsk:
    """A request that submits a job: the model and the units it asks for (what its estimate is made of)."""

    kind: str  # eachlabs | veo | openai_batch
    model: str | None
    units: Units = field(default_factory=dict)
    sync: bool = False  # answered in the same call (each::labs /v1/prediction/run)


@dataclass(slots=True)
class JobPoll:
    """A request that reads a job's state (or, for a batch, its output file)."""

    kind: str
    provider_job_id: str | None = None
    file_id: str | None = None  # a batch's output file being downloaded


@dataclass(slots=True)
class JobSeen:
    """What a submit or poll response said of the job."""

    provider_job_id: str | None = None
    state: str | None = None
    units_made: Units = field(default_factory=dict)
    provider_cost_usd: Decimal | None = None  # the provider's own figure (each::labs metrics.cost)
    output_file_id: str | None = None  # a batch's results, priced when the app downloads them
    model: str | None = None
    # a batch output file: (model, usage counts, how many lines had exactly these), priced at batch rates
    lines: list[tuple[str | None, dict[str, int], int]] = field(default_factory=list)
    error: str | None = None
    reply: bytes | None = None  # a submit's answer (re-encoded JSON), for an idempotent replay


@dataclass(slots=True)
class JobEvent:
    """One job event, journaled on the final line of the call that saw it (CallExtras.jobs).

    `submit` creates the job's row; `poll` moves its state; `settle` (state terminal) fixes its
    cost. The sinks process's own polls make the same events (call_id None)."""

    event: str  # submit | poll | settle
    job_id: str | None
    upstream: str
    provider_job_id: str | None
    state: str | None
    at: datetime
    call_id: str | None = None
    provider: str | None = None
    model: str | None = None
    units_asked: Units | None = None
    units_made: Units | None = None
    estimate_usd: Decimal | None = None
    cost_usd: Decimal | None = None
    cost_source: str | None = None
    output_file_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["at"] = self.at.isoformat()
        for key in ("estimate_usd", "cost_usd"):
            if doc[key] is not None:
                doc[key] = str(doc[key])
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> JobEvent:
        """Raises ValueError on a doc that is not a job event."""
        try:
            kw = {k: doc.get(k) for k in cls.__dataclass_fields__}
            kw["at"] = datetime.fromisoformat(doc["at"])
            for key in ("estimate_usd", "cost_usd"):
                if kw[key] is not None:
                    kw[key] = Decimal(str(kw[key]))
        except (KeyError, TypeError, InvalidOperation) as e:
            raise ValueError(f"not a job event: {e}") from None
        if kw["event"] not in ("submit", "poll", "settle") or not isinstance(kw["upstream"], str):
            raise ValueError("not a job event")
        return cls(**kw)


def settle_cost(state: str, seen_cost: Decimal | None, made_cost: Decimal | None,
                estimate: Decimal | None, billed_on_failure: bool = False) -> tuple[Decimal | None, str | None]:
    """A terminal job's cost and where it comes from: the provider's figure, else units made times
    price, else the estimate. Failed, cancelled and expired jobs cost nothing unless the provider
    reported a cost for them (or `billed_on_failure`). `unknown` keeps the estimate."""
    if seen_cost is not None:
        return seen_cost, PROVIDER
    if state in UNBILLED and not billed_on_failure:
        return Decimal(0), PROVIDER
    if state != UNKNOWN and made_cost is not None:
        return made_cost, PRICE
    return estimate, ESTIMATE if estimate is not None else None


def decimal_or_none(value: Any) -> Decimal | None:
    """A provider's number (JSON number or string) as an exact non-negative Decimal the ledger's
    DECIMAL(38, 12) holds, rounded to its trillionth; else None (never a value that fails the write)."""
    if not isinstance(value, (int, float, str)):
        return None
    amount = non_negative_amount(value)
    return amount.quantize(Decimal("0.000000000001")) if amount is not None else None
