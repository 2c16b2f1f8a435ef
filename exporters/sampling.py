"""Head sampling of call spans, as OTEL_TRACES_SAMPLER describes it, decided from the record's trace context.

The app's traceparent gives the parent (extras.parent_span_id; None means the call started a
trace) and its sampled flag (extras.sampled). The ratio samplers are deterministic on the trace
id: they use its last 56 bits as the randomness, as the consistent-probability rule of the
OpenTelemetry spec does, so every call of one trace gets the same decision.
"""
from __future__ import annotations

_RANDOM_BITS = 56
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1


class Sampler:
    def __init__(self, name: str, ratio: float = 1.0) -> None:
        self.name = name
        self.ratio = ratio
        parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        self._parent_based = parent_based
        self._root = root
        # sampled when the 56 random bits are at least the threshold
        self._threshold = round((1.0 - ratio) * (1 << _RANDOM_BITS))

    def __call__(self, trace_id: str | None, parent_span_id: str | None, parent_sampled: bool) -> bool:
        """Whether the call's span is recorded and exported."""
        if self._parent_based and parent_span_id is not None:
            return parent_sampled
        root = self._root
        if root == "always_on":
            return True
        if root == "always_off":
            return False
        return self.ratio_sampled(trace_id)

    def ratio_sampled(self, trace_id: str | None) -> bool:
        if self._threshold <= 0:
            return True
        if not trace_id or len(trace_id) != 32:
            return False
        try:
            randomness = int(trace_id[18:], 16) & _RANDOM_MASK
        except ValueError:
            return False
        return randomness >= self._threshold

    def __repr__(self) -> str:
        arg = f", {self.ratio}" if self._root == "traceidratio" else ""
        return f"Sampler({self.name!r}{arg})"
