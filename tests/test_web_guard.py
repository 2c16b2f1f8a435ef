"""A web page in the user's browser cannot change budgets or read the ledger: cross-site requests, DNS
rebinding and the admin token, against the real sidecar process (and headless Chromium for the page)."""
from __future__ import annotations

import http.client
import os
import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.sidecar_process import Sidecar
from tests.test_dashboard import browser  # noqa: F401 - the headless Chromium fixture

RULE = {"name": "evil-block", "window": "day", "limit_usd": "0.000001", "action": "block"}
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def sidecar_config() -> dict[str, Any]:
    return {"budgets": [{"name": "cap", "window": "day", "limit_usd": 1, "action": "block"}]}


def raw(sc: Sidecar, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One request with exactly these headers (http.client adds Host only when none is given)."""
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=30)
    try:
        h = dict(headers or {})
        conn.putrequest(method, path, skip_host="Host" in h, skip_accept_encoding=True)
        for k, v in h.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        resp = conn.getresponse()
        data = resp.read()
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            doc = {"text": data.decode("utf-8", "replace")}
        return resp.status, doc
    finally:
        conn.close()


def budgets(sc: Sidecar, token: str | None = None) -> dict[str, dict[str, Any]]:
    status, doc = raw(sc, "GET", "/_meterline/budgets", headers={"x-meterline-admin-token": token} if token else {})
    assert status == 200, doc
    return {b["rule"]: b for b in doc["budgets"]}


# --- a page from another origin, in Chromium ---------------------------------------------------------

class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"<!doctype html><title>elsewhere</title><p>nothing to see"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[str]:
    """Another origin on loopback: a small http.server on a port of its own."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


NO_CORS = """async ([url, body]) => {
  try {
    await fetch(url, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body});
    return "sent";
  } catch (e) { return "failed: " + e; }
}"""


def test_a_cross_origin_page_cannot_create_or_top_up_a_rule(browser: Any, sidecar: Sidecar,  # noqa: F811
                                                            elsewhere: str) -> None:
    before = budgets(sidecar)
    assert "cap" in before and "evil-block" not in before
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(elsewhere)
        sent = [page.evaluate(NO_CORS, [f"{sidecar.url}/_meterline/budgets", orjson.dumps(RULE).decode()]),
                page.evaluate(NO_CORS, [f"{sidecar.url}/_meterline/budgets/cap/topup", '{"amount_usd": "1000"}']),
                page.evaluate(NO_CORS, [f"{sidecar.url}/_meterline/sql", "SELECT count(*) FROM range(1000)"])]
        assert sent == ["sent"] * 3  # opaque answers: the page cannot tell, so the sidecar must refuse
    finally:
        context.close()
    after = budgets(sidecar)
    assert "evil-block" not in after
    assert after["cap"]["limit_usd"] == before["cap"]["limit_usd"] and Decimal(after["cap"]["limit_usd"]) == 1
    # the same requests from a program (no Origin, JSON typed) still work: the refusal is about the page
    status, doc = raw(sidecar, "POST", "/_meterline/budgets/cap/topup", b'{"amount_usd": "1"}',
                      {"Content-Type": "application/json"})
    assert status == 200, doc
    assert Decimal(budgets(sidecar)["cap"]["limit_usd"]) == 2


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
])
def test_mutations_from_another_site_are_refused(sidecar: Sidecar, headers: dict[str, str]) -> None:
    json_type = {"Content-Type": "application/json", **headers}
    assert raw(sidecar, "POST", "/_meterline/budgets", orjson.dumps(RULE), json_type)[0] == 403
    assert raw(sidecar, "PUT", "/_meterline/budgets/evil-block", orjson.dumps(RULE), json_type)[0] == 403
    assert raw(sidecar, "POST", "/_meterline/budgets/cap/topup", b'{"amount_usd": "5"}', json_type)[0] == 403
    assert raw(sidecar, "DELETE", "/_meterline/budgets/cap", None, headers)[0] == 403
    assert raw(sidecar, "POST", "/_meterline/sql", b"SELECT 1", headers)[0] == 403
    now = budgets(sidecar)
    assert "evil-block" not in now and "cap" in now


