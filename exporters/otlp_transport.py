"""Sends one encoded OTLP request to a collector, over HTTP (http.client, kept-alive connection) or gRPC (grpcio), and says whether to retry.

Transports never raise: `send()` returns an `ExportResult`. They are used from one exporter
thread each and hold at most one connection or channel.
"""
from __future__ import annotations

import gzip
import http.client
import socket
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from .settings import Target

USER_AGENT = "meterline-otlp/0.1"
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_GRPC_RETRYABLE = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                             "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"})
_GRPC_METHODS = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
}


@dataclass(slots=True, frozen=True)
class ExportResult:
    ok: bool
    retryable: bool = False
    error: str = ""
    retry_after_s: float | None = None  # the server's hint, when it gave one
    rejected: int = 0  # items the collector refused in a partial success


OK = ExportResult(True)


class Transport(Protocol):
    endpoint: str

    def send(self, body: bytes) -> ExportResult: ...

    def close(self) -> None: ...


def make_transport(target: Target, signal: str) -> Transport:
    """A transport for `signal` ("traces"; metrics go through the SDK's exporter); ValueError when grpc is
    asked for without grpcio."""
    if target.protocol == "grpc":
        return GrpcTransport(target, signal)
    return HttpTransport(target, signal)


def _rejected(signal: str, payload: bytes) -> tuple[int, str]:
    """The partial-success count and message of an Export response body."""
    if not payload:
        return 0, ""
    try:
        trace_response = ExportTraceServiceResponse.FromString(payload)
        return trace_response.partial_success.rejected_spans, trace_response.partial_success.error_message
    except Exception:  # noqa: BLE001 - an unreadable success body is still a success
        return 0, ""


class HttpTransport:
    def __init__(self, target: Target, signal: str) -> None:
        parts = urlsplit(target.url)
        self.endpoint = target.url
        self.signal = signal
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = target.timeout_s
        self._gzip = target.compression == "gzip"
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": USER_AGENT}
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._headers.update(dict(target.headers))
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def send(self, body: bytes) -> ExportResult:
        payload = gzip.compress(body, compresslevel=5) if self._gzip else body
        try:
            conn = self._connection()
            conn.request("POST", self._path, body=payload, headers=self._headers)
            response = conn.getresponse()
            data = response.read()
            status = response.status
            retry_after = response.getheader("Retry-After")
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException, ssl.SSLError) as e:
            self.close()
            return ExportResult(False, retryable=True, error=_describe(e))
        if 200 <= status < 300:
            rejected, message = _rejected(self.signal, data)
            return ExportResult(True, rejected=rejected, error=message) if rejected else OK
        text = f"HTTP {status}"
        detail = data[:200].decode("utf-8", "replace").strip()
        if detail and detail.isprintable():  # a text body says why; a protobuf Status body is skipped
            text += f": {detail}"
        return ExportResult(False, retryable=status in RETRYABLE_HTTP, error=text,
                            retry_after_s=_seconds(retry_after))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None


class GrpcTransport:
    def __init__(self, target: Target, signal: str) -> None:
        try:
            import grpc
        except ImportError:
            raise ValueError("telemetry.otlp_protocol: grpc needs the grpcio package; "
                             "install it or use http/protobuf") from None
        self._grpc = grpc
        self.endpoint = target.url
        self.signal = signal
        self._timeout = target.timeout_s
        self._metadata = tuple((k.lower(), v) for k, v in target.headers)
        self._compression = grpc.Compression.Gzip if target.compression == "gzip" else None
        self._secure = not target.insecure
        self._channel = None
        self._call = None

    def _method(self):  # type: ignore[no-untyped-def]
        if self._call is None:
            grpc = self._grpc
            # reconnect soon after the collector comes back: the default backoff grows to 120 s, during
            # which every call fails at once with UNAVAILABLE whatever our own retries do
            options = [("grpc.primary_user_agent", USER_AGENT), ("grpc.initial_reconnect_backoff_ms", 250),
                       ("grpc.min_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
            if self._secure:
                self._channel = grpc.secure_channel(self.endpoint, grpc.ssl_channel_credentials(), options=options,
                                                    compression=self._compression)
            else:
                self._channel = grpc.insecure_channel(self.endpoint, options=options, compression=self._compression)
            # bytes in, bytes out: the request is encoded already, the response is read by _rejected
            self._call = self._channel.unary_unary(_GRPC_METHODS[self.signal])
        return self._call

    def send(self, body: bytes) -> ExportResult:
        grpc = self._grpc
        try:
            data = self._method()(body, timeout=self._timeout, metadata=self._metadata or None)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else ""
            return ExportResult(False, retryable=name in _GRPC_RETRYABLE, error=f"gRPC {name}: {details}".strip())
        except Exception as e:  # noqa: BLE001 - a transport never raises
            self.close()
            return ExportResult(False, retryable=True, error=_describe(e))
        rejected, message = _rejected(self.signal, data or b"")
        return ExportResult(True, rejected=rejected, error=message) if rejected else OK

    def close(self) -> None:
        if self._channel is not None:
            try:
                self._channel.close()
            except Exception:  # noqa: BLE001
                pass
        self._channel = None
        self._call = None


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if not text.startswith(type(e).__name__) else text


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: the backoff decides
    return seconds if seconds >= 0 else None
