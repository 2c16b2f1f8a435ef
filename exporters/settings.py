"""Telemetry settings: the config file's `telemetry:` keys and the standard OTEL_* variables, validated and frozen.

A key in the config file wins over its environment variable, which wins over the default.
Bad values raise ValueError naming the key (`telemetry.otlp_protocol: ...`) or the variable.
See exporters/README.md for the table of keys.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from . import semconv

log = logging.getLogger("meterline.telemetry")

PROTOCOLS = ("http/protobuf", "http/json", "grpc")
SAMPLERS = ("always_on", "always_off", "traceidratio",
            "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")
DEFAULT_SAMPLER = "parentbased_always_on"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SERVICE_NAME = "meterline"
# Spans arrive in the ledger writer's batches (up to ledger.writer.MAX_BATCH, 5,000, after the
# writer falls behind), not one at a time as OTel's default of 2,048 assumes: a smaller queue drops
# the excess of every large batch even while the exporter keeps up.
QUEUE_MAX_SPANS = 8192

KEYS = {
    "otlp_endpoint", "otlp_traces_endpoint", "otlp_metrics_endpoint", "otlp_protocol", "otlp_headers",
    "otlp_timeout_s", "otlp_compression", "otlp_insecure", "otlp_certificate", "otlp_client_certificate",
    "otlp_client_key", "service_name", "resource_attributes",
    "sampler", "sampler_arg", "semconv_opt_in", "capture_content", "content_max_bytes",
    "traces", "metrics", "metrics_export_interval_s", "metric_tag_labels", "metric_max_series",
    "budget_key_label", "queue_max_spans", "batch_max_spans", "batch_delay_s",
    "jaeger_ui_url",  # read by the sidecar's dashboard for trace links, not by the exporters
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where one signal goes: an http(s) URL for http/protobuf and http/json, host:port for grpc."""

    protocol: str
    url: str  # http/protobuf, http/json: the full URL (…/v1/traces); grpc: host:port
    headers: tuple[tuple[str, str], ...]
    timeout_s: float
    compression: str | None  # "gzip" or None
    insecure: bool = True  # grpc only: plaintext channel
    certificate: str | None = None  # PEM file of the CA(s) to trust for the endpoint (else the system's)
    client_certificate: str | None = None  # PEM file of the client certificate for mTLS
    client_key: str | None = None  # PEM file of its private key


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    traces: Target | None = None  # None: no spans are built at all
    metrics_target: Target | None = None  # None: metrics are served as Prometheus text only
    metrics: bool = True  # False: no metric aggregation (and no Prometheus series)
    service_name: str = DEFAULT_SERVICE_NAME
    resource_attributes: tuple[tuple[str, str | int | float | bool], ...] = ()
    sampler: str = DEFAULT_SAMPLER
    sampler_arg: float = 1.0
    names: semconv.Names = semconv.RELEASED
    capture_content: bool = False
    content_max_bytes: int = 16384
    metrics_export_interval_s: float = 60.0
    metric_tag_labels: tuple[str, ...] = ()
    metric_max_series: int = 2000
    budget_key_label: bool = False
    queue_max_spans: int = QUEUE_MAX_SPANS
    batch_max_spans: int = 512
    batch_delay_s: float = 5.0
    app_name: str | None = field(default=None, compare=False)


def tracing_enabled(settings: TelemetrySettings) -> bool:
    """Whether spans are exported at all (so the sidecar should propagate its own span context upstream)."""
    return settings.traces is not None and settings.sampler != "always_off"


