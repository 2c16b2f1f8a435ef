"""The shared vocabulary of meterline: plain data that crosses every boundary (Usage, CallInfo, CallRecord).

This module imports nothing else of ours. Adapters fill `CallInfo` and `Usage`; the proxy
assembles one `CallRecord` per call; the journal, the ledger and every exporter read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

# `outcome` values, the contract of the ledger's `outcome` column.
OK = "ok"
UPSTREAM_ERROR = "upstream_error"
NETWORK_ERROR = "network_error"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
BLOCKED = "blocked"
INTERRUPTED = "interrupted"
OUTCOMES = (OK, UPSTREAM_ERROR, NETWORK_ERROR, TIMEOUT, CANCELLED, BLOCKED, INTERRUPTED)


@dataclass(slots=True)
class Usage:
    """Token and unit counts in the OpenTelemetry GenAI / genai-prices convention.

    `input_tokens` counts every input token, cached ones included; `cache_read_tokens` and
    `cache_write_tokens` are parts of it. `output_tokens` includes `reasoning_tokens`.
    `units` holds other priced quantities under genai-prices' names (e.g. `input_audio_tokens`,
    `audio_seconds`) or ours (`images`, `requests`). None means "not reported".
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    units: dict[str, int | float] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return (
            self.input_tokens is None
            and self.output_tokens is None
            and self.cache_read_tokens is None
            and self.cache_write_tokens is None
            and not self.units
        )


@dataclass(slots=True)
class CallInfo:
    """What is known of a call before it is forwarded: who asks which model for what."""

    provider: str  # genai-prices provider id: openai, anthropic, google, groq, ...
    operation: str  # chat, responses, text_completion, embeddings, generate_content, ...
    endpoint: str  # the upstream path, with any key in its query redacted
    request_model: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    input_estimate: int = 0  # rough input token count, for budget reservations
    priced: bool = True  # False for calls that cost nothing (e.g. count_tokens)
    user_id: str | None = None  # from the body (OpenAI `user`, Anthropic metadata.user_id)
    # an async job's submit or poll (jobs.model.JobAsk / JobPoll), set by the forwarder; None for other calls
    job: Any = None


@dataclass(slots=True)
class Observation:
    """What an observer learned from a response once it ended."""

    usage: Usage = field(default_factory=Usage)
    response_model: str | None = None
    response_id: str | None = None
    finish_reason: str | None = None
    error_type: str | None = None  # the provider's error type or code, on error responses
    anomaly: str | None = None  # set when the body could not be metered (malformed, truncated)
    service_tier: str | None = None  # as the provider reported it: prices differ by tier
    job: Any = None  # what a job submit or poll answered (jobs.model.JobSeen), for the job's row


@dataclass(slots=True)
class CallRecord:
    """One call, as it lands in the ledger's `calls` table (field names are the column names)."""

    call_id: str
    started_at: datetime
    ended_at: datetime | None
    duration_ms: float | None
    ttft_ms: float | None
    overhead_ms: float | None
    app: str | None
    upstream: str
    provider: str
    operation: str
    endpoint: str
    request_model: str | None
    response_model: str | None
    response_id: str | None
    stream: bool
    status_code: int | None
    outcome: str
    error_type: str | None
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    cache_read_tokens: int | None
    cache_write_tokens: int | None
    reasoning_tokens: int | None
    units: dict[str, int | float] | None
    input_cost_usd: Decimal | None
    output_cost_usd: Decimal | None
    cost_usd: Decimal | None
    price_source: str | None
    user_id: str | None
    key_fingerprint: str | None
    tags: dict[str, str]
    trace_id: str | None
    span_id: str | None
    request_bytes: int
    response_bytes: int
    anomaly: str | None = None
    service_tier: str | None = None
    instance: str | None = None  # the sidecar that metered it (fleet.instance; default the host name)
    # routes (sidecar/routes): the route the app named, how many tries, the target that answered
    # (<upstream>/<model>) and the weighted or rule-picked arm; None for calls not made through a route
    route: str | None = None
    attempts: int | None = None
    served_by: str | None = None
    arm: str | None = None
    # One API (sidecar/oneapi): the format the app spoke (`openai`, `anthropic`) and the upstream's
    # adapter format, for calls made on the root paths; None for calls made on /<upstream>/ paths
    client_format: str | None = None
    upstream_format: str | None = None


@dataclass(slots=True)
class CallExtras:
    """What telemetry and alerts need of a call beyond its ledger row: journaled with it, never stored in the ledger."""

    parent_span_id: str | None = None  # the app's span (from traceparent), parent of the call's span
    sampled: bool = True  # the app's trace flags, when it sent a traceparent
    tracestate: str | None = None
    server_address: str | None = None  # the upstream's host and port
    server_port: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    input_messages: str | None = None  # JSON, only when telemetry.capture_content is on
    output_messages: str | None = None
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)  # e.g. meterline.budget.*
    events: list[tuple[str, datetime, dict[str, str | int | float | bool]]] = field(default_factory=list)
    # budget thresholds the call crossed (ledger.budgets.crossing_note), for the sinks process to alert
    alerts: list[dict[str, Any]] = field(default_factory=list)
    # (rule, split key or None, utilization as text) of each budget the call settled: the gauge
    utilization: list[tuple[str, str | None, str]] = field(default_factory=list)
    # a routed call's tries (Attempt; plain dicts once read back from a journal line), for the `attempts` table
    attempts: list[Any] = field(default_factory=list)
    # async job events of the call (jobs.model.JobEvent.to_json): the sinks process upserts `jobs` rows from them
    jobs: list[dict[str, Any]] = field(default_factory=list)


REFUSED = "refused"  # an attempt's outcome when the budgets refused it (the call may still be served)


@dataclass(slots=True)
class Attempt:
    """One try of a routed call at one target: a row of the ledger's `attempts` table."""

    call_id: str
    attempt: int  # 1, 2, ... in the order tried
    upstream: str
    provider: str
    model: str
    started_at: datetime
    ttft_ms: float | None = None
    duration_ms: float | None = None
    status_code: int | None = None
    outcome: str = OK  # the call outcomes, or `refused`
    error_type: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    units: dict[str, int | float] | None = None
    input_cost_usd: Decimal | None = None
    output_cost_usd: Decimal | None = None
    cost_usd: Decimal | None = None
    price_source: str | None = None
    response_model: str | None = None
    instance: str | None = None  # the sidecar that metered it (its call's `instance`)
