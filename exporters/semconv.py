"""The one table of telemetry names: OpenTelemetry GenAI attribute names (released vs latest experimental), provider values, metric names, units and buckets.

Every attribute or metric name that meterline emits is spelled here and nowhere else.
`OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental` (or `telemetry.semconv_opt_in`)
selects `LATEST`; otherwise `RELEASED` is used. Where the two differ:

| meaning | RELEASED | LATEST |
| --- | --- | --- |
| provider | `gen_ai.provider.name` and its old alias `gen_ai.system` | `gen_ai.provider.name` only |
| tokens written to a cache | `gen_ai.usage.cache_creation.input_tokens` | `gen_ai.usage.cache_write.input_tokens` |
"""
from __future__ import annotations

from dataclasses import dataclass, replace

OPT_IN_LATEST = "gen_ai_latest_experimental"


@dataclass(frozen=True, slots=True)
class Names:
    """Attribute names for spans and metric labels; None means "not emitted in this mode"."""

    operation: str = "gen_ai.operation.name"
    provider: str = "gen_ai.provider.name"
    provider_legacy: str | None = "gen_ai.system"  # deprecated alias, kept in RELEASED for older dashboards
    request_model: str = "gen_ai.request.model"
    request_max_tokens: str = "gen_ai.request.max_tokens"
    request_temperature: str = "gen_ai.request.temperature"
    request_top_p: str = "gen_ai.request.top_p"
    request_stream: str = "gen_ai.request.stream"
    response_model: str = "gen_ai.response.model"
    response_id: str = "gen_ai.response.id"
    finish_reasons: str = "gen_ai.response.finish_reasons"
    time_to_first_chunk: str = "gen_ai.response.time_to_first_chunk"
    input_tokens: str = "gen_ai.usage.input_tokens"
    output_tokens: str = "gen_ai.usage.output_tokens"
    cache_read_tokens: str = "gen_ai.usage.cache_read.input_tokens"
    cache_write_tokens: str = "gen_ai.usage.cache_creation.input_tokens"
    reasoning_tokens: str = "gen_ai.usage.reasoning.output_tokens"
    input_messages: str = "gen_ai.input.messages"
    output_messages: str = "gen_ai.output.messages"
    token_type: str = "gen_ai.token.type"
    server_address: str = "server.address"
    server_port: str = "server.port"
    error_type: str = "error.type"
    http_status: str = "http.response.status_code"
    # meterline's own
    call_id: str = "meterline.call_id"
    cost_usd: str = "meterline.cost_usd"  # double
    cost_usd_exact: str = "meterline.cost_usd_exact"  # the Decimal as a string
    price_source: str = "meterline.price_source"
    user: str = "meterline.user"
    app: str = "meterline.app"
    outcome: str = "meterline.outcome"
    upstream: str = "meterline.upstream"
    anomaly: str = "meterline.anomaly"
    key_fingerprint: str = "meterline.key_fingerprint"
    content_truncated: str = "meterline.content_truncated"
    tag_prefix: str = "meterline.tags."
    budget_rule: str = "meterline.budget.rule"
    budget_key: str = "meterline.budget.key"
    overflow: str = "otel.metric.overflow"  # the one series that takes what the cardinality cap refuses


RELEASED = Names()
LATEST = replace(RELEASED, provider_legacy=None, cache_write_tokens="gen_ai.usage.cache_write.input_tokens")


def names_for(opt_in: str) -> Names:
    """The table for an OTEL_SEMCONV_STABILITY_OPT_IN value (a comma-separated list)."""
    values = {v.strip() for v in opt_in.split(",")}
    return LATEST if OPT_IN_LATEST in values else RELEASED


# genai-prices provider ids (what CallRecord.provider holds) -> gen_ai.provider.name values
PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google": "gcp.gemini",
    "gemini": "gcp.gemini",
    "google-vertex": "gcp.vertex_ai",
    "vertex": "gcp.vertex_ai",
    "aws": "aws.bedrock",
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "groq": "groq",
    "mistral": "mistral_ai",
    "deepseek": "deepseek",
    "x-ai": "x_ai",
    "xai": "x_ai",
    "perplexity": "perplexity",
    "cohere": "cohere",
    "ibm": "ibm.watsonx.ai",
}


def provider_name(provider_id: str) -> str:
    return PROVIDERS.get(provider_id, provider_id)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    description: str


TOKEN_USAGE = Metric("gen_ai.client.token.usage", "{token}", "Number of input and output tokens used per call.")
OPERATION_DURATION = Metric("gen_ai.client.operation.duration", "s", "Duration of GenAI client operations.")
TIME_TO_FIRST_CHUNK = Metric("gen_ai.client.operation.time_to_first_chunk", "s",
                             "Time from the request to the first chunk of a streamed response.")
COST = Metric("meterline.cost", "USD", "Cost of calls in US dollars, from the price catalogue.")
REQUESTS = Metric("meterline.requests", "{request}", "Calls seen by the sidecar, by outcome.")
OVERHEAD = Metric("meterline.overhead", "s", "CPU time the sidecar itself added to a call.")
BUDGET_UTILIZATION = Metric("meterline.budget.utilization", "1", "Spend over limit of a budget rule's current window.")
SPANS_EXPORTED = Metric("meterline.telemetry.spans.exported", "{span}", "Spans accepted by the OTLP endpoint.")
SPANS_DROPPED = Metric("meterline.telemetry.spans.dropped", "{span}",
                       "Spans dropped: queue full, endpoint rejected them, or retries ran out.")
EXPORT_FAILURES = Metric("meterline.telemetry.export.failures", "{request}", "Failed OTLP export attempts.")

# bucket boundaries from the GenAI conventions
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# ours: the sidecar's own time is sub-millisecond to a few milliseconds
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# each histogram's boundaries (a View per histogram in the MeterProvider)
HISTOGRAM_BUCKETS = {
    TOKEN_USAGE.name: TOKEN_BUCKETS,
    OPERATION_DURATION.name: DURATION_BUCKETS,
    TIME_TO_FIRST_CHUNK.name: DURATION_BUCKETS,
    OVERHEAD.name: OVERHEAD_BUCKETS,
}

SCOPE_NAME = "meterline"
SCOPE_VERSION = "0.1.0"
