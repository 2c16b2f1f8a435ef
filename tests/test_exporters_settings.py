"""Telemetry settings: the standard OTEL_* variables, the config file's `telemetry:` keys, precedence and errors naming the key."""
from __future__ import annotations

import pytest

from exporters import Telemetry, load_settings, semconv, tracing_enabled
from exporters.sampling import Sampler


def test_nothing_configured_means_no_tracing_and_nothing_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    settings = load_settings({}, {})
    assert settings.traces is None and settings.metrics_target is None
    assert not tracing_enabled(settings)
    telemetry = Telemetry({}, {})
    assert not telemetry.tracing_enabled
    assert telemetry._spans is None  # no encoder, no queue, no thread: no span is ever built
    telemetry.start()
    telemetry.shutdown(1)
    assert caplog.records == []


def test_http_endpoint_from_the_standard_variables() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_SERVICE_NAME": "checkout",
           "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-team=search",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=ignored",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}
    s = load_settings({}, env)
    assert s.traces is not None and s.metrics_target is not None
    assert s.traces.protocol == "http/protobuf"
    assert s.traces.url == "http://collector:4318/v1/traces"
    assert s.metrics_target.url == "http://collector:4318/v1/metrics"
    assert dict(s.traces.headers) == {"authorization": "Bearer abc", "x-team": "search"}
    assert s.traces.timeout_s == 2.5 and s.traces.compression == "gzip"
    assert dict(s.resource_attributes) == {"deployment.environment": "prod", "service.name": "checkout"}
    assert tracing_enabled(s)


def test_signal_endpoint_is_used_as_is_and_grpc_targets_host_port() -> None:
    s = load_settings({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/custom/path"})
    assert s.traces is not None and s.traces.url == "https://traces.example/custom/path"
    assert s.metrics_target is None  # only traces were given an endpoint
    g = load_settings({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert g.traces is not None and (g.traces.protocol, g.traces.url, g.traces.insecure) == ("grpc", "jaeger:4317", True)
    tls = load_settings({"otlp_endpoint": "https://otlp.example", "otlp_protocol": "grpc"}, {})
    assert tls.traces is not None and (tls.traces.url, tls.traces.insecure) == ("otlp.example:443", False)


def test_config_keys_win_over_variables() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318", "OTEL_SERVICE_NAME": "from-env",
           "OTEL_TRACES_SAMPLER": "always_off", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env-traces:4318/x"}
    config = {"otlp_endpoint": "http://file:4318", "service_name": "from-file", "sampler": "traceidratio",
              "sampler_arg": 0.25, "otlp_headers": {"X-Key": "k"}, "resource_attributes": {"team": "search"},
              "capture_content": True, "content_max_bytes": 100, "metric_tag_labels": ["team"],
              "metrics_export_interval_s": 15, "semconv_opt_in": "gen_ai_latest_experimental"}
    s = load_settings(config, env)
    assert s.traces is not None and s.traces.url == "http://file:4318/v1/traces"
    assert s.service_name == "from-file" and dict(s.resource_attributes)["team"] == "search"
    assert (s.sampler, s.sampler_arg) == ("traceidratio", 0.25)
    assert dict(s.traces.headers) == {"x-key": "k"}
    assert s.capture_content and s.content_max_bytes == 100 and s.metric_tag_labels == ("team",)
    assert s.metrics_export_interval_s == 15 and s.names is semconv.LATEST


def test_service_name_falls_back_to_the_app_then_meterline() -> None:
    assert load_settings({}, {}, "checkout").service_name == "checkout"
    assert load_settings({}, {}).service_name == "meterline"
    assert load_settings({}, {"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing"}, "x").service_name == "billing"


@pytest.mark.parametrize(("config", "message"), [
    ({"otlp_protocol": "http/thrift"}, "telemetry.otlp_protocol: expected http/protobuf, http/json or grpc"),
    ({"otlp_endpoint": "collector:4318"}, "telemetry.otlp_endpoint: expected an http(s) URL"),
    ({"sampler": "sometimes"}, "telemetry.sampler: expected one of always_on"),
    ({"sampler": "traceidratio", "sampler_arg": 2}, "telemetry.sampler_arg: expected a probability"),
    ({"capture_content": "yes"}, "telemetry.capture_content: expected true or false"),
    ({"content_max_bytes": -1}, "telemetry.content_max_bytes: expected a whole number"),
    ({"metrics_export_interval_s": 0}, "telemetry.metrics_export_interval_s: expected a positive number"),
    ({"metric_tag_labels": "team,"}, None),
    ({"metric_tag_labels": [1]}, "telemetry.metric_tag_labels: expected a list of tag names"),
    ({"otlp_headers": 5}, "telemetry.otlp_headers: expected key=value pairs"),
    ({"resource_attributes": {"a": [1]}}, "telemetry.resource_attributes.a"),
    ({"otlp_compression": "br"}, "telemetry.otlp_compression: expected gzip or none"),
    ({"exporter": "jaeger"}, "telemetry.exporter: unknown key"),
])
def test_bad_config_values_name_the_key(config: dict, message: str | None) -> None:
    full = {"otlp_endpoint": "http://127.0.0.1:4318", **config}
    if message is None:
        load_settings(full, {})
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Telemetry(full, {})


def test_bad_variables_name_the_variable() -> None:
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL: expected http/protobuf, http/json or grpc"):
        load_settings({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "smtp"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG: expected a probability"):
        load_settings({}, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"})


def test_variables_meant_for_other_sdks_fall_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # http/json used to fall back here too; it is supported now (on the SDK's exporter)
    s = load_settings({}, {"OTEL_TRACES_SAMPLER": "jaeger_remote", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert s.sampler == "parentbased_always_on"
    assert s.traces is not None and s.traces.protocol == "http/json"
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_exporters_none_and_always_off_disable_tracing() -> None:
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    assert not tracing_enabled(load_settings({}, {**base, "OTEL_TRACES_EXPORTER": "none"}))
    assert not tracing_enabled(load_settings({}, {**base, "OTEL_TRACES_SAMPLER": "always_off"}))
    assert not tracing_enabled(load_settings({}, {**base, "OTEL_SDK_DISABLED": "true"}))
    assert not tracing_enabled(load_settings({"traces": False}, base))
    metrics_off = load_settings({}, {**base, "OTEL_METRICS_EXPORTER": "none"})
    assert metrics_off.metrics_target is None and metrics_off.metrics  # Prometheus stays


def test_semconv_opt_in_switches_the_names() -> None:
    assert load_settings({}, {}).names is semconv.RELEASED
    latest = load_settings({}, {"OTEL_SEMCONV_STABILITY_OPT_IN": "http, gen_ai_latest_experimental"}).names
    assert latest is semconv.LATEST
    assert semconv.RELEASED.cache_write_tokens == "gen_ai.usage.cache_creation.input_tokens"
    assert latest.cache_write_tokens == "gen_ai.usage.cache_write.input_tokens"
    assert (semconv.RELEASED.provider_legacy, latest.provider_legacy) == ("gen_ai.system", None)


def test_samplers() -> None:
    parent, child_of_unsampled = "00f067aa0ba902b7", ("b7ad6b7169203331", False)
    ids = [f"{i:016x}{(i * 0x9E3779B97F4A7C15) & (2**64 - 1):016x}" for i in range(4000)]
    assert Sampler("always_on")(ids[0], *child_of_unsampled)
    assert not Sampler("always_off")(ids[0], parent, True)
    assert Sampler("parentbased_always_on")(ids[0], None, True)
    assert not Sampler("parentbased_always_on")(ids[0], *child_of_unsampled)
    assert Sampler("parentbased_always_off")(ids[0], parent, True)
    assert not Sampler("parentbased_always_off")(ids[0], None, True)
    ratio = Sampler("traceidratio", 0.25)
    kept = [t for t in ids if ratio(t, None, True)]
    assert 800 < len(kept) < 1200  # about a quarter
    assert kept == [t for t in ids if ratio(t, parent, False)]  # deterministic on the trace id, parent ignored
    assert all(Sampler("traceidratio", 0.5)(t, None, True) for t in kept)  # a higher ratio keeps a superset
    based = Sampler("parentbased_traceidratio", 0.25)
    assert [t for t in ids if based(t, None, True)] == kept
    assert all(based(t, parent, True) for t in ids) and not any(based(t, parent, False) for t in ids)
    assert not any(Sampler("traceidratio", 0.0)(t, None, True) for t in ids)
