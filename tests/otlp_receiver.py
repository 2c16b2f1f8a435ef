"""OTLP receivers for tests, in the test process: HTTP (aiohttp, /v1/traces and /v1/metrics) and gRPC (grpcio TraceService and MetricsService).

Each decodes the real protobuf bytes it receives with the opentelemetry.proto classes and keeps
the requests, so tests can wait for spans or metric pushes and look at them. The HTTP one also
takes OTLP JSON (application/json: hex ids, lowerCamelCase keys, as the OTLP spec's JSON mapping
has them), kept raw in `json_bodies` and decoded into the same classes. Both can serve TLS (and
require a client certificate). Both run on their own threads (the HTTP one with its own event
loop), so sync and async tests can use them alike. `call()` builds a CallRecord and CallExtras
pair to feed the exporters.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import ssl
import threading
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable

import grpc
from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from ledger.records import CallExtras, CallRecord

ExportTraceServiceRequest = trace_service_pb2.ExportTraceServiceRequest
ExportMetricsServiceRequest = metrics_service_pb2.ExportMetricsServiceRequest


class Receiver:
    """What both receivers share: the decoded requests, their headers, and waiting for them."""

    def __init__(self) -> None:
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.attempts = 0  # requests received, answered with success or not
        # a hook deciding the answer: None = accept; an int = that HTTP status / gRPC code to fail with
        self.fail_with: Callable[[int], int | grpc.StatusCode | None] | None = None
        self.rejected_spans = 0  # answer with a partial success rejecting this many spans
        self.delay_s = 0.0  # HTTP only: wait this long before answering (a slow collector)
        self.retry_after: str | None = None  # HTTP only: the Retry-After header of a failure answer
        self.attempt_times: list[float] = []  # time.monotonic() of each request
        self._cond = threading.Condition()

    def _record(self, kind: str, request: Any, headers: dict[str, str]) -> None:
        with self._cond:
            (self.trace_requests if kind == "traces" else self.metric_requests).append(request)
            self.headers.append(headers)
            self._cond.notify_all()

    def spans(self) -> list[Span]:
        with self._cond:
            return [span for req in self.trace_requests for rs in req.resource_spans
                    for ss in rs.scope_spans for span in ss.spans]

    def wait_for_spans(self, count: int, timeout: float = 10.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.spans()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} spans, got {len(self.spans())}")
                self._cond.wait(remaining)
        return self.spans()

    def wait_for_metrics(self, count: int = 1, timeout: float = 10.0) -> list[ExportMetricsServiceRequest]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.metric_requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} metric pushes, got {len(self.metric_requests)}")
                self._cond.wait(remaining)
            return list(self.metric_requests)

    def _answer(self) -> int | grpc.StatusCode | None:
        with self._cond:
            self.attempts += 1
            attempt = self.attempts
            self.attempt_times.append(time.monotonic())
        return self.fail_with(attempt) if self.fail_with is not None else None


def metrics_by_name(request: ExportMetricsServiceRequest) -> dict[str, Metric]:
    return {m.name: m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def attributes(item: Any) -> dict[str, Any]:
    """A span's, event's or data point's attributes as a plain dict (arrays as lists)."""
    return {kv.key: any_value(kv.value) for kv in item.attributes}


def any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


# --- HTTP --------------------------------------------------------------------------------------


class HttpReceiver(Receiver):
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """With an ssl_context (see `server_tls`), it serves HTTPS."""
        super().__init__()
        self.port = 0
        self.ssl_context = ssl_context
        self.json_bodies: list[dict[str, Any]] = []  # the OTLP JSON requests, as received
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> HttpReceiver:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="otlp-http-receiver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the OTLP HTTP receiver did not start")
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        # handlers still waiting (a slow-collector test) are cancelled, not left for the GC to complain about
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _body(self, request: web.Request) -> bytes:
        body = await request.read()  # aiohttp undoes Content-Encoding itself; a server that does not:
        if request.headers.get("Content-Encoding") == "gzip" and body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        return body

    async def _traces(self, request: web.Request) -> web.Response:
        return await self._handle(request, "traces")

    async def _metrics(self, request: web.Request) -> web.Response:
        return await self._handle(request, "metrics")

    async def _handle(self, request: web.Request, kind: str) -> web.Response:
        if request.content_type not in ("application/x-protobuf", "application/json"):
            return web.Response(status=415, text="expected application/x-protobuf or application/json")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        failure = self._answer()
        if failure is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
            return web.Response(status=int(failure), text="unavailable", headers=headers)  # type: ignore[arg-type]
        body = await self._body(request)
        is_json = request.content_type == "application/json"
        message_class: Any = ExportTraceServiceRequest if kind == "traces" else ExportMetricsServiceRequest
        if is_json:
            document = json.loads(body)
            with self._cond:
                self.json_bodies.append(document)
            message: Any = from_otlp_json(document, message_class)
        else:
            message = message_class.FromString(body)
        if kind == "traces":
            response: Any = trace_service_pb2.ExportTraceServiceResponse()
            if self.rejected_spans:
                response.partial_success.rejected_spans = self.rejected_spans
                response.partial_success.error_message = "too many attributes"
        else:
            response = metrics_service_pb2.ExportMetricsServiceResponse()
        self._record(kind, message, {k.lower(): v for k, v in request.headers.items()})
        if is_json:
            return web.Response(text=json_format.MessageToJson(response), content_type="application/json")
        return web.Response(body=response.SerializeToString(), content_type="application/x-protobuf")

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None


