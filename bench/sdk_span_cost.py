"""What one call's span costs on the OpenTelemetry SDK path: build the ReadableSpan, hand it to the BatchSpanProcessor, encode it (protobuf and OTLP JSON); and the sampler.

    .venv/bin/python -m bench.sdk_span_cost [records]     (default 10,000; prints microseconds per span, best of 5)
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from opentelemetry.exporter.otlp.json.common._internal.trace_encoder import encode_spans as encode_json
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as encode_proto
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from exporters import Telemetry, otlp_exporters
from exporters.sampling import Sampler
from exporters.settings import load_settings
from exporters.spans import SpanBuilder
from tests.otlp_receiver import call


class _Nothing(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def best_us(fn: Callable[[], object], count: int, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) / count * 1e6


def main(n: int) -> None:
    otlp_exporters._keep_trace_flags()  # the exporters' encoders as meterline runs them (trace flags kept)
    settings = load_settings({"otlp_endpoint": "http://127.0.0.1:4318"}, {})
    items = [call(i) for i in range(n)]
    builder = SpanBuilder(settings)

    def build() -> None:
        for k in range(0, n, 100):
            builder.build_all(items[k:k + 100])

    spans = builder.build_all(items)
    processor = BatchSpanProcessor(_Nothing(), max_queue_size=n + 1, schedule_delay_millis=60_000,
                                   max_export_batch_size=n + 1)
    queue = processor._batch_processor._queue

    def hand_over() -> None:
        for span in spans:
            processor.on_end(span)
        queue.clear()

    def proto() -> None:
        for k in range(0, n, 512):
            encode_proto(spans[k:k + 512]).SerializePartialToString()

    def json_() -> None:
        for k in range(0, n, 512):
            encode_json(spans[k:k + 512]).to_json()

    ours = Sampler("parentbased_traceidratio", 0.5)
    sdk = ParentBased(TraceIdRatioBased(0.5))
    ids = [(r.trace_id, x.parent_span_id, x.sampled) for r, x in items]

    def our_sampler() -> None:
        for trace_id, parent, sampled in ids:
            ours(trace_id, parent, sampled)

    def sdk_sampler() -> None:  # what it takes to ask the SDK's sampler the same question
        for trace_id, parent, sampled in ids:
            tid = int(trace_id, 16)
            ctx = set_span_in_context(NonRecordingSpan(SpanContext(
                tid, int(parent, 16), True, TraceFlags(TraceFlags.SAMPLED if sampled else 0)))) if parent else None
            sdk.should_sample(ctx, tid, "chat").decision.is_sampled()

    def consume(metrics: bool) -> Callable[[], None]:
        # the whole Telemetry.consume(), nothing exported meanwhile (the batch never fills)
        telemetry = Telemetry({"otlp_endpoint": "http://127.0.0.1:9", "metrics": metrics, "batch_delay_s": 3600,
                               "queue_max_spans": n + 1, "batch_max_spans": n + 1},
                              {"OTEL_METRICS_EXPORTER": "none"}, "bench")
        telemetries.append(telemetry)

        def run() -> None:
            for k in range(0, n, 100):
                telemetry.consume(items[k:k + 100])
            telemetry._spans.processor._batch_processor._queue.clear()  # type: ignore[union-attr]
        return run

    telemetries: list[Telemetry] = []
    print(f"{n} records, microseconds per span (best of 5):")
    for name, fn in (("build ReadableSpan (SpanBuilder.build_all)", build),
                     ("BatchSpanProcessor.on_end", hand_over),
                     ("encode, protobuf (http/protobuf, grpc), batches of 512", proto),
                     ("encode, OTLP JSON (http/json), batches of 512", json_),
                     ("our Sampler, parentbased_traceidratio", our_sampler),
                     ("SDK ParentBased(TraceIdRatioBased), same question", sdk_sampler),
                     ("Telemetry.consume(), tracing + metrics", consume(True)),
                     ("Telemetry.consume(), tracing only", consume(False))):
        print(f"  {name:58s} {best_us(fn, n):7.2f}")
    processor.shutdown()
    for telemetry in telemetries:
        telemetry.shutdown(0.0)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