class _Source:
    """Reads one setting from the config mapping (key `telemetry.<key>`) or else an environment variable."""

    def __init__(self, config: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.config = config
        self.env = env
        self._warned: set[str] = set()

    def warn(self, message: str) -> None:
        """Logs a warning once per load (a variable read for both signals warns once)."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def get(self, key: str, var: str | None = None) -> tuple[Any, str] | None:
        """(value, where) with where naming the key or variable; None when neither is set."""
        if key in self.config and self.config[key] is not None:
            return self.config[key], f"telemetry.{key}"
        if var is not None:
            value = self.env.get(var, "").strip()
            if value:
                return value, var
        return None

    def var(self, name: str) -> tuple[str, str] | None:
        """An environment variable alone (for settings with no config key of their own)."""
        value = self.env.get(name, "").strip()
        return (value, name) if value else None


def load_settings(config: Mapping[str, Any] | None, env: Mapping[str, str],
                  app_name: str | None = None) -> TelemetrySettings:
    config = config or {}
    if not isinstance(config, Mapping):
        raise ValueError("telemetry: expected a mapping of keys to values")
    unknown = sorted(str(k) for k in config if k not in KEYS)
    if unknown:
        raise ValueError(f"telemetry.{unknown[0]}: unknown key (known: {', '.join(sorted(KEYS))})")
    src = _Source(config, env)

    sdk_disabled = _bool(src.var("OTEL_SDK_DISABLED"), False)
    traces_on = _bool(src.get("traces"), True) and _exporter_on(env, "OTEL_TRACES_EXPORTER") and not sdk_disabled
    metrics_on = _bool(src.get("metrics"), True)
    otlp_metrics_on = metrics_on and _exporter_on(env, "OTEL_METRICS_EXPORTER") and not sdk_disabled

    traces = _target(src, "traces") if traces_on else None
    metrics_target = _target(src, "metrics") if otlp_metrics_on else None

    sampler, sampler_arg = _sampler(src)
    resource = _resource(src)
    service = _string(src.get("service_name", "OTEL_SERVICE_NAME"))
    if service is None:
        service = str(resource.get("service.name") or app_name or DEFAULT_SERVICE_NAME)
    resource["service.name"] = service
    opt_in = src.get("semconv_opt_in", "OTEL_SEMCONV_STABILITY_OPT_IN")
    if opt_in is not None and not isinstance(opt_in[0], str):
        raise ValueError(f"{opt_in[1]}: expected a comma-separated string such as {semconv.OPT_IN_LATEST}")
    capture = src.get("capture_content", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")
    tag_labels = config.get("metric_tag_labels") or ()
    if isinstance(tag_labels, str):
        tag_labels = [t.strip() for t in tag_labels.split(",") if t.strip()]
    if not isinstance(tag_labels, (list, tuple)) or not all(isinstance(t, str) and t for t in tag_labels):
        raise ValueError("telemetry.metric_tag_labels: expected a list of tag names, e.g. [team]")

    return TelemetrySettings(
        traces=traces,
        metrics_target=metrics_target,
        metrics=metrics_on,
        service_name=service,
        resource_attributes=tuple(resource.items()),
        sampler=sampler,
        sampler_arg=sampler_arg,
        names=semconv.names_for(opt_in[0] if opt_in else ""),
        capture_content=_capture(capture),
        content_max_bytes=_int(src.get("content_max_bytes"), 16384, minimum=0),
        metrics_export_interval_s=_seconds(src.get("metrics_export_interval_s", "OTEL_METRIC_EXPORT_INTERVAL"), 60.0),
        metric_tag_labels=tuple(dict.fromkeys(tag_labels)),
        metric_max_series=_int(src.get("metric_max_series"), 2000, minimum=1),
        budget_key_label=_bool(src.get("budget_key_label"), False),
        queue_max_spans=_int(src.get("queue_max_spans", "OTEL_BSP_MAX_QUEUE_SIZE"), QUEUE_MAX_SPANS, minimum=1),
        batch_max_spans=_int(src.get("batch_max_spans", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), 512, minimum=1),
        batch_delay_s=_seconds(src.get("batch_delay_s", "OTEL_BSP_SCHEDULE_DELAY"), 5.0),
        app_name=app_name,
    )


# --- one setting at a time ------------------------------------------------------------------------


def _target(src: _Source, signal: str) -> Target | None:
    """The endpoint of one signal ("traces" or "metrics"), or None when no endpoint is configured."""
    upper = signal.upper()
    protocol_v = (src.get("otlp_protocol", f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
                  or src.var("OTEL_EXPORTER_OTLP_PROTOCOL"))
    protocol = "http/protobuf"
    if protocol_v is not None:
        protocol = str(protocol_v[0]).strip().lower()
        if protocol not in PROTOCOLS:
            raise ValueError(f"{protocol_v[1]}: expected http/protobuf, http/json or grpc, got {protocol_v[0]!r}")

    # config keys first, then variables; a signal's own endpoint before the shared one
    signal_endpoint = src.get(f"otlp_{signal}_endpoint")
    chosen = signal_endpoint or src.get("otlp_endpoint")
    if chosen is None:
        signal_endpoint = src.var(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")
        chosen = signal_endpoint or src.var("OTEL_EXPORTER_OTLP_ENDPOINT")
    if chosen is None:
        return None
    raw, where = chosen
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{where}: expected a URL such as http://localhost:4318, got {raw!r}")
    raw = raw.strip()
    insecure_v = (src.get("otlp_insecure", f"OTEL_EXPORTER_OTLP_{upper}_INSECURE")
                  or src.var("OTEL_EXPORTER_OTLP_INSECURE"))

    if protocol == "grpc":
        parts = urlsplit(raw if "://" in raw else f"//{raw}")
        if parts.scheme not in ("", "http", "https") or not parts.hostname:
            raise ValueError(f"{where}: expected a gRPC endpoint such as http://localhost:4317, got {raw!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 4317)
        except ValueError:
            raise ValueError(f"{where}: bad port in {raw!r}") from None
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        insecure = parts.scheme == "http" or (parts.scheme == "" and _bool(insecure_v, False))
        url = f"{host}:{port}"
    else:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{where}: expected an http(s) URL such as http://localhost:4318, got {raw!r}")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{where}: bad port in {raw!r}") from None
        # the per-signal variable is the full URL; the base one gets /v1/<signal> appended
        url = raw if signal_endpoint is not None else raw.rstrip("/") + f"/v1/{signal}"
        insecure = parts.scheme == "http"

    headers = dict(_pairs(src.var("OTEL_EXPORTER_OTLP_HEADERS"), lower=True))
    headers.update(_pairs(src.var(f"OTEL_EXPORTER_OTLP_{upper}_HEADERS"), lower=True))
    headers.update(_pairs(src.get("otlp_headers"), lower=True))
    timeout = (src.get("otlp_timeout_s") or src.var(f"OTEL_EXPORTER_OTLP_{upper}_TIMEOUT")
               or src.var("OTEL_EXPORTER_OTLP_TIMEOUT"))
    compression_v = (src.get("otlp_compression", f"OTEL_EXPORTER_OTLP_{upper}_COMPRESSION")
                     or src.var("OTEL_EXPORTER_OTLP_COMPRESSION"))
    compression = None
    if compression_v is not None:
        value = str(compression_v[0]).strip().lower()
        if value not in ("gzip", "none"):
            raise ValueError(f"{compression_v[1]}: expected gzip or none, got {compression_v[0]!r}")
        compression = "gzip" if value == "gzip" else None
    certificate = _file(src, signal, "otlp_certificate", "CERTIFICATE")
    client_certificate = _file(src, signal, "otlp_client_certificate", "CLIENT_CERTIFICATE")
    client_key = _file(src, signal, "otlp_client_key", "CLIENT_KEY")
    if client_key is not None and client_certificate is None:
        raise ValueError(f"{client_key[1]}: a client key needs a client certificate "
                         f"(telemetry.otlp_client_certificate or OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)")
    return Target(protocol, url, tuple(headers.items()), _seconds(timeout, DEFAULT_TIMEOUT_S), compression,
                  insecure, certificate[0] if certificate else None,
                  client_certificate[0] if client_certificate else None, client_key[0] if client_key else None)


def _file(src: _Source, signal: str, key: str, suffix: str) -> tuple[str, str] | None:
    """A PEM file setting (key, then OTEL_EXPORTER_OTLP_<SIGNAL>_<suffix>, then the shared variable), checked readable."""
    got = (src.get(key) or src.var(f"OTEL_EXPORTER_OTLP_{signal.upper()}_{suffix}")
           or src.var(f"OTEL_EXPORTER_OTLP_{suffix}"))
    if got is None:
        return None
    value, where = got
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected the path of a PEM file, got {value!r}")
    path = os.path.expanduser(value.strip())
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path!r}: {e.strerror or e}") from None
    return path, where


def _sampler(src: _Source) -> tuple[str, float]:
    got = src.get("sampler", "OTEL_TRACES_SAMPLER")
    name = DEFAULT_SAMPLER
    if got is not None:
        name = str(got[0]).strip().lower()
        if name not in SAMPLERS:
            if got[1].startswith("telemetry."):
                raise ValueError(f"{got[1]}: expected one of {', '.join(SAMPLERS)}, got {got[0]!r}")
            # a variable shared with the app's SDK may name a sampler only that SDK has
            src.warn(f"{got[1]}={got[0]} is not supported by meterline; using {DEFAULT_SAMPLER}")
            name = DEFAULT_SAMPLER
    arg = 1.0
    if name.endswith("traceidratio"):
        got_arg = src.get("sampler_arg", "OTEL_TRACES_SAMPLER_ARG")
        if got_arg is not None:
            try:
                arg = float(got_arg[0])
            except (TypeError, ValueError):
                arg = -1.0
            if isinstance(got_arg[0], bool) or not 0.0 <= arg <= 1.0:
                raise ValueError(f"{got_arg[1]}: expected a probability between 0 and 1, got {got_arg[0]!r}")
    return name, arg


def _resource(src: _Source) -> dict[str, str | int | float | bool]:
    result: dict[str, str | int | float | bool] = dict(_pairs(src.var("OTEL_RESOURCE_ATTRIBUTES")))
    got = src.get("resource_attributes")
    if got is not None:
        value, where = got
        if isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str) or not k or not isinstance(v, (str, int, float, bool)):
                    raise ValueError(f"{where}.{k}: expected a string, number or boolean value")
                result[k] = v
        else:
            result.update(_pairs(got))
    return result


def _pairs(got: tuple[Any, str] | None, lower: bool = False) -> list[tuple[str, str]]:
    """`k=v,k2=v2` (W3C baggage-like, values percent-decoded) or a mapping, as (key, value) pairs."""
    if got is None:
        return []
    value, where = got
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
        for k, v in items:
            if not k or not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ValueError(f"{where}.{k}: expected a string value")
        return [(k.lower() if lower else k, str(v)) for k, v in items]
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected key=value pairs separated by commas, or a mapping")
    result = []
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        key = unquote(key.strip())
        if not sep or not key:
            raise ValueError(f"{where}: expected key=value pairs separated by commas, got {item.strip()!r}")
        result.append((key.lower() if lower else key, unquote(val.strip())))
    return result


def _exporter_on(env: Mapping[str, str], var: str) -> bool:
    """OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER: only `none` matters to meterline (it turns OTLP export off)."""
    values = {v.strip().lower() for v in env.get(var, "").split(",") if v.strip()}
    return values != {"none"}


def _bool(got: tuple[Any, str] | None, default: bool) -> bool:
    if got is None:
        return default
    value, where = got
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{where}: expected true or false, got {value!r}")


def _capture(got: tuple[Any, str] | None) -> bool:
    # the GenAI instrumentations' variable also takes SPAN_ONLY / SPAN_AND_EVENT / NO_CONTENT
    if got is not None and isinstance(got[0], str) and not got[1].startswith("telemetry."):
        value = got[0].strip().lower()
        if value in ("span_only", "span_and_event"):
            return True
        if value in ("no_content", "event_only"):
            return False
    return _bool(got, False)


def _int(got: tuple[Any, str] | None, default: int, minimum: int) -> int:
    if got is None:
        return default
    value, where = got
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{where}: expected a whole number of at least {minimum}, got {value!r}")
    return number


def _seconds(got: tuple[Any, str] | None, default: float) -> float:
    """A duration: seconds in the config file, milliseconds in OTEL_* variables (as the spec has it)."""
    if got is None:
        return default
    value, where = got
    try:
        number = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0:
        unit = "seconds" if where.startswith("telemetry.") else "milliseconds"
        raise ValueError(f"{where}: expected a positive number of {unit}, got {value!r}")
    return number if where.startswith("telemetry.") else number / 1000.0


def _string(got: tuple[Any, str] | None) -> str | None:
    if got is None:
        return None
    value, where = got
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()
