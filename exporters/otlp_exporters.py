"""Builds the OpenTelemetry SDK's OTLP exporter of one signal (spans or metrics) from a validated `Target`.

`span_exporter(target)` and `metric_exporter(target)` pick the exporter of the target's protocol
(`http/protobuf`: opentelemetry-exporter-otlp-proto-http, `grpc`: ...-proto-grpc, `http/json`:
opentelemetry-exporter-otlp-json-http) and pass every setting explicitly: endpoint, headers,
timeout, compression, insecure and the CA / client certificate files. The SDK's own retry (the
spec's: 429/502/503/504 and connection errors, or the gRPC retryable codes, with exponential
backoff and Retry-After, within the timeout) is kept as it is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests

from .settings import Target

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter
    from opentelemetry.sdk.metrics.view import Aggregation
    from opentelemetry.sdk.trace.export import SpanExporter


class PinnedCaSession(requests.Session):
    """A requests Session whose configured CA file is not replaced by REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE.

    Why: the SDK's http/protobuf exporter sends through `RequestsHTTPTransport`, which puts the CA
    file (certificate_file or OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]CERTIFICATE) on `session.verify`
    and calls `session.request()` without a `verify` argument. `Session.request()` then calls
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


def span_exporter(target: Target) -> SpanExporter:
    """The SDK span exporter for `target` (ValueError for an unknown protocol)."""
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter(**_grpc_kwargs(target))
    if target.protocol == "http/json":
        from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter as JsonSpanExporter

        return JsonSpanExporter(**_json_kwargs(target))
    if target.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter(**_protobuf_kwargs(target))
    raise ValueError(f"telemetry.otlp_protocol: unknown protocol {target.protocol!r}")


def metric_exporter(target: Target, *,
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

        return GrpcMetricExporter(**_grpc_kwargs(target), **prefs)
    if target.protocol == "http/json":
        from opentelemetry.exporter.otlp.json.http.metric_exporter import OTLPMetricExporter as JsonMetricExporter

        return JsonMetricExporter(**_json_kwargs(target), **prefs)
    if target.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        return HttpMetricExporter(**_protobuf_kwargs(target), **prefs)
    raise ValueError(f"telemetry.otlp_protocol: unknown protocol {target.protocol!r}")


def endpoint(target: Target) -> str:
    """The endpoint as stats() and logs show it."""
    return target.url


# --- per protocol ---------------------------------------------------------------------------------


def _http_kwargs(target: Target) -> dict[str, Any]:
    return {
        "endpoint": target.url,
        "certificate_file": target.certificate,
        "client_certificate_file": target.client_certificate,
        "client_key_file": target.client_key,
        "headers": dict(target.headers),
        "timeout": target.timeout_s,
    }


def _protobuf_kwargs(target: Target) -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.http import Compression

    compression = Compression.Gzip if target.compression == "gzip" else Compression.NoCompression
    return {**_http_kwargs(target), "compression": compression, "session": PinnedCaSession()}


def _json_kwargs(target: Target) -> dict[str, Any]:
    # the json exporter sends with urllib3 (ca_certs on its pool), which reads no CA variable of its own
    from opentelemetry.exporter.otlp.common.http import Compression

    compression = Compression.GZIP if target.compression == "gzip" else Compression.NONE
    return {**_http_kwargs(target), "compression": compression}


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
            private_key=_read(target.client_key or (target.client_certificate if target.client_certificate else None)),
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
    }


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()
