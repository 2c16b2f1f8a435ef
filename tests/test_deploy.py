"""Deploy artefacts held to the real sidecar: Grafana dashboard, Prometheus, compose, Kubernetes, Docker, systemd.

The dashboard's queries are compared with what a real `meterline serve` exports after real calls
(metric names and label names), parsed by promtool, and, with the `prometheus` binary installed
(Debian package `prometheus`), run by a real Prometheus scraping that sidecar. The example app of
the compose demo runs against the sidecar with the compose demo's own config. Docker, Kubernetes
and systemd files are parsed and held to the ports, paths and commands the sidecar really uses.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar import config as config_mod
from tests.fakes import FakeProvider
from tests.otlp_receiver import HttpReceiver, attributes
from tests.sidecar_process import Sidecar, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GRAFANA = ROOT / "dashboards" / "grafana"
DASHBOARD = GRAFANA / "meterline.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "meterline.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "meterline.yaml"
K8S = DEPLOY / "k8s"

PORT = config_mod.DEFAULT_PORT  # 8720
HEALTHZ = "/_meterline/healthz"
METRICS = "/_meterline/metrics"

# What the issue asks the dashboard to show, as metric families of the sidecar's exposition.
REQUIRED_FAMILIES = (
    "gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds",
    "gen_ai_client_operation_time_to_first_chunk_seconds", "meterline_cost_usd_total", "meterline_requests_total",
    "meterline_overhead_seconds", "meterline_budget_utilization_ratio", "meterline_ledger_pending",
    "meterline_ledger_write_lag_seconds",
)
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


# --- the real sidecar -----------------------------------------------------------------------------


@dataclass
class Stack:
    """A fake provider, a real sidecar in its own process, and the sidecar's OTLP receiver."""

    fake: FakeProvider
    sidecar: Sidecar
    receiver: HttpReceiver
    sent: int = 0

    def post(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        req = urllib.request.Request(
            f"{self.sidecar.url}/openai/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
            headers={"authorization": "Bearer sk-x", "content-type": "application/json", **(headers or {})})
        self.sent += 1
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
                return resp.status
        except urllib.error.HTTPError as e:
            e.read()
            return e.code

    def traffic(self) -> None:
        """Calls that make every series the dashboard reads: ok JSON and streams, an upstream error,
        a budget refusal. Returns once the ledger has them all (the gauges are set by then)."""
        statuses = [self.post(CHAT) for _ in range(3)]
        statuses.append(self.post({**CHAT, "stream": True}))
        statuses.append(self.post({**CHAT, "model": "gpt-4o"}, {"x-meterline-app": "search"}))
        statuses.append(self.post(CHAT, {"x-fake-scenario": "error500"}))
        statuses += [self.post({**CHAT, "model": "gpt-4.1-nano"}) for _ in range(2)]  # the 2nd is refused
        assert statuses[:5] == [200] * 5 and statuses[5] == 500 and 429 in statuses[6:], statuses
        deadline = time.monotonic() + 15
        while self.sidecar.health()["ledger"]["written"] < self.sent:
            assert time.monotonic() < deadline, self.sidecar.health()
            time.sleep(0.05)

    def scrape(self) -> str:
        with urllib.request.urlopen(f"{self.sidecar.url}{METRICS}", timeout=10) as resp:
            assert resp.status == 200
            return resp.read().decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    fake = FakeProvider(chunk_delay_ms=1).start_in_thread()
    receiver = HttpReceiver().start()
    config = {
        "app": "checkout",
        "upstreams": {"openai": {"base_url": fake.base_url}},
        "budgets": [
            {"name": "org-daily", "window": "day", "limit_usd": 5},
            {"name": "nano-cap", "match": {"model": "gpt-4.1-nano"}, "window": "day", "limit_requests": 1},
        ],
    }
    # an OTLP endpoint, so the span-export counters the dashboard shows exist too
    sidecar = Sidecar(tmp_path_factory.mktemp("deploy") / "sidecar", config,
                      env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "meterline",
                           "OTEL_BSP_SCHEDULE_DELAY": "200"}).start()
    try:
        yield Stack(fake, sidecar, receiver)
    finally:
        sidecar.stop()
        receiver.stop()
        fake.stop_thread()


@dataclass
class Exposition:
    """The sidecar's /_meterline/metrics after real calls: sample name -> label names."""

    labels: dict[str, set[str]]
    text: str

    def names(self) -> set[str]:
        return set(self.labels)


@pytest.fixture(scope="module")
def exposition(stack: Stack) -> Exposition:
    stack.traffic()
    text = stack.scrape()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return Exposition(labels, text)


