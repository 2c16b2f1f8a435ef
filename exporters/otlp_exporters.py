"""Builds the OpenTelemetry SDK's OTLP exporter of one signal (spans or metrics) from a validated `Target`.

`span_exporter(target)` and `metric_exporter(target)` pick the exporter of the target's protocol
(`http/protobuf`: opentelemetry-exporter-otlp-proto-http, `grpc`: ...-proto-grpc, `http/json`:
opentelemetry-exporter-otlp-json-http) and pass every setting explicitly: endpoint, headers,
timeout, compression, insecure and the CA / client certificate files. The SDK's own retry (the
spec's: 429/502/503/504 and connection errors, or the gRPC retryable codes, with exponential
backoff and Retry-After, within the timeout) is kept as it is.

An `Observer` passed along sees every attempt the exporter makes (the HTTP transport or a gRPC
interceptor of ours reports it): failures with a readable reason, and the partial-success count
of a collector that accepted a request but rejected some items. The SDK's exporters report
neither (they log, and return SUCCESS for a partial success).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

import requests
from opentelemetry.exporter.http.transport._base import BaseHTTPResult
from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport

from .settings import Target

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter
    from opentelemetry.sdk.metrics.view import Aggregation
    from opentelemetry.sdk.trace.export import SpanExporter


class PinnedCaSession(requests.Session):
    """A requests Session whose configured CA file is not replaced by REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE.

    Why: the SDK's http/protobuf exporter sends through `RequestsHTTPTransport`, which puts the CA
    file (here the Target's; in the SDK alone certificate_file or
    OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]CERTIFICATE) on `session.verify` and calls `session.request()` without a `verify` argument. `Session.request()` then calls
    `merge_environment_settings(url, ..., verify=None, ...)`, which (with trust_env on, the default)
    turns that None into $REQUESTS_CA_BUNDLE or $CURL_CA_BUNDLE, and a per-request value wins over
    `session.verify` in `merge_setting`: the user's OTLP CA is silently dropped, and a private
    collector fails verification in every container that sets those variables. Turning trust_env
    off would fix it too but would also drop the proxy variables and .netrc, so only `verify` is
    put back, and only when a CA file (or no verification) was configured for OTLP.
    """

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            merged["verify"] = self.verify
        return merged




class Observer(Protocol):
    """Told about each request an exporter makes (on the exporter's thread)."""

    def attempt_failed(self, error: str) -> None: ...

    def attempt_succeeded(self, rejected: int, message: str) -> None: ...


def span_exporter(target: Target, observer: Observer | None = None) -> SpanExporter:
    """The SDK span exporter for `target` (ValueError for an unknown protocol)."""
    _keep_trace_flags()
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return _observed_grpc(GrpcSpanExporter, observer, "traces")(**_grpc_kwargs(target))
    if target.protocol == "http/json":
        from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter as JsonSpanExporter

        return JsonSpanExporter(**_json_kwargs(target, observer, "traces"))
    if target.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter(**_protobuf_kwargs(target, observer, "traces"))
    raise ValueError(f"telemetry.otlp_protocol: unknown protocol {target.protocol!r}")


def metric_exporter(target: Target, observer: Observer | None = None, *,
                    preferred_temporality: dict[type, AggregationTemporality] | None = None,
                    preferred_aggregation: dict[type, Aggregation] | None = None) -> MetricExporter:
    """The SDK metric exporter for `target`; temporality and aggregation preferences are passed through
    (None: the exporter's default, cumulative unless OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE says otherwise)."""
    prefs: dict[str, Any] = {"preferred_temporality": preferred_temporality,
                             "preferred_aggregation": preferred_aggregation}
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return _observed_grpc(GrpcMetricExporter, observer, "metrics")(**_grpc_kwargs(target), **prefs)
    if target.protocol == "http/json":
        from opentelemetry.exporter.otlp.json.http.metric_exporter import OTLPMetricExporter as JsonMetricExporter

        return JsonMetricExporter(**_json_kwargs(target, observer, "metrics"), **prefs)
    if target.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        return HttpMetricExporter(**_protobuf_kwargs(target, observer, "metrics"), **prefs)
    raise ValueError(f"telemetry.otlp_protocol: unknown protocol {target.protocol!r}")


# --- per protocol ---------------------------------------------------------------------------------
# The http exporters get a transport of ours (their `_transport` argument): it carries the CA and
# client certificate of the Target (so the SDK reads no certificate variable behind our settings'
# back) and reports each attempt to the observer.


def _tls(target: Target) -> dict[str, Any]:
    cert: str | tuple[str, str] | None = target.client_certificate
    if target.client_certificate and target.client_key:
        cert = (target.client_certificate, target.client_key)
    return {"verify": target.certificate or True, "cert": cert}


def _http_kwargs(target: Target) -> dict[str, Any]:
    return {"endpoint": target.url, "headers": dict(target.headers), "timeout": target.timeout_s}


def _protobuf_kwargs(target: Target, observer: Observer | None, signal: str) -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.http import Compression

    compression = Compression.Gzip if target.compression == "gzip" else Compression.NoCompression
    transport = _ObservedRequestsTransport(observer, signal, session=PinnedCaSession(), **_tls(target))
    return {**_http_kwargs(target), "compression": compression, "_transport": transport}


def _json_kwargs(target: Target, observer: Observer | None, signal: str) -> dict[str, Any]:
    # the json exporter sends with urllib3 (ca_certs on its pool), which reads no CA variable of its own
    from opentelemetry.exporter.otlp.common.http import Compression

    compression = Compression.GZIP if target.compression == "gzip" else Compression.NONE
    transport = _ObservedUrllib3Transport(observer, signal, **_tls(target))
    return {**_http_kwargs(target), "compression": compression, "_transport": transport}


class _Reporting:
    """What both http transports of ours do after each request: tell the observer how it went."""

    def __init__(self, observer: Observer | None, signal: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # the SDK transport this is mixed into
        self.observer = observer
        self.signal = signal

    def request(self, method: str, url: str, **kwargs: Any) -> BaseHTTPResult:
        result = super().request(method, url, **kwargs)  # type: ignore[misc]
        self._report(result)
        return result

    def _report(self, result: BaseHTTPResult) -> None:
        observer = self.observer
        if observer is None:
            return
        status = result.status_code
        if status is None:
            observer.attempt_failed(_describe(result.error))
        elif 200 <= status < 300:
            try:
                body = result.content()
                content_type = str(result.headers().get("content-type", ""))
            except Exception:  # noqa: BLE001 - an unreadable success body is still a success
                body, content_type = b"", ""
            observer.attempt_succeeded(*_rejected(self.signal, body, "json" in content_type))
        else:
            try:
                detail = result.content()[:200].decode("utf-8", "replace").strip()
            except Exception:  # noqa: BLE001
                detail = ""
            text = f"HTTP {status}"
            if detail and detail.isprintable():  # a text body says why; a protobuf Status body is skipped
                text += f": {detail}"
            observer.attempt_failed(text)


class _ObservedRequestsTransport(_Reporting, RequestsHTTPTransport):
    """http/protobuf's transport, reporting each attempt."""


class _ObservedUrllib3Transport(_Reporting, Urllib3HTTPTransport):
    """http/json's transport, reporting each attempt."""


# the default backoff of a gRPC channel grows to 120 s, during which every call fails at once with
# UNAVAILABLE: reconnect soon after the collector comes back
_GRPC_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                         ("grpc.max_reconnect_backoff_ms", 2000))


def _grpc_kwargs(target: Target) -> dict[str, Any]:
    try:
        import grpc
    except ImportError:
        raise ValueError("telemetry.otlp_protocol: grpc needs the grpcio package; "
                         "install it or use http/protobuf") from None
    credentials = None
    if not target.insecure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(target.certificate),
            private_key=_read(target.client_key or target.client_certificate),
            certificate_chain=_read(target.client_certificate),
        )
    scheme = "http" if target.insecure else "https"
    return {
        "endpoint": f"{scheme}://{target.url}",
        "insecure": target.insecure,
        "credentials": credentials,
        # with none the exporter reads OTEL_EXPORTER_OTLP_HEADERS itself, which the Target has merged already
        "headers": tuple(target.headers) or None,
        "timeout": target.timeout_s,
        "compression": grpc.Compression.Gzip if target.compression == "gzip" else grpc.Compression.NoCompression,
        "channel_options": _GRPC_CHANNEL_OPTIONS,
    }