_HEX_IDS = {"traceId", "spanId", "parentSpanId"}


def from_otlp_json(document: Any, message_class: Any) -> Any:
    """An OTLP JSON request as the protobuf message: the JSON mapping of OTLP is protobuf's, except that
    trace and span ids are hex strings instead of base64 (so they are turned into base64 first)."""
    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (base64.b64encode(bytes.fromhex(v)).decode() if k in _HEX_IDS and isinstance(v, str) else fix(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return json_format.ParseDict(fix(document), message_class())


def server_tls(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """A server TLS context; with client_ca_file, a client certificate signed by it is required (mTLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca_file)
    return context


# --- gRPC --------------------------------------------------------------------------------------


class GrpcReceiver(Receiver):
    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if getattr(self, 'tls', False) else 'http'}://127.0.0.1:{self.port}"

    def start(self, port: int = 0, tls: tuple[bytes, bytes] | None = None,
              client_ca: bytes | None = None) -> GrpcReceiver:
        """tls: (certificate chain PEM, private key PEM) to serve over TLS instead of plaintext; client_ca:
        also require a client certificate signed by it (mTLS)."""
        receiver = self
        self.tls = tls is not None

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
                return receiver._grpc_handle("traces", request, context)

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
                return receiver._grpc_handle("metrics", request, context)

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])], root_certificates=client_ca,
                                                      require_client_auth=client_ca is not None)
            self.port = self._server.add_secure_port(f"127.0.0.1:{port}", credentials)
        else:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()
        return self

    def _grpc_handle(self, kind: str, request: Any, context: grpc.ServicerContext) -> Any:
        failure = self._answer()
        if failure is not None:
            context.abort(failure, "unavailable")  # type: ignore[arg-type]
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self._record(kind, request, headers)
        if kind == "traces":
            response = trace_service_pb2.ExportTraceServiceResponse()
            if self.rejected_spans:
                response.partial_success.rejected_spans = self.rejected_spans
            return response
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None


# --- records to feed the exporters ---------------------------------------------------------------

T0 = datetime(2026, 11, 5, 12, 0, 0, 250000, tzinfo=timezone.utc)


def call(i: int = 0, extras: dict[str, Any] | None = None, **record: Any) -> tuple[CallRecord, CallExtras]:
    """A finished, streamed OpenAI chat call made from inside an app's trace, with overrides."""
    started = T0 + timedelta(seconds=i)
    fields: dict[str, Any] = dict(
        call_id=os.urandom(16).hex(), started_at=started, ended_at=started + timedelta(milliseconds=850),
        duration_ms=850.0, ttft_ms=210.0, overhead_ms=0.4, app="checkout", upstream="openai", provider="openai",
        operation="chat", endpoint="/v1/chat/completions", request_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18", response_id=f"chatcmpl-{i}", stream=True, status_code=200,
        outcome="ok", error_type=None, finish_reason="stop", input_tokens=1200, output_tokens=300,
        cache_read_tokens=1024, cache_write_tokens=16, reasoning_tokens=64, units=None,
        input_cost_usd=Decimal("0.000180"), output_cost_usd=Decimal("0.000180"), cost_usd=Decimal("0.000360"),
        price_source="genai-prices 0.2.3", user_id="u123", key_fingerprint="kf-1",
        tags={"team": "search", "feature": "summarize"}, trace_id=os.urandom(16).hex(), span_id=os.urandom(8).hex(),
        request_bytes=2000, response_bytes=4000)
    fields.update(record)
    extra: dict[str, Any] = dict(parent_span_id=os.urandom(8).hex(), sampled=True, server_address="api.openai.com",
                                 server_port=443, temperature=0.2, top_p=0.9, max_output_tokens=512)
    extra.update(extras or {})
    return CallRecord(**fields), CallExtras(**extra)