# --- PromQL, as far as the dashboard needs --------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(rf"({_IDENT})?\s*\{{([^}}]*)\}}")
_MATCHER = re.compile(rf"({_IDENT})\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_BARE = re.compile(rf"(?<![\w.:]){_IDENT}(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan", "Inf", "NaN"}
_LABEL_VALUES = re.compile(rf"^\s*label_values\((.*),\s*({_IDENT})\s*\)\s*$")

# Grafana's variables, replaced by values Prometheus accepts (the regex ones by "all")
GRAFANA_VARS = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m", "__range_s": "300",
                "app": ".*", "provider": ".*", "model": ".*", "instance": ".*", "__tags": ""}


def substitute(expr: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return GRAFANA_VARS[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


@dataclass
class Query:
    where: str
    expr: str  # as in the file
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # (metric, matcher labels)
    grouping: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        return {name for name, _ in self.selectors}


def analyse(where: str, expr: str) -> Query:
    """The metric names, matcher labels and grouping labels of one PromQL expression."""
    q = Query(where, expr)
    text = _STRING.sub('""', substitute(expr))
    for labels in _GROUPING.findall(text):
        q.grouping.update(x.strip() for x in labels.split(",") if x.strip())
    text = _GROUPING.sub(" ", text)

    def selector(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name and name not in _KEYWORDS, f"{where}: a selector without a metric name: {m.group(0)!r}"
        q.selectors.append((name, set(_MATCHER.findall(m.group(2)))))
        return " "
    text = _RANGE.sub(" ", _SELECTOR.sub(selector, text))
    for name in _BARE.findall(text):
        if name not in _KEYWORDS:
            q.selectors.append((name, set()))
    return q


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for p in doc["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows keep theirs inside
    return panels


def prometheus_targets(doc: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in all_panels(doc) for t in p.get("targets", [])
            if (t.get("datasource") or p.get("datasource") or {}).get("type") == "prometheus"]


def dashboard_queries() -> list[Query]:
    """Every PromQL expression of the dashboard, its variables and the Jaeger data source's trace-to-metrics links."""
    doc = dashboard()
    queries = [analyse(f"panel {p['title']!r} target {t['refId']}", t["expr"]) for p, t in prometheus_targets(doc)]
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        definition = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(definition)
        assert m, f"variable {var['name']}: expected label_values(metric, label), got {definition!r}"
        q = analyse(f"variable {var['name']}", m.group(1))
        q.grouping.add(m.group(2))  # the label whose values it lists
        queries.append(q)
    for ds in yaml.safe_load(DATASOURCES.read_text())["datasources"]:
        for link in ds.get("jsonData", {}).get("tracesToMetrics", {}).get("queries", []):
            queries.append(analyse(f"data source {ds['name']} trace-to-metrics {link['name']!r}", link["query"]))
    return queries


# --- the dashboard --------------------------------------------------------------------------------


def test_dashboard_is_well_formed_and_its_data_sources_are_provisioned():
    doc = dashboard()
    assert doc["uid"] == "meterline" and doc["title"] and isinstance(doc["schemaVersion"], int)
    panels = all_panels(doc)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refIds"
    assert len(prometheus_targets(doc)) >= 20

    provisioned = {ds["uid"]: ds for ds in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    assert {ds["type"] for ds in provisioned.values()} == {"prometheus", "jaeger"}
    variables = {v["name"]: v for v in doc["templating"]["list"]}

    def resolve(ref: dict[str, Any]) -> dict[str, Any]:
        uid = ref["uid"]
        m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
        if m:  # a data source variable: its default must be a provisioned data source of its type
            var = variables[m.group(1) or m.group(2)]
            assert var["type"] == "datasource" and var["query"] == ref["type"], var
            uid = var["current"]["value"]
        assert uid in provisioned, f"data source {uid!r} is not provisioned"
        assert provisioned[uid]["type"] == ref["type"]
        return provisioned[uid]

    used = set()
    for p in panels:
        for ref in [p.get("datasource"), *[t.get("datasource") for t in p.get("targets", [])]]:
            if ref:
                used.add(resolve(ref)["type"])
    for var in variables.values():
        if var["type"] == "query":
            resolve(var["datasource"])
    assert used == {"prometheus", "jaeger"}
    for ds in provisioned.values():  # trace-to-metrics points at a provisioned data source
        target = ds.get("jsonData", {}).get("tracesToMetrics", {}).get("datasourceUid")
        assert target is None or provisioned[target]["type"] == "prometheus"

    # the dashboard provider reads the directory docker-compose.yml mounts the dashboard into
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    grafana = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"]}
    path = providers[0]["options"]["path"]
    assert (DEPLOY / mounts[f"{path}/meterline.json"]).resolve() == DASHBOARD
    assert (DEPLOY / mounts["/etc/grafana/provisioning/datasources"]).resolve() == DATASOURCES.parent
    assert (DEPLOY / mounts["/etc/grafana/provisioning/dashboards"]).resolve() == DASHBOARD_PROVIDERS.parent
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/meterline.json"


def test_dashboard_queries_name_only_metrics_and_labels_the_sidecar_exports(exposition):
    exported = exposition.labels
    problems = []
    for q in dashboard_queries():
        if not q.selectors:
            problems.append(f"{q.where}: no metric in {q.expr!r}")
        for name, matcher_labels in q.selectors:
            if name not in exported:
                problems.append(f"{q.where}: {name} is not exported (exported: {', '.join(sorted(exported))})")
            elif matcher_labels - exported[name] - TARGET_LABELS:
                problems.append(f"{q.where}: {name} has no label "
                                f"{sorted(matcher_labels - exported[name] - TARGET_LABELS)}")
        known = set().union(*(exported.get(n, set()) for n in q.metrics)) | TARGET_LABELS
        if q.grouping - known:
            problems.append(f"{q.where}: groups by labels its metrics lack: {sorted(q.grouping - known)}")
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_metric_the_issue_asks_for(exposition):
    referenced = set().union(*(q.metrics for q in dashboard_queries()))
    for family in REQUIRED_FAMILIES:
        assert family in exposition.names() or any(n.startswith(family + "_") for n in exposition.names()), \
            f"the sidecar no longer exports {family}"
        assert any(n == family or re.fullmatch(rf"{family}_(bucket|sum|count)", n) for n in referenced), \
            f"no panel shows {family}"
    quantiles = {m.group(1) for _, t in prometheus_targets(dashboard())
                 for m in [re.search(r"histogram_quantile\((0\.\d+),", t["expr"])] if m}
    assert {"0.5", "0.95", "0.99"} <= quantiles


def test_dashboard_links_search_jaeger_by_span_attributes_the_sidecar_sets(stack, exposition):
    """Metrics carry no trace ids: the data links search Jaeger by a span attribute. Each must be a
    real attribute of the sidecar's spans, filled from a label the panel's series have."""
    spans = stack.receiver.wait_for_spans(6)  # at least the calls that reached the provider
    span_keys = set().union(*(attributes(s).keys() for s in spans)) | {"error"}  # Jaeger adds error=true
    assert {"gen_ai.request.model", "meterline.outcome"} <= span_keys
    doc = dashboard()
    jaeger_uid = next(v for v in doc["templating"]["list"] if v["name"] == "jaeger")["current"]["value"]
    links = 0
    for panel in all_panels(doc):
        series_labels = set().union(*(
            exposition.labels.get(n, set()) for t in panel.get("targets", []) if "expr" in t
            for n in analyse(panel["title"], t["expr"]).metrics)) | TARGET_LABELS
        for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", []):
            links += 1
            used = set(re.findall(r"\$\{__field\.labels\.(\w+)\}", link["url"]))
            assert used <= series_labels, f"{panel['title']}: {link['title']} uses labels {used - series_labels}"
            if link["url"].startswith("/explore?"):
                params = urllib.parse.parse_qs(urllib.parse.urlsplit(link["url"]).query)
                assert params["schemaVersion"] == ["1"]
                (pane,) = json.loads(params["panes"][0]).values()
                (query,) = pane["queries"]
                assert pane["datasource"] in ("${jaeger}", jaeger_uid) and query["queryType"] == "search"
                assert query["service"] == "${service}"
                key = query["tags"].split("=", 1)[0]
            else:
                assert link["url"].startswith("${jaeger_ui}/search?service=${service}&")
                tags = urllib.parse.parse_qs(urllib.parse.urlsplit(link["url"]).query)["tags"][0]
                key = re.fullmatch(r'\{"([^"]+)":".*"\}', tags).group(1)
            assert key in span_keys, f"{panel['title']}: Jaeger tag {key!r} is no attribute of the sidecar's spans"
    assert links >= 6
    # the trace service variable lists service names the sidecar reports, and ours is among them
    assert 'service_name="meterline"' in exposition.text


def test_dashboard_promql_parses(tmp_path):
    """promtool parses each query as a recording rule (Grafana's variables replaced)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(q.expr)}
             for i, q in enumerate(dashboard_queries()) if not q.where.startswith("variable")]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_queries_return_data_from_a_real_prometheus(stack, exposition, tmp_path):
    """Prometheus scrapes the sidecar every second; every panel's query then returns data."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`)")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    job.update(scrape_interval="1s", scrape_timeout="1s",
               static_configs=[{"targets": [f"127.0.0.1:{stack.sidecar.port}"]}])
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT)

    def get(path: str, **params: str) -> Any:
        with urllib.request.urlopen(f"{api}/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def scrapes() -> int:
        result = get("query", query=f'count_over_time(up{{job="{job["job_name"]}"}}[10m])')["result"]
        return int(result[0]["value"][1]) if result else 0

    def wait(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"waiting for {what}:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
    try:
        wait(lambda: scrapes() >= 1, "the first scrape")
        up = get("query", query=f'up{{job="{job["job_name"]}"}}')["result"]
        assert up and up[0]["value"][1] == "1", up
        stack.traffic()  # rates see this traffic: every series moves between scrapes
        seen = scrapes()
        wait(lambda: scrapes() >= seen + 3, "three more scrapes")

        empty = []
        for panel, target in prometheus_targets(dashboard()):
            result = get("query", query=substitute(target["expr"]))["result"]
            values = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{panel['title']} {target['refId']}: {target['expr']} -> {result}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        for var in dashboard()["templating"]["list"]:
            if var["type"] == "query":
                metric, label = _LABEL_VALUES.match(var["query"]["query"]).groups()
                assert get(f"label/{label}/values", **{"match[]": substitute(metric)}), var["name"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_config_scrapes_the_sidecars_metrics_path():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "meterline"]
    assert job["metrics_path"] == METRICS
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.rsplit(":", 1)
    assert int(port) == PORT and host in yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_sidecar_serves_health_and_metrics_where_the_deploy_files_look(stack):
    assert stack.sidecar.health()["status"] == "ok"
    assert "# TYPE meterline_requests_total counter" in stack.scrape()


# --- docker compose -------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_wires_app_sidecar_jaeger_prometheus_and_grafana():
    doc = compose()
    services = doc["services"]
    assert {"meterline", "example-app", "fake-llm", "jaeger", "prometheus", "grafana"} <= set(services)
    ml = services["meterline"]
    assert ml["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / ml["build"]["context"]).resolve() == ROOT
    args = ml["command"]
    assert args[0] == "serve" and option(args, "--host") == "0.0.0.0" and option(args, "--port") == str(PORT)
    # the ledger is on a named volume, and the config mounted where the command reads it
    mounts = {m.split(":")[1]: m.split(":")[0] for m in ml["volumes"]}  # target -> source
    assert Path(option(args, "--db")).parent.as_posix() in mounts
    assert mounts[Path(option(args, "--db")).parent.as_posix()] in doc["volumes"]
    config_file = mounts[option(args, "--config")]
    assert (DEPLOY / config_file).is_file()
    # ports reach the host's loopback only
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "127.0.0.1:8720:8720" in ml["ports"]
    # spans to Jaeger's OTLP/HTTP port; Jaeger takes no metrics
    env = ml["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318" and env["OTEL_METRICS_EXPORTER"] == "none"
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:") and not jaeger["image"].endswith(":latest")
    assert {"4317", "4318"} <= set(map(str, jaeger["expose"])) and "127.0.0.1:16686:16686" in jaeger["ports"]
    prom = services["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    # the app calls the sidecar by its service name, once the image's health check passes
    app = services["example-app"]
    assert app["environment"]["OPENAI_BASE_URL"].startswith("${EXAMPLE_BASE_URL:-http://meterline:8720/")
    assert app["depends_on"]["meterline"]["condition"] == "service_healthy"
    assert (DEPLOY / app["volumes"][0].split(":")[0] / app["command"][-1].rsplit("/", 1)[1]).is_file()
    fake = services["fake-llm"]
    assert (DEPLOY / fake["volumes"][0].split(":")[0] / fake["entrypoint"][-1].rsplit("/", 1)[1]).is_file()
    for name, service in services.items():  # pinned images
        image = service.get("image", "x:pinned")
        assert ":" in image and not image.endswith(":latest"), name


def test_compose_file_follows_the_compose_spec():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema not installed (pip install check-jsonschema)")
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(DEPLOY / "docker-compose.yml")], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_sidecar_config_is_valid_and_routes_the_demo_upstream():
    cfg = config_mod.load(DEPLOY / "meterline.yaml")  # the sidecar's own validation: unknown keys fail
    demo = cfg.upstreams["demo"]
    fake = compose()["services"]["fake-llm"]
    assert demo.host == "fake-llm" and demo.port == 9000 and str(demo.port) in map(str, fake["expose"])
    assert cfg.telemetry["service_name"] == "meterline"
    assert cfg.budgets


def test_compose_demo_allows_the_hosts_it_is_called_by_and_prometheus_sends_the_admin_token():
    """Beyond loopback the sidecar serves only allowed Host values (421 otherwise) and, with a token
    set, /_meterline/metrics needs it: the app and Prometheus call it as `meterline:8720`."""
    cfg = config_mod.load(DEPLOY / "meterline.yaml")
    services = compose()["services"]
    app_url = re.fullmatch(r"\$\{EXAMPLE_BASE_URL:-(.+)\}", services["example-app"]["environment"]["OPENAI_BASE_URL"])
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "meterline"]
    (target,) = job["static_configs"][0]["targets"]
    callers = {urllib.parse.urlsplit(app_url.group(1)).hostname, target.rsplit(":", 1)[0]}
    assert callers <= cfg.allowed_hosts, f"{callers - cfg.allowed_hosts} would get 421"
    token = re.fullmatch(r"\$\{METERLINE_ADMIN_TOKEN:-(.+)\}", services["meterline"]["environment"]["METERLINE_ADMIN_TOKEN"])
    assert job["authorization"] == {"type": "Bearer", "credentials": token.group(1)}


class _Capture(BaseHTTPRequestHandler):
    """OTLP/HTTP JSON, as the example app sends its own spans."""

    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        assert self.path == "/v1/traces" and self.headers["content-type"] == "application/json"
        type(self).bodies.append(json.loads(body))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_example_app_calls_through_the_sidecar_inside_its_own_traces(tmp_path):
    """The compose demo without Docker: fake_llm.py, the sidecar with deploy/meterline.yaml, app.py.
    Each of the app's calls is a ledger row and a sidecar span inside the app's own trace."""
    fake_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fake = subprocess.Popen([sys.executable, str(DEPLOY / "example-app" / "fake_llm.py")], env={
        **env, "FAKE_LLM_HOST": "127.0.0.1", "FAKE_LLM_PORT": str(fake_port), "FAKE_LLM_SPEED": "0.02",
        "FAKE_LLM_ERROR_RATE": "0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    receiver = HttpReceiver().start()
    _Capture.bodies = []
    capture = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=capture.serve_forever, daemon=True).start()
    config = yaml.safe_load((DEPLOY / "meterline.yaml").read_text())
    config["upstreams"]["demo"]["base_url"] = f"http://127.0.0.1:{fake_port}"
    sidecar = Sidecar(tmp_path / "sidecar", config,
                      env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_METRICS_EXPORTER": "none"})
    try:
        wait_for_port(fake_port, fake)
        sidecar.start()
        app_env = compose()["services"]["example-app"]["environment"]
        out = subprocess.run([sys.executable, str(DEPLOY / "example-app" / "app.py")], env={
            **os.environ, "OPENAI_BASE_URL": f"{sidecar.url}/demo/v1", "OPENAI_API_KEY": "sk-demo",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{capture.server_address[1]}",
            "OTEL_SERVICE_NAME": app_env["OTEL_SERVICE_NAME"], "JAEGER_UI_URL": app_env["JAEGER_UI_URL"],
            "EXAMPLE_CALLS": "4", "EXAMPLE_INTERVAL_S": "0"}, check=False, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = [line for line in out.stdout.splitlines() if line.startswith("call ")]
        assert len(lines) == 4 and all(" -> 200 " in line for line in lines), out.stdout + out.stderr
        traces = [re.search(r"trace http://localhost:16686/trace/([0-9a-f]{32})$", line).group(1) for line in lines]

        rows = sidecar.rows("upstream = 'demo'", count=4)
        assert sorted(r["trace_id"] for r in rows) == sorted(traces)
        assert all(r["provider"] == "openai" and r["outcome"] == "ok" and r["cost_usd"] is not None for r in rows)
        assert all(r["app"] == "example-app" and r["user_id"].startswith("u-") for r in rows)
        assert any(r["stream"] for r in rows) and any(r["ttft_ms"] is not None for r in rows)

        app_spans = {s["traceId"]: s for b in _Capture.bodies for rs in b["resourceSpans"]
                     for ss in rs["scopeSpans"] for s in ss["spans"]}
        assert set(app_spans) == set(traces)
        assert all(b["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"] == "example-app"
                   for b in _Capture.bodies)
        spans = receiver.wait_for_spans(4)
        for span in spans:  # the sidecar's CLIENT span is a child of the app's span, in the app's trace
            parent = app_spans[span.trace_id.hex()]
            assert span.parent_span_id.hex() == parent["spanId"]
            assert span.kind == span.SPAN_KIND_CLIENT and attributes(span)["meterline.upstream"] == "demo"
    finally:
        sidecar.stop()
        receiver.stop()
        capture.shutdown()
        fake.terminate()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait()


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"port {port} not open: {proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.05)


# --- Dockerfile -----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            instruction, _, args = current.strip().partition(" ")
            lines.append((instruction.upper(), args.strip()))
            current = ""
    return lines


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[start:]


def test_dockerfile_runs_meterline_serve_as_a_user_with_a_healthcheck_and_a_ledger_volume():
    instructions = dockerfile()
    assert all(args.split()[0] == "python:3.11-slim" for ins, args in instructions if ins == "FROM")
    final = final_stage(instructions)

    def get(name: str) -> list[str]:
        return [args for ins, args in final if ins == name]
    (user,) = get("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert get("EXPOSE") == [str(PORT)]
    (volume,) = get("VOLUME")
    assert json.loads(volume) == ["/data"]
    command = json.loads(get("ENTRYPOINT")[0]) + json.loads(get("CMD")[0])
    assert command[:2] == ["meterline", "serve"] and option(command, "--port") == str(PORT)
    assert option(command, "--host") == "0.0.0.0" and option(command, "--db").startswith("/data/")
    assert option(command, "--config") == "/etc/meterline/meterline.yaml"
    (health,) = get("HEALTHCHECK")
    assert "curl" not in health and "wget" not in health
    assert f"http://127.0.0.1:{PORT}{HEALTHZ}" in health
    # every source COPY takes from the context exists and passes Dockerfile.dockerignore
    allowed = {line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = [src for ins, args in instructions if ins == "COPY" and not args.startswith("--from")
               for src in args.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src in allowed, f"{src} is copied but excluded by Dockerfile.dockerignore"
    for ins, args in instructions:
        if ins == "COPY" and args.startswith("--from"):
            stage = re.match(r"--from=(\S+)", args).group(1)
            assert stage in {a.split()[-1] for i, a in instructions if i == "FROM" and " AS " in a.upper()}


def test_dockerfile_builds_a_wheel_and_the_image_installs_it_not_the_source_tree():
    """The build stage makes a wheel; the final stage pip-installs that .whl, never an editable install."""
    instructions = dockerfile()
    froms = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    assert len(froms) >= 2, "a build stage and a final stage"
    build = instructions[froms[-2]:froms[-1]]
    final = final_stage(instructions)
    stage_name = build[0][1].split()[-1]
    build_runs = " ".join(args for ins, args in build if ins == "RUN")
    assert re.search(r"pip wheel\b.*--no-deps|-m build\b.*--wheel", build_runs), build_runs
    final_runs = [args for ins, args in final if ins == "RUN"]
    installs = [r for r in final_runs if re.search(r"pip install\b[^&]*\.whl", r)]
    assert installs, final_runs
    for ins, args in instructions:
        if ins == "RUN":
            assert not re.search(r"pip install\b[^&]*(\s-e\s|--editable)", args), args
    # only the wheel crosses into the image: no source tree copied from the build stage or the context
    final_copies = [args for ins, args in final if ins == "COPY"]
    assert all(args.startswith(f"--from={stage_name}") for args in final_copies), final_copies
    assert all(re.search(r"\.whl|/wheels?\b|/dist\b", args) for args in final_copies), final_copies
    assert not any(src in args for args in final_copies for src in ("sidecar", "ledger", "exporters", "dashboards"))


def healthcheck_command() -> list[str]:
    (health,) = [args for ins, args in final_stage(dockerfile()) if ins == "HEALTHCHECK"]
    return json.loads(health.split(" CMD ", 1)[1])


def test_healthcheck_and_k8s_probe_commands_work_against_a_sidecar(stack):
    """Run with the sidecar's port for 8720: exit 0 when it answers, non-zero when nothing listens."""
    commands = {"Dockerfile HEALTHCHECK": healthcheck_command()}
    for path in (K8S / "deployment.yaml", K8S / "deployment-native-sidecar.yaml"):
        for probe_name, probe in meterline_container(path).items():
            if probe_name.endswith("Probe"):
                commands[f"{path.name} {probe_name}"] = probe["exec"]["command"]
    dead = free_port()
    for where, command in commands.items():
        assert command[0] == "python", where
        for port, ok in ((stack.sidecar.port, True), (dead, False)):
            run = [part.replace(f":{PORT}/", f":{port}/") for part in command]
            out = subprocess.run([sys.executable, *run[1:]], check=False, capture_output=True, text=True, timeout=30)
            assert (out.returncode == 0) == ok, f"{where} against port {port}: {out.stderr}"


# --- Kubernetes -----------------------------------------------------------------------------------


def k8s_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_spec(path: Path) -> dict[str, Any]:
    (deployment,) = [d for d in k8s_docs(path) if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def meterline_container(path: Path) -> dict[str, Any]:
    spec = pod_spec(path)
    (c,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "meterline"]
    return c


def test_k8s_manifests_parse_and_follow_the_kubernetes_schema():
    files = sorted(K8S.glob("*.yaml"))
    kinds = {d["kind"] for f in files for d in k8s_docs(f)}
    assert {"Deployment", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for f in files:
        for doc in k8s_docs(f):
            kv.validate(doc, "1.29.0", strict=True)  # native sidecars: 1.29+ (raises on an error)


@pytest.mark.parametrize("manifest", ["deployment.yaml", "deployment-native-sidecar.yaml"])
def test_k8s_sidecar_listens_on_loopback_with_exec_probes_and_the_ledger_on_a_claim(manifest):
    path = K8S / manifest
    spec = pod_spec(path)
    c = meterline_container(path)
    args = c["args"]
    assert args[0] == "serve" and option(args, "--host") == "127.0.0.1" and option(args, "--port") == str(PORT)
    assert "ports" not in c  # nothing outside the pod reaches a loopback listener
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = c[probe]["exec"]["command"]
        assert f"http://127.0.0.1:{PORT}{HEALTHZ}" in " ".join(command), probe
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    ledger_dir = Path(option(args, "--db")).parent.as_posix()
    claim = volumes[mounts[ledger_dir]]["persistentVolumeClaim"]["claimName"]
    (pvc,) = k8s_docs(K8S / "pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == claim
    config_dir = Path(option(args, "--config")).parent.as_posix()
    (cm,) = k8s_docs(K8S / "configmap.yaml")
    assert volumes[mounts[config_dir]]["configMap"]["name"] == cm["metadata"]["name"]
    config_mod.parse(yaml.safe_load(cm["data"][Path(option(args, "--config")).name]))  # the sidecar accepts it
    (deployment,) = [d for d in k8s_docs(path) if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"

    (app,) = [x for x in spec["containers"] if x["name"] != "meterline"]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{PORT}/openai/v1"


def test_k8s_native_variant_is_an_init_container_that_always_restarts():
    spec = pod_spec(K8S / "deployment-native-sidecar.yaml")
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "meterline" and sidecar["restartPolicy"] == "Always" and "startupProbe" in sidecar
    assert all(c["name"] != "meterline" for c in spec["containers"])
    classic = pod_spec(K8S / "deployment.yaml")
    assert "initContainers" not in classic and classic["containers"][0]["name"] == "meterline"
    assert "postStart" in classic["containers"][0]["lifecycle"]  # holds the app until the sidecar answers


# --- systemd --------------------------------------------------------------------------------------


def unit() -> dict[str, list[tuple[str, str]]]:
    """Sections of the unit file as (key, value) lists: keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (DEPLOY / "systemd" / "meterline.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, line
        current.append((key.strip(), value.strip()))
    return sections


def test_systemd_unit_runs_meterline_serve_on_loopback_with_the_ledger_in_its_state_directory():
    sections = unit()
    assert {"Unit", "Service", "Install"} <= set(sections)
    service = dict(sections["Service"])
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/meterline") and command[1] == "serve"
    assert option(command, "--host") == "127.0.0.1" and option(command, "--port") == str(PORT)
    assert option(command, "--db") == f"%S/{service['StateDirectory']}/meterline.duckdb"
    assert option(command, "--config") == f"%E/{service['ConfigurationDirectory']}/meterline.yaml"
    assert service["Restart"] == "on-failure"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    for hardening in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert hardening in service or service.get("DynamicUser") == "yes", hardening  # implied by DynamicUser
    assert service["CapabilityBoundingSet"] == "" and "SystemCallFilter" in service
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"
    config_mod.load(DEPLOY / "systemd" / "meterline.yaml")  # the sidecar accepts the config it ships with


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package `systemd`)")
    # verify insists that ExecStart's binary exists: stand a real executable in for the venv's
    text = (DEPLOY / "systemd" / "meterline.service").read_text()
    binary = shlex.split(dict(unit()["Service"])["ExecStart"])[0]
    stand_in = shutil.which("true")
    (tmp_path / "meterline.service").write_text(text.replace(f"ExecStart={binary}", f"ExecStart={stand_in}"))
    out = subprocess.run([analyze, "verify", str(tmp_path / "meterline.service")],
                         check=False, capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "meterline.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


# --- helpers --------------------------------------------------------------------------------------


def option(args: list[str], name: str) -> str | None:
    """The value after `name` in an argument list (None when absent)."""
    return args[args.index(name) + 1] if name in args else None


# --- the fleet: deploy/fleet (compose) and deploy/k8s/fleet-*.yaml ---------------------------------

FLEET = DEPLOY / "fleet"


def _fleet_config(text: str, env: dict[str, str]) -> config_mod.Config:
    """The sidecar's own parsing of a fleet config, with `${NAME}` read from `env`."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return config_mod.parse(yaml.safe_load(text))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_fleet_compose_runs_two_app_replicas_with_sidecars_beside_redis_and_postgres():
    doc = yaml.safe_load((FLEET / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"meterline-1", "meterline-2", "app-1", "app-2", "postgres", "redis", "fake-llm"} <= set(services)
    instances, ledgers = set(), set()
    for n in ("1", "2"):
        sidecar, app = services[f"meterline-{n}"], services[f"app-{n}"]
        args = sidecar["command"]
        assert args[0] == "serve" and option(args, "--host") == "127.0.0.1" and option(args, "--port") == str(PORT)
        # the app shares its sidecar's network namespace and calls it on loopback, once it is healthy
        assert app["network_mode"] == f"service:meterline-{n}"
        assert app["environment"]["OPENAI_BASE_URL"].startswith(f"http://127.0.0.1:{PORT}/")
        assert app["depends_on"][f"meterline-{n}"]["condition"] == "service_healthy"
        assert {"postgres", "redis"} <= set(sidecar["depends_on"])
        mounts = {m.split(":")[1]: m.split(":")[0] for m in sidecar["volumes"]}
        ledger = mounts[Path(option(args, "--db")).parent.as_posix()]
        assert ledger in doc["volumes"]  # each sidecar its own ledger volume
        config_file = FLEET / mounts[option(args, "--config")]
        env = sidecar["environment"]
        pg = env["METERLINE_POSTGRES_URL"]
        assert pg.startswith("postgresql://") and "@postgres:5432/" in pg and "${POSTGRES_PASSWORD" in pg
        assert env["METERLINE_REDIS_URL"].startswith("redis://redis:6379")
        cfg = _fleet_config(config_file.read_text(), {k: str(v) for k, v in env.items()})
        assert cfg.fleet.postgres == pg and cfg.fleet.redis == env["METERLINE_REDIS_URL"]
        instances.add(cfg.fleet.instance)
        assert (cfg.upstreams["demo"].host, cfg.upstreams["demo"].port) == ("fake-llm", 9000)
        ledgers.add(ledger)
    assert instances == {"app-1", "app-2"} and len(ledgers) == 2
    # the config file holds no secret: the URLs come from the environment
    text = (FLEET / "meterline.yaml").read_text()
    assert "${METERLINE_POSTGRES_URL}" in text and "postgresql://" not in text
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert services["postgres"]["healthcheck"] and services["redis"]["healthcheck"]
    for name, service in services.items():
        image = service.get("image", "x:pinned")
        assert ":" in image and not image.endswith(":latest"), name
        assert not service.get("ports"), f"{name} publishes a port"


def test_fleet_compose_file_follows_the_compose_spec():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema not installed (pip install check-jsonschema)")
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(FLEET / "docker-compose.yml")], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_k8s_fleet_takes_its_urls_from_a_secret_and_names_each_pod_its_instance():
    docs = k8s_docs(K8S / "fleet-statefulset.yaml")
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (secret,) = k8s_docs(K8S / "fleet-secret.yaml")
    assert secret["kind"] == "Secret"
    spec = sts["spec"]["template"]["spec"]
    (c,) = [c for c in spec["initContainers"] if c["name"] == "meterline"]
    assert c["restartPolicy"] == "Always"
    args = c["args"]
    assert option(args, "--host") == "127.0.0.1" and option(args, "--port") == str(PORT)
    env = {e["name"]: e for e in c["env"]}
    for name, key in (("METERLINE_POSTGRES_URL", "postgres-url"), ("METERLINE_REDIS_URL", "redis-url")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and key in secret["stringData"] and "value" not in env[name]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # each pod's ledger on a claim of its own
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[Path(option(args, "--db")).parent.as_posix()] == claim["metadata"]["name"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[Path(option(args, "--config")).parent.as_posix()]]["configMap"]["name"] == cm["metadata"]["name"]
    text = cm["data"][Path(option(args, "--config")).name]
    cfg = _fleet_config(text, {"POD_NAME": "checkout-2", "METERLINE_POSTGRES_URL": secret["stringData"]["postgres-url"],
                               "METERLINE_REDIS_URL": secret["stringData"]["redis-url"]})
    assert cfg.fleet.instance == "checkout-2" and cfg.fleet.postgres == secret["stringData"]["postgres-url"]
    assert "CHANGE-ME" not in text
    (app,) = spec["containers"]
    assert {e["name"]: e.get("value") for e in app["env"]}["OPENAI_BASE_URL"] == f"http://127.0.0.1:{PORT}/openai/v1"