def test_the_sidecars_own_page_may_change_budgets(sidecar: Sidecar) -> None:
    own = {"Origin": sidecar.url, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}
    status, doc = raw(sidecar, "PUT", "/_meterline/budgets/own-page", orjson.dumps({**RULE, "name": "own-page"}), own)
    assert status == 200, doc
    assert raw(sidecar, "POST", "/_meterline/sql", b"SELECT 1", {**own, "Content-Type": "text/plain"})[0] == 200
    assert raw(sidecar, "DELETE", "/_meterline/budgets/own-page", None, own)[0] == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_budget_bodies_must_be_typed_json(sidecar: Sidecar, content_type: str | None) -> None:
    h = {"Content-Type": content_type} if content_type else {}
    for method, path, body in [("POST", "/_meterline/budgets", orjson.dumps(RULE)),
                               ("PUT", "/_meterline/budgets/evil-block", orjson.dumps(RULE)),
                               ("POST", "/_meterline/budgets/cap/topup", b'{"amount_usd": "5"}')]:
        status, doc = raw(sidecar, method, path, body, h)
        assert status == 415 and "application/json" in doc["error"], (method, path, status, doc)
    assert "evil-block" not in budgets(sidecar)
    # SQL keeps taking the query as plain text from programs (curl, the CLI)
    status, doc = raw(sidecar, "POST", "/_meterline/sql", b"SELECT 41 + 1 AS n", h)
    assert status == 200 and doc["rows"] == [[42]]


@pytest.mark.parametrize("path", ["/_meterline/sql", "/_meterline/budgets", "/_meterline/dashboard/config",
                                  "/_meterline/", "/_meterline/metrics", "/nowhere/v1/models"])
def test_a_rebinding_host_gets_421(sidecar: Sidecar, path: str) -> None:
    method, body = ("POST", b"SELECT * FROM calls") if path.endswith("/sql") else ("GET", None)
    for host in ("evil.example", f"evil.example:{sidecar.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        status, _ = raw(sidecar, method, path, body, {"Host": host})
        assert status == 421, (host, path, status)
    for host in (f"127.0.0.1:{sidecar.port}", f"localhost:{sidecar.port}", "LOCALHOST"):
        status, _ = raw(sidecar, method, path, body, {"Host": host})
        assert status != 421, (host, path)
    # probes may reach healthz by any name
    assert raw(sidecar, "GET", "/_meterline/healthz", None, {"Host": "10.1.2.3:8720"})[0] == 200


# --- the admin token on loopback -------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(fake: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    from tests.conftest import launch, upstreams_for

    process = launch(tmp_path_factory.mktemp("guarded"), {**upstreams_for(fake), "admin_token": TOKEN,
                                                           "budgets": [{"name": "cap", "window": "day",
                                                                        "limit_usd": 1}]})
    yield process
    process.stop()


def test_with_a_token_set_loopback_needs_it_too(guarded: Sidecar) -> None:
    assert raw(guarded, "POST", "/_meterline/sql", b"SELECT * FROM meta")[0] == 401
    assert raw(guarded, "POST", "/_meterline/sql", b"SELECT 1", {"x-meterline-admin-token": "wrong"})[0] == 401
    status, doc = raw(guarded, "POST", "/_meterline/sql", b"SELECT 1 AS one", {"x-meterline-admin-token": TOKEN})
    assert status == 200 and doc["rows"] == [[1]]
    for path in ("/_meterline/budgets", "/_meterline/dashboard/config", "/_meterline/metrics"):
        assert raw(guarded, "GET", path)[0] == 401, path
        assert raw(guarded, "GET", path, None, {"x-meterline-admin-token": TOKEN})[0] == 200, path
    # Prometheus sends the token as a bearer credential
    status, doc = raw(guarded, "GET", "/_meterline/metrics", None, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "meterline" in doc["text"]
    # what stays open: healthz and the dashboard's files (no data in them)
    for path in ("/_meterline/healthz", "/_meterline/", "/_meterline/static/app.js"):
        assert raw(guarded, "GET", path)[0] == 200, path
    assert "cap" in budgets(guarded, TOKEN)


def test_the_cli_sends_the_configs_token(guarded: Sidecar, tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = str(guarded.workdir / "meterline.yaml")
    for args in (["sql", "SELECT 7 AS n", "--format", "json"], ["budgets", "--format", "json"]):
        done = subprocess.run([sys.executable, "-m", "sidecar.cli", *args, "--config", cfg, "--url", guarded.url],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() and "Traceback" not in done.stderr
