"""The metrics made from call records: GenAI client histograms, cost and request counters, sidecar overhead, budget utilization.

Label sets are the conventions' low-cardinality attributes (operation, provider, request and
response model, server address and port, error type) plus `meterline.app`; tag values become
labels only for the tags named in `telemetry.metric_tag_labels`. User ids, call ids and other
tags never do. The attribute dicts of each combination are built once and cached (the SDK copies
what it keeps). Histograms get one SDK `record` per value; the two counters are summed per chunk
of calls first and get one `add` per attribute set and chunk (each SDK measurement costs about
10 us, see exporters/README.md).
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ledger.records import OK, CallExtras, CallRecord

from . import semconv
from .metrics import MetricsPipeline
from .settings import TelemetrySettings

Attributes = dict[str, Any]

_CACHE_LIMIT = 4096
_CHUNK = 256  # records per hold of the pipeline's lock


@dataclass(slots=True, frozen=True, eq=False)
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
    def __init__(self, pipeline: MetricsPipeline, settings: TelemetrySettings) -> None:
        self.pipeline = pipeline
        self.names = settings.names
        self.tag_labels = settings.metric_tag_labels
        self.budget_key_label = settings.budget_key_label
        m = semconv
        self.tokens = pipeline.histogram(m.TOKEN_USAGE)
        self.duration = pipeline.histogram(m.OPERATION_DURATION)
        self.ttft = pipeline.histogram(m.TIME_TO_FIRST_CHUNK)
        self.cost = pipeline.counter(m.COST)
        self.requests = pipeline.counter(m.REQUESTS)
        self.overhead = pipeline.histogram(m.OVERHEAD)
        b = m.BUDGET_UTILIZATION
        pipeline.observe_gauge(b.name, b.unit, b.description, self._budget_points)
        self._keys: dict[tuple, _Keys] = {}
        # budget utilization, read by the observable gauge: its own small lock (the guard reports from
        # the request path, which must not wait for a chunk of calls being recorded)
        self._budget_lock = threading.Lock()
        self._budget: dict[tuple[tuple[str, str], ...], float] = {}  # attributes -> value
        self._budget_keys: dict[str, dict[str | None, float]] = {}  # rule -> key -> value (key label off)

    def record_batch(self, batch: Sequence[tuple[CallRecord, CallExtras | None]]) -> None:
        # the lock is let go between chunks, so a scrape never waits for a whole large batch
        for start in range(0, len(batch), _CHUNK):
            self._record_chunk(batch[start:start + _CHUNK] if len(batch) > _CHUNK else batch)

    def _record_chunk(self, batch: Sequence[tuple[CallRecord, CallExtras | None]]) -> None:
        tag_labels = self.tag_labels
        keys = self._keys
        tokens, duration, ttft, overhead = (self.tokens.record, self.duration.record, self.ttft.record,
                                            self.overhead.record)
        costs: dict[int, tuple[Attributes, Decimal]] = {}  # id(attributes) -> (attributes, sum)
        counts: dict[int, list] = {}  # id(attributes) -> [attributes, count]
        with self.pipeline.lock:
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
                    tokens(r.input_tokens, k.tokens_input)
                if r.output_tokens is not None:
                    tokens(r.output_tokens, k.tokens_output)
                if r.duration_ms is not None:
                    duration(r.duration_ms / 1000.0, k.duration)
                if r.stream and r.ttft_ms is not None:
                    ttft(r.ttft_ms / 1000.0, k.ttft)
                if r.cost_usd is not None:
                    held = costs.get(id(k.cost))
                    costs[id(k.cost)] = (k.cost, r.cost_usd if held is None else held[1] + r.cost_usd)
                held_count = counts.get(id(k.requests))
                if held_count is None:
                    counts[id(k.requests)] = [k.requests, 1]
                else:
                    held_count[1] += 1
                if r.overhead_ms is not None:
                    overhead(r.overhead_ms / 1000.0, k.overhead)
            for attributes, total in costs.values():
                self.cost.add(total, attributes)  # a Decimal: the sum stays exact until exported
            for attributes, count in counts.values():
                self.requests.add(count, attributes)

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
            tokens_input=dict(base + [(n.token_type, "input")] + tag_pairs),
            tokens_output=dict(base + [(n.token_type, "output")] + tag_pairs),
            duration=dict(base + error + tag_pairs),
            ttft=dict(base + tag_pairs),
            cost=dict([(n.provider, provider), *models, *app_pair] + tag_pairs),
            requests=dict([(n.operation, operation), (n.provider, provider), *request_only, *app_pair,
                           (n.outcome, outcome)] + tag_pairs),
            overhead=dict([(n.operation, operation), (n.provider, provider)]),
        )

    def set_budget_utilization(self, rule: str, key: str | None, value: float | Decimal) -> None:
        """The budget guard's report: spend / limit of `rule` for `key` (None for an unkeyed rule).

        Without `telemetry.budget_key_label` (keys may be user ids) each rule has one series,
        holding the highest utilization among its keys.
        """
        n = self.names
        number = float(value)
        with self._budget_lock:
            if self.budget_key_label and key is not None:
                self._budget[((n.budget_rule, rule), (n.budget_key, key))] = number
                return
            per_key = self._budget_keys.setdefault(rule, {})
            previous = per_key.get(key)
            per_key[key] = number
            attributes = ((n.budget_rule, rule),)
            highest = self._budget.get(attributes)
            if highest is None or number >= highest:
                highest = number
            elif previous is not None and previous >= highest:  # the key that held the highest went down
                highest = max(per_key.values())
            self._budget[attributes] = highest

    def _budget_points(self) -> list[tuple[dict[str, str], float]]:
        with self._budget_lock:
            return [(dict(attributes), value) for attributes, value in self._budget.items()]
