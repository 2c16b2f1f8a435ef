"""OTLP through the OpenTelemetry SDK's exporters: http/json, TLS with a configured CA (also against REQUESTS_CA_BUNDLE), mTLS, gRPC over TLS.

Certificates are made here (the `cryptography` package): a CA that signs the receiver's
certificate (for 127.0.0.1) and a client certificate, and another CA that signs nothing of ours.
The receivers are the ones in tests/otlp_receiver.py, decoding what they get with the
opentelemetry.proto classes (JSON through the OTLP JSON mapping).
"""
from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exporters import Telemetry, load_settings
from tests.fakes import FakeProvider
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, attributes, call, server_tls
from tests.sidecar_process import Sidecar

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
FAST = {"batch_delay_s": 0.05, "metrics": False}
SHORT = {"otlp_timeout_s": 1.0}  # for exports that must fail: the SDK retries within this


# --- certificates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the server and the client certificate
    other_ca: Path  # signs nothing we use (what REQUESTS_CA_BUNDLE points at)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
                 issuer_key: ec.EllipticCurvePrivateKey | None = None, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if issuer_key is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _certificate("meterline test CA", ca_key, ca=True)
    other = _certificate("some other CA", other_key, ca=True)
    server = _certificate("127.0.0.1", server_key, ca.subject, ca_key, server=True)
    client = _certificate("meterline sidecar", client_key, ca.subject, ca_key)
    _write(d / "ca.pem", ca)
    _write(d / "other-ca.pem", other)
    _write(d / "server.pem", server, server_key)
    _write(d / "client.pem", client, client_key)
    return Pki(d / "ca.pem", d / "other-ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
               d / "client.key")


@pytest.fixture
def https_receiver(pki: Pki) -> Iterator[HttpReceiver]:
    r = HttpReceiver(server_tls(str(pki.server_cert), str(pki.server_key))).start()
    yield r
    r.stop()


@pytest.fixture
def mtls_receiver(pki: Pki) -> Iterator[HttpReceiver]:
    r = HttpReceiver(server_tls(str(pki.server_cert), str(pki.server_key), client_ca_file=str(pki.ca))).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider(chunk_delay_ms=1).start_in_thread()
    yield provider
    provider.stop_thread()


def export(endpoint: str, items: list, env: dict[str, str], config: dict[str, Any] | None = None) -> Telemetry:
    telemetry = Telemetry({"otlp_endpoint": endpoint, **FAST, **(config or {})}, env, "checkout")
    telemetry.start()
    telemetry.consume(items)
    telemetry.shutdown(10)
    return telemetry


def sidecar(tmp_path: Path, fake: FakeProvider, env: dict[str, str]) -> Sidecar:
    config = {"upstreams": {"openai": {"base_url": fake.base_url}}}
    return Sidecar(tmp_path / "sidecar", config, env={"OTEL_BSP_SCHEDULE_DELAY": "100", **env}).start()


def one_chat(sc: Sidecar) -> str:
    client = openai.OpenAI(base_url=f"{sc.url}/openai/v1", api_key="sk-test", max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"traceparent": f"00-{APP_TRACE}-{APP_SPAN}-01"})
    (row,) = sc.rows(f"response_id = '{reply.id}'")
    return str(row["call_id"])


# --- http/json -----------------------------------------------------------------------------------------


def test_spans_over_http_json_from_the_sidecar(tmp_path: Path, fake: FakeProvider) -> None:
    receiver = HttpReceiver().start()
    sc = sidecar(tmp_path, fake, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                  "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", "OTEL_SERVICE_NAME": "checkout"})
    try:
        call_id = one_chat(sc)
        [span] = receiver.wait_for_spans(1, timeout=20)
    finally:
        sc.stop()
        receiver.stop()
    assert receiver.headers[0]["content-type"] == "application/json"
    # the OTLP JSON mapping: hex ids, lowerCamelCase keys, enums as numbers
    [document] = [d for d in receiver.json_bodies if "resourceSpans" in d]  # the metrics' last push is JSON too
    [raw] = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert (raw["traceId"], raw["parentSpanId"]) == (APP_TRACE, APP_SPAN)
    assert raw["kind"] == 3 and "startTimeUnixNano" in raw
    # and decoded: the same span as over protobuf
    assert span.name == "chat gpt-4o-mini" and span.flags == 0x301
    attrs = attributes(span)
    assert attrs["meterline.call_id"] == call_id and attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] > 0 and list(attrs["gen_ai.response.finish_reasons"]) == ["stop"]
    resource = receiver.trace_requests[0].resource_spans[0]
    assert attributes(resource.resource) == {"service.name": "checkout"}
    assert resource.scope_spans[0].scope.name == "meterline"


