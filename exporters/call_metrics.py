"""The metrics made from call records: GenAI client histograms, cost and request counters, sidecar overhead, budget utilization.

Label sets are the conventions' low-cardinality attributes (operation, provider, request and
response model, server address and port, error type) plus `meterline.app`; tag values become
labels only for the tags named in `telemetry.metric_tag_labels`. User ids, call ids and other
tags never do. The attribute tuples of each combination are built once and cached.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from ledger.records import OK, CallExtras, CallRecord

from . import semconv
from .metrics import Attributes, Registry
from .settings import TelemetrySettings

_CACHE_LIMIT = 4096
_CHUNK = 256  # records per hold of the registry lock


@dataclass(slots=True, frozen=True)
class _Keys:
    """The attribute set each instrument uses for one combination of a record's labelled fields."""

    tokens_input: Attributes
    tokens_output: Attributes
    duration: Attributes
    ttft: Attributes
    cost: Attributes
    requests: Attributes
    overhead: Attributes


class CallMetrics:
    def __init__(self, registry: Registry, settings: TelemetrySettings) -> None:
        self.registry = registry
        self.names = settings.names
        self.tag_labels = settings.metric_tag_labels
        self.budget_key_label = settings.budget_key_label
        m = semconv
        self.tokens = registry.histogram(m.TOKEN_USAGE.name, m.TOKEN_USAGE.unit, m.TOKEN_USAGE.description,
                                         m.TOKEN_BUCKETS)
        self.duration = registry.histogram(m.OPERATION_DURATION.name, m.OPERATION_DURATION.unit,
                                           m.OPERATION_DURATION.description, m.DURATION_BUCKETS)
        self.ttft = registry.histogram(m.TIME_TO_FIRST_CHUNK.name, m.TIME_TO_FIRST_CHUNK.unit,
                                       m.TIME_TO_FIRST_CHUNK.description, m.DURATION_BUCKETS)
        self.cost = registry.counter(m.COST.name, m.COST.unit, m.COST.description)
        self.requests = registry.counter(m.REQUESTS.name, m.REQUESTS.unit, m.REQUESTS.description)
        self.overhead = registry.histogram(m.OVERHEAD.name, m.OVERHEAD.unit, m.OVERHEAD.description,
                                           m.OVERHEAD_BUCKETS)
        self.budget = registry.gauge(m.BUDGET_UTILIZATION.name, m.BUDGET_UTILIZATION.unit,
                                     m.BUDGET_UTILIZATION.description)
        self._keys: dict[tuple, _Keys] = {}
        self._budget_keys: dict[str, dict[str | None, float]] = {}  # rule -> key -> value (key label off)

    def record_batch(self, batch: Sequence[tuple[CallRecord, CallExtras | None]]) -> None:
        # the lock is let go between chunks, so a scrape never waits for a whole large batch
        for start in range(0, len(batch), _CHUNK):
            self._record_chunk(batch[start:start + _CHUNK] if len(batch) > _CHUNK else batch)

    def _record_chunk(self, batch: Sequence[tuple[CallRecord, CallExtras | None]]) -> None:
        tag_labels = self.tag_labels
        keys = self._keys
        tokens, duration, ttft, cost, requests, overhead = (
            self.tokens, self.duration, self.ttft, self.cost, self.requests, self.overhead)
        with self.registry.lock:
            for r, x in batch:
                raw = (r.operation, r.provider, r.request_model, r.response_model,
                       x.server_address if x is not None else None, x.server_port if x is not None else None,
                       r.app, r.outcome, r.error_type,
                       tuple(r.tags.get(t) for t in tag_labels) if tag_labels and r.tags else None)
                k = keys.get(raw)
                if k is None:
                    if len(keys) >= _CACHE_LIMIT:
                        keys.clear()
                    k = keys[raw] = self._build_keys(raw)
                if r.input_tokens is not None:
                    tokens.record(k.tokens_input, r.input_tokens)
                if r.output_tokens is not None:
                    tokens.record(k.tokens_output, r.output_tokens)
                if r.duration_ms is not None:
                    duration.record(k.duration, r.duration_ms / 1000.0)
                if r.stream and r.ttft_ms is not None:
                    ttft.record(k.ttft, r.ttft_ms / 1000.0)
                if r.cost_usd is not None:
                    cost.add(k.cost, r.cost_usd)
                requests.add(k.requests, 1)
                if r.overhead_ms is not None:
                    overhead.record(k.overhead, r.overhead_ms / 1000.0)

    def _build_keys(self, raw: tuple) -> _Keys:
        operation, provider_id, request_model, response_model, address, port, app, outcome, error_type, tags = raw
        n = self.names
        provider = semconv.provider_name(provider_id)
        models: list[tuple[str, str | int | bool]] = []
        if request_model is not None:
            models.append((n.request_model, request_model))
        if response_model is not None:
            models.append((n.response_model, response_model))
        request_only = models[:1] if request_model is not None else []
        server: list[tuple[str, str | int | bool]] = []
        if address:
            server.append((n.server_address, address))
            if port:
                server.append((n.server_port, port))
        tag_pairs = [(n.tag_prefix + name, value) for name, value in zip(self.tag_labels, tags or ()) if value is not None]
        app_pair = [(n.app, app)] if app is not None else []
        base = [(n.operation, operation), (n.provider, provider), *models, *server, *app_pair]
        error = [(n.error_type, error_type or outcome)] if outcome != OK else []
        return _Keys(
            tokens_input=tuple(base + [(n.token_type, "input")] + tag_pairs),
            tokens_output=tuple(base + [(n.token_type, "output")] + tag_pairs),
            duration=tuple(base + error + tag_pairs),
            ttft=tuple(base + tag_pairs),
            cost=tuple([(n.provider, provider), *models, *app_pair] + tag_pairs),
            requests=tuple([(n.operation, operation), (n.provider, provider), *request_only, *app_pair,
                            (n.outcome, outcome)] + tag_pairs),
            overhead=tuple([(n.operation, operation), (n.provider, provider)]),
        )

    def set_budget_utilization(self, rule: str, key: str | None, value: float | Decimal) -> None:
        """The budget guard's report: spend / limit of `rule` for `key` (None for an unkeyed rule).

        Without `telemetry.budget_key_label` (keys may be user ids) each rule has one series,
        holding the highest utilization among its keys.
        """
        n = self.names
        number = float(value)
        with self.registry.lock:
            if self.budget_key_label and key is not None:
                self.budget.set(((n.budget_rule, rule), (n.budget_key, key)), number)
                return
            per_key = self._budget_keys.setdefault(rule, {})
            previous = per_key.get(key)
            per_key[key] = number
            attributes = ((n.budget_rule, rule),)
            highest = self.budget.series.get(attributes)
            if highest is None or number >= highest:
                highest = number
            elif previous is not None and previous >= highest:  # the key that held the highest went down
                highest = max(per_key.values())
            self.budget.set(attributes, highest)