def _observed_grpc(cls: type, observer: Observer | None, signal: str) -> Any:
    """`cls` (a grpc exporter class) with an interceptor reporting each call, when there is an observer."""
    if observer is None:
        return cls
    import grpc

    class Interceptor(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            outcome = continuation(details, request)
            error = outcome.exception()
            if error is None:
                partial = outcome.result().partial_success
                rejected = partial.rejected_spans if signal == "traces" else partial.rejected_data_points
                observer.attempt_succeeded(rejected, partial.error_message)
            else:
                code = error.code() if hasattr(error, "code") else None
                details_text = error.details() if hasattr(error, "details") else str(error)
                observer.attempt_failed(f"gRPC {code.name if code else 'UNKNOWN'}: {details_text}".strip())
            return outcome

    class Observed(cls):  # type: ignore[misc, valid-type]
        def _initialize_channel_and_stub(self) -> None:
            # the exporter (re)creates its channel here (also after UNAVAILABLE): the stub talks through ours
            super()._initialize_channel_and_stub()
            self._client = self._stub(grpc.intercept_channel(self._channel, Interceptor()))

    return Observed


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _rejected(signal: str, payload: bytes, is_json: bool) -> tuple[int, str]:
    """The partial-success count and message of an Export response body (protobuf or OTLP JSON)."""
    if not payload:
        return 0, ""
    try:
        if is_json:
            import json

            partial = json.loads(payload).get("partialSuccess") or {}
            key = "rejectedSpans" if signal == "traces" else "rejectedDataPoints"
            return int(partial.get(key) or 0), str(partial.get("errorMessage") or "")
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        if signal == "traces":
            trace_response = ExportTraceServiceResponse.FromString(payload)
            return trace_response.partial_success.rejected_spans, trace_response.partial_success.error_message
        metric_response = ExportMetricsServiceResponse.FromString(payload)
        return metric_response.partial_success.rejected_data_points, metric_response.partial_success.error_message
    except Exception:  # noqa: BLE001 - an unreadable success body is still a success
        return 0, ""


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no response"
    text = str(error) or type(error).__name__
    return text if text.startswith(type(error).__name__) else f"{type(error).__name__}: {text}"


# --- the W3C trace flags in Span.flags ---------------------------------------------------------------

_flags_lock = threading.Lock()
_flags_kept = False


def _keep_trace_flags() -> None:
    """Makes the SDK's span encoders (protobuf, used by http/protobuf and grpc, and JSON) put the span's W3C
    trace flags in the low byte of Span.flags, as the OTLP spec says (and the Java and Go SDKs do): Python's
    write only the is-remote bits (opentelemetry-python issue #4666, fix not released). Once per process."""
    global _flags_kept
    with _flags_lock:
        if _flags_kept:
            return
        from opentelemetry.exporter.otlp.json.common._internal import trace_encoder as json_encoder
        from opentelemetry.exporter.otlp.proto.common._internal import trace_encoder as proto_encoder

        for module in (proto_encoder, json_encoder):
            module._encode_span = _with_trace_flags(module._encode_span)  # type: ignore[attr-defined]
        _flags_kept = True


def _with_trace_flags(encode: Any) -> Any:
    def encode_span(sdk_span: Any) -> Any:
        encoded = encode(sdk_span)
        encoded.flags |= int(sdk_span.get_span_context().trace_flags) & 0xFF
        return encoded

    encode_span.__wrapped__ = encode  # type: ignore[attr-defined]
    return encode_span