def test_http_json_counts_partial_success() -> None:
    receiver = HttpReceiver().start()
    receiver.rejected_spans = 2
    try:
        telemetry = export(receiver.endpoint, [call(i) for i in range(5)], {}, {"otlp_protocol": "http/json",
                                                                               "otlp_compression": "gzip"})
    finally:
        receiver.stop()
    stats = telemetry.stats()
    assert (stats["spans_exported"], stats["spans_rejected"], stats["spans_dropped"]) == (3, 2, 2)
    assert receiver.headers[0]["content-encoding"] == "gzip" and len(receiver.spans()) == 5


# --- TLS with a configured CA ------------------------------------------------------------------------------


def test_tls_with_the_configured_ca_from_the_sidecar_even_with_requests_ca_bundle(
        tmp_path: Path, fake: FakeProvider, pki: Pki, https_receiver: HttpReceiver) -> None:
    sc = sidecar(tmp_path, fake, {"OTEL_EXPORTER_OTLP_ENDPOINT": https_receiver.endpoint,
                                  "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
                                  # common in containers: points at a bundle that does not have our CA
                                  "REQUESTS_CA_BUNDLE": str(pki.other_ca), "CURL_CA_BUNDLE": str(pki.other_ca)})
    try:
        call_id = one_chat(sc)
        [span] = https_receiver.wait_for_spans(1, timeout=20)
        deadline = time.monotonic() + 10  # the receiver has the span a moment before the exporter counts it
        while (stats := sc.health()["telemetry"])["spans_exported"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sc.stop()
    assert attributes(span)["meterline.call_id"] == call_id
    assert (stats["span_export_failures"], stats["spans_exported"]) == (0, 1)


@pytest.mark.parametrize("bundle_var", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", None])
@pytest.mark.parametrize("where", ["variable", "per-signal variable", "config"])
def test_the_configured_ca_wins_over_the_ca_bundle_variables(
        pki: Pki, https_receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch, bundle_var: str | None,
        where: str) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    if bundle_var is not None:
        monkeypatch.setenv(bundle_var, str(pki.other_ca))  # requests reads os.environ itself
    env, config = {}, {}
    if where == "config":
        config["otlp_certificate"] = str(pki.ca)
        env["OTEL_EXPORTER_OTLP_CERTIFICATE"] = str(pki.other_ca)  # the config key wins over the variable
    elif where == "per-signal variable":
        env["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"] = str(pki.ca)
        env["OTEL_EXPORTER_OTLP_CERTIFICATE"] = str(pki.other_ca)
    else:
        env["OTEL_EXPORTER_OTLP_CERTIFICATE"] = str(pki.ca)
    telemetry = export(https_receiver.endpoint, [call(1), call(2)], env, config)
    assert len(https_receiver.spans()) == 2, telemetry.stats()["last_export_error"]
    assert telemetry.stats()["spans_exported"] == 2


def test_without_the_ca_the_collector_is_not_trusted(pki: Pki, https_receiver: HttpReceiver) -> None:
    telemetry = export(https_receiver.endpoint, [call(1)], {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.other_ca)},
                       SHORT)
    assert https_receiver.spans() == []
    stats = telemetry.stats()
    assert stats["spans_dropped_export"] == 1 and "CERTIFICATE_VERIFY_FAILED" in stats["last_export_error"]


# --- mTLS ---------------------------------------------------------------------------------------------------


def test_mtls_client_certificate_from_the_sidecar(tmp_path: Path, fake: FakeProvider, pki: Pki,
                                                  mtls_receiver: HttpReceiver) -> None:
    sc = sidecar(tmp_path, fake, {"OTEL_EXPORTER_OTLP_ENDPOINT": mtls_receiver.endpoint,
                                  "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
                                  "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
                                  "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key)})
    try:
        call_id = one_chat(sc)
        [span] = mtls_receiver.wait_for_spans(1, timeout=20)
    finally:
        sc.stop()
    assert attributes(span)["meterline.call_id"] == call_id


@pytest.mark.parametrize("protocol", ["http/protobuf", "http/json"])
def test_mtls_needs_the_client_certificate(pki: Pki, mtls_receiver: HttpReceiver, protocol: str) -> None:
    base = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca), "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    without = export(mtls_receiver.endpoint, [call(1)], base, SHORT)
    assert mtls_receiver.spans() == [] and without.stats()["spans_dropped_export"] == 1
    assert without.stats()["span_export_failures"] >= 1
    with_cert = export(mtls_receiver.endpoint, [call(2)], {
        **base, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": str(pki.client_cert),
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": str(pki.client_key)})
    assert len(mtls_receiver.spans()) == 1 and with_cert.stats()["spans_exported"] == 1


# --- gRPC over TLS -------------------------------------------------------------------------------------------


def test_grpc_over_tls_with_the_configured_ca(pki: Pki) -> None:
    receiver = GrpcReceiver().start(tls=(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
    try:
        assert receiver.endpoint.startswith("https://")
        telemetry = export(receiver.endpoint, [call(1)], {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                                          "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)})
        assert len(receiver.spans()) == 1, telemetry.stats()["last_export_error"]
        untrusted = export(receiver.endpoint, [call(2)], {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                                          "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.other_ca)}, SHORT)
        assert len(receiver.spans()) == 1 and untrusted.stats()["spans_dropped_export"] == 1
    finally:
        receiver.stop()


def test_grpc_mtls_needs_the_client_certificate(pki: Pki) -> None:
    receiver = GrpcReceiver().start(tls=(pki.server_cert.read_bytes(), pki.server_key.read_bytes()),
                                    client_ca=pki.ca.read_bytes())
    base = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)}
    try:
        without = export(receiver.endpoint, [call(1)], base, SHORT)
        assert receiver.spans() == [] and without.stats()["spans_dropped_export"] == 1
        with_cert = export(receiver.endpoint, [call(2)], {
            **base, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key)})
        assert len(receiver.spans()) == 1, with_cert.stats()["last_export_error"]
    finally:
        receiver.stop()


# --- settings --------------------------------------------------------------------------------------------------


def test_certificate_settings_and_their_errors(pki: Pki, tmp_path: Path) -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318"}
    s = load_settings({}, {**endpoint, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
                           "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": str(pki.other_ca),
                           "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
                           "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key)})
    assert s.traces is not None and s.metrics_target is not None
    assert (s.traces.certificate, s.metrics_target.certificate) == (str(pki.ca), str(pki.other_ca))
    assert (s.traces.client_certificate, s.traces.client_key) == (str(pki.client_cert), str(pki.client_key))
    config = load_settings({"otlp_certificate": str(pki.other_ca)}, {**endpoint,
                                                                     "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)})
    assert config.traces is not None and config.traces.certificate == str(pki.other_ca)  # the file wins
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match="telemetry.otlp_client_key: cannot read"):
        load_settings({"otlp_endpoint": "https://c:4318", "otlp_client_certificate": str(pki.client_cert),
                       "otlp_client_key": missing}, {})
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: cannot read"):
        load_settings({}, {**endpoint, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": missing})
    with pytest.raises(ValueError, match="telemetry.otlp_certificate: expected the path of a PEM file"):
        load_settings({"otlp_endpoint": "https://c:4318", "otlp_certificate": 5}, {})
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_CLIENT_KEY: a client key needs a client certificate"):
        load_settings({}, {**endpoint, "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key)})
    assert load_settings({"otlp_protocol": "http/json", "otlp_endpoint": "http://c:4318"}, {}).traces.url \
        == "http://c:4318/v1/traces"  # type: ignore[union-attr]


def test_sdk_exporters_stay_quiet_and_the_failure_is_ours(caplog: pytest.LogCaptureFixture, pki: Pki,
                                                          https_receiver: HttpReceiver) -> None:
    caplog.set_level("DEBUG")
    started = time.monotonic()
    export(https_receiver.endpoint, [call(1)], {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.other_ca)})
    assert time.monotonic() - started < 10
    loud = [r for r in caplog.records if r.levelno >= 30]
    assert loud and all(r.name == "meterline.telemetry" for r in loud), [(r.name, r.getMessage()) for r in loud]


# --- the metric exporter the metrics pipeline uses --------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http/protobuf", "http/json", "grpc"])
def test_metric_exporter_delivers_over_each_protocol(protocol: str, pki: Pki) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from exporters.otlp_exporters import metric_exporter
    from tests.otlp_receiver import metrics_by_name

    if protocol == "grpc":
        receiver: Any = GrpcReceiver().start(tls=(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
    else:
        receiver = HttpReceiver(server_tls(str(pki.server_cert), str(pki.server_key))).start()
    try:
        settings = load_settings({"otlp_endpoint": receiver.endpoint, "otlp_protocol": protocol,
                                  "otlp_certificate": str(pki.ca)}, {})
        assert settings.metrics_target is not None
        seen: list[tuple[str, Any]] = []

        class Seen:
            def attempt_failed(self, error: str) -> None:
                seen.append(("failed", error))

            def attempt_succeeded(self, rejected: int, message: str) -> None:
                seen.append(("ok", rejected))

        reader = PeriodicExportingMetricReader(metric_exporter(settings.metrics_target, Seen()),
                                               export_interval_millis=60_000)
        provider = MeterProvider(metric_readers=[reader])
        provider.get_meter("meterline").create_counter("meterline.requests").add(3, {"meterline.outcome": "ok"})
        provider.shutdown()  # collects and exports once more
        [request] = receiver.wait_for_metrics(1)
        [point] = metrics_by_name(request)["meterline.requests"].sum.data_points
        assert point.as_int == 3 and seen == [("ok", 0)]
    finally:
        receiver.stop()


def test_spans_after_shutdown_are_counted_and_a_second_shutdown_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    receiver = HttpReceiver().start()
    try:
        telemetry = export(receiver.endpoint, [call(1)], {})
        caplog.set_level("DEBUG")
        telemetry.consume([call(2), call(3)])
        telemetry.shutdown(1)
    finally:
        receiver.stop()
    stats = telemetry.stats()
    assert (stats["spans_exported"], stats["spans_dropped"], len(receiver.spans())) == (1, 2, 1)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []
