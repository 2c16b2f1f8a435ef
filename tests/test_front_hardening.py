"""The front and the forwarding path against a hostile app, web page or upstream (issue 12): a
rebinding Host, bodies too large to read, heads that never end, odd HTTP versions, upstream heads
of megabytes, bodies that break off, non-UTF-8 metadata, secrets in the query string.

Raw bytes over sockets to the real sidecar process (tests/test_server.py's Wire), a fake provider
for the calls that work, and tests/fakes/raw_upstream.py for an upstream that misbehaves below HTTP.
"""
from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from sidecar import attribution
from tests.fakes.raw_upstream import RawUpstream
from tests.test_server import AUTH, CHAT_PATH, Response, Wire, chat, chat_body, chat_headers, check_chat, healthz, request

if TYPE_CHECKING:
    from conftest import E2E

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(60),
]
TIMEOUT_S = 1.0  # timeouts.head_s and body_idle_s of this module's sidecar


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    server = RawUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar_config(fake: Any, raw_upstream: RawUpstream) -> dict[str, Any]:
    names = ("openai", "anthropic", "gemini")
    upstreams: dict[str, Any] = {name: {"base_url": fake.base_url} for name in names}
    upstreams["raw"] = {"base_url": raw_upstream.base_url, "adapter": "openai", "provider": "openai"}
    upstreams["rawant"] = {"base_url": raw_upstream.base_url, "adapter": "anthropic", "provider": "anthropic"}
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    upstreams["down"] = {"base_url": f"http://127.0.0.1:{closed}", "adapter": "openai", "provider": "openai"}
    return {"upstreams": upstreams, "timeouts": {"head_s": TIMEOUT_S, "body_idle_s": TIMEOUT_S}}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def answer_then_close(wire: Wire) -> Response:
    resp = wire.response()
    assert (resp.header("connection") or "").lower() == "close", resp.headers
    assert wire.closed_by_peer(), "the sidecar must close the connection after this answer"
    return resp


def flood(wire: Wire, piece: bytes, times: int) -> tuple[int, Response | None]:
    """Sends `piece` up to `times` times, until the sidecar stops reading (it refuses or closes),
    then reads its answer. Returns the bytes sent and the answer, None if it only closed."""
    sent = 0
    try:
        for _ in range(times):
            wire.send(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        return sent, wire.response()
    except (EOFError, ConnectionResetError):
        return sent, None


def error_type(resp: Response) -> str:
    assert (resp.header("content-type") or "").startswith("application/json"), resp.headers
    return resp.json()["error"]["type"]


# --- 1. the Host allow-list on proxied calls -------------------------------------------------------


def evil_host(e2e: E2E) -> str:
    return f"evil.example:{e2e.sidecar.port}"


def test_rebinding_host_gets_421_and_nothing_reaches_the_upstream(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(case).replace(b"Host: 127.0.0.1", f"Host: {evil_host(e2e)}".encode(), 1))
        resp = answer_then_close(wire)
    assert resp.status == 421 and error_type(resp) == "meterline_misdirected"
    assert not e2e.exchanges(case, 0, 0.5), "a call with a foreign Host must not be forwarded"


def test_rebinding_host_pipelined_behind_a_good_call(e2e: E2E) -> None:
    good, bad = e2e.case(), e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(good) + chat(bad).replace(b"Host: 127.0.0.1", f"Host: {evil_host(e2e)}".encode(), 1))
        one = wire.response()
        two = answer_then_close(wire)
    check_chat(e2e, good, one)
    assert two.status == 421 and error_type(two) == "meterline_misdirected"
    assert not e2e.exchanges(bad, 0, 0.5)


@pytest.mark.parametrize("how", ["after-hand-over", "http-1.0"])
def test_rebinding_host_on_connections_aiohttp_serves(e2e: E2E, how: str) -> None:
    # the front hands these to aiohttp, whose route for proxied calls checks the Host too
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        if how == "after-hand-over":
            wire.send(healthz())
            assert wire.response("GET").status == 200
        data = chat(case, version="HTTP/1.0" if how == "http-1.0" else "HTTP/1.1")
        wire.send(data.replace(b"Host: 127.0.0.1", f"Host: {evil_host(e2e)}".encode(), 1))
        resp = wire.response()
    assert resp.status == 421 and error_type(resp) == "meterline_misdirected"
    assert not e2e.exchanges(case, 0, 0.5)


def test_loopback_names_are_served(e2e: E2E) -> None:
    for host in (f"localhost:{e2e.sidecar.port}", f"[::1]:{e2e.sidecar.port}", "127.0.0.1"):
        case = e2e.case()
        with Wire(e2e.sidecar.url) as wire:
            wire.send(chat(case).replace(b"Host: 127.0.0.1", f"Host: {host}".encode(), 1))
            check_chat(e2e, case, wire.response())


# --- 2. request bodies too large to read -----------------------------------------------------------


def test_huge_content_length_to_sql_is_refused_from_the_head(e2e: E2E) -> None:
    pid = e2e.sidecar.forwarder_pid()
    before = rss_kib(pid)
    with Wire(e2e.sidecar.url) as wire:
        wire.send(b"POST /_meterline/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 600000000\r\n\r\nSELECT 1")  # the head and a few bytes: the rest never comes
        t0 = time.monotonic()
        resp = answer_then_close(wire)
        took = time.monotonic() - t0
    assert resp.status == 413 and error_type(resp) == "meterline_too_large"
    assert took < TIMEOUT_S, f"the 413 must come from the head at once, not after a timeout ({took:.2f} s)"
    assert rss_kib(pid) - before < 20 * 1024


def test_huge_content_length_to_sql_after_hand_over(e2e: E2E) -> None:
    # aiohttp owns this connection: its admin routes have the same cap, from the head
    pid = e2e.sidecar.forwarder_pid()
    before = rss_kib(pid)
    with Wire(e2e.sidecar.url) as wire:
        wire.send(healthz())
        assert wire.response("GET").status == 200
        wire.send(b"POST /_meterline/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 600000000\r\n\r\nSELECT 1")
        t0 = time.monotonic()
        resp = wire.response()
        took = time.monotonic() - t0
        assert wire.closed_by_peer()
    assert resp.status == 413 and error_type(resp) == "meterline_too_large"
    assert took < TIMEOUT_S
    assert rss_kib(pid) - before < 20 * 1024


@pytest.mark.parametrize("handed_over", [False, True], ids=["front", "aiohttp"])
def test_chunked_body_to_an_admin_route_is_cut_at_its_cap(e2e: E2E, handed_over: bool) -> None:
    pid = e2e.sidecar.forwarder_pid()
    before = rss_kib(pid)
    piece = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    with Wire(e2e.sidecar.url) as wire:
        if handed_over:
            wire.send(healthz())
            assert wire.response("GET").status == 200
        wire.send(b"POST /_meterline/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent, resp = flood(wire, piece, 64 * 16)  # up to 64 MiB, but the sidecar stops reading long before
    assert sent < 16 * 1024 * 1024, f"{sent} bytes of an admin body were read"
    if resp is not None:
        assert resp.status == 413 and error_type(resp) == "meterline_too_large"
    assert rss_kib(pid) - before < 20 * 1024
    assert e2e.sidecar.health()["status"] == "ok"


def test_proxied_call_over_the_body_cap_is_refused_from_the_head(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", CHAT_PATH, headers={**chat_headers(case), "Content-Length": str(600 * 1024 * 1024)},
                          length=False) + b'{"model":')
        resp = answer_then_close(wire)
    assert resp.status == 413 and error_type(resp) == "meterline_too_large"
    assert not e2e.exchanges(case, 0, 0.3)


def test_header_value_without_end_is_a_431(e2e: E2E) -> None:
    pid = e2e.sidecar.forwarder_pid()
    before = rss_kib(pid)
    with Wire(e2e.sidecar.url) as wire:
        wire.send(f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ".encode())
        sent, resp = flood(wire, b"a" * 65536, 1024)  # up to 64 MiB of one header value
    assert sent < 8 * 1024 * 1024, f"{sent} bytes of one request head were read"
    if resp is not None:
        assert resp.status == 431 and error_type(resp) == "meterline_too_large"
    assert rss_kib(pid) - before < 20 * 1024


def test_admin_request_of_ordinary_size_still_works(e2e: E2E) -> None:
    query = b"SELECT 1 AS one"
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", "/_meterline/sql", query, {"Content-Type": "text/plain"}))
        resp = wire.response()
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["rows"] == [[1]]


# --- 4. slowloris ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT_PATH, "/_meterline/healthz"])
def test_slow_head_is_closed(e2e: E2E, path: str) -> None:
    with Wire(e2e.sidecar.url) as wire:
        wire.send(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        t0 = time.monotonic()
        i = 0
        # a header every 0.1 s (the connection is never idle), never the blank line that ends the head
        while time.monotonic() - t0 < 8 and not select.select([wire.sock], [], [], 0.1)[0]:
            try:
                wire.send(f"X-Slow-{i}: a\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            i += 1
        took = time.monotonic() - t0
        try:
            resp = wire.response()
        except (EOFError, ConnectionResetError):
            resp = None
    assert took < TIMEOUT_S + 2.5, f"the slow head was allowed {took:.1f} s"
    if resp is not None:
        assert resp.status == 408 and error_type(resp) == "meterline_timeout"


def test_silent_body_is_a_408(e2e: E2E) -> None:
    case = e2e.case()
    body = chat_body()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", CHAT_PATH, headers={**chat_headers(case), "Content-Length": str(len(body))},
                          length=False) + body[:10])
        t0 = time.monotonic()
        resp = answer_then_close(wire)
        took = time.monotonic() - t0
    assert resp.status == 408 and error_type(resp) == "meterline_timeout"
    assert TIMEOUT_S * 0.5 < took < TIMEOUT_S + 2.5
    assert not e2e.exchanges(case, 0, 0.2)


def test_a_slow_but_moving_body_is_not_cut(e2e: E2E) -> None:
    # the body limit is on silence: a body that keeps coming, slower than the limit in total, is served
    case = e2e.case()
    body = chat_body()
    with Wire(e2e.sidecar.url) as wire:
        wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire.send(request("POST", CHAT_PATH, headers={**chat_headers(case), "Content-Length": str(len(body))},
                          length=False))
        step = len(body) // 6 + 1
        for i in range(0, len(body), step):
            time.sleep(TIMEOUT_S * 0.3)
            wire.send(body[i:i + step])
        resp = wire.response()
    check_chat(e2e, case, resp)


# --- 5. HTTP versions and Upgrade -----------------------------------------------------------------


@pytest.mark.parametrize(("line", "status"), [(b"GET /openai/v1/models HTTP/2.0", 505),
                                              (b"GET /_meterline/healthz HTTP/2.0", 505),
                                              (b"GET /openai/v1/models", 400),
                                              (b"GET /_meterline/healthz", 400)],
                         ids=["2.0-proxied", "2.0-admin", "0.9-proxied", "0.9-admin"])
def test_http_0_9_and_2_0_are_refused(e2e: E2E, line: bytes, status: int) -> None:
    before = len(e2e.fake.exchanges)
    with Wire(e2e.sidecar.url) as wire:
        wire.send(line + (b"\r\n\r\n" if b"HTTP/" not in line else b"\r\nHost: 127.0.0.1\r\n\r\n"))
        resp = answer_then_close(wire)
    assert resp.status == status, (resp.status, resp.body)
    assert resp.version == "HTTP/1.1"
    assert len(e2e.fake.exchanges) == before


def test_request_pipelined_after_an_upgrade_is_answered(e2e: E2E) -> None:
    case = e2e.case()
    upgrade = request("GET", "/_meterline/healthz", headers={"Connection": "Upgrade", "Upgrade": "foo"})
    with Wire(e2e.sidecar.url) as wire:
        wire.send(upgrade + healthz() + chat(case))
        one, two, three = wire.response("GET"), wire.response("GET"), wire.response()
    assert one.status == two.status == 200
    assert one.json()["status"] == two.json()["status"] == "ok"
    check_chat(e2e, case, three)


def test_proxied_call_pipelined_after_an_upgrade_call(e2e: E2E) -> None:
    first, second = e2e.case(), e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(first, Connection="Upgrade", Upgrade="h2c") + chat(second))
        one, two = wire.response(), wire.response()
    check_chat(e2e, first, one)
    check_chat(e2e, second, two)


def test_connect_is_refused(e2e: E2E) -> None:
    with Wire(e2e.sidecar.url) as wire:
        wire.send(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
        resp = answer_then_close(wire)
    assert resp.status in (400, 405)


# --- 3. upstream heads without end -----------------------------------------------------------------


def test_huge_upstream_head_is_a_502_in_the_provider_shape(e2e: E2E) -> None:
    pid = e2e.sidecar.forwarder_pid()
    before = rss_kib(pid)
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", "/raw/v1/chat/huge-head", chat_body(), chat_headers(case)))
        resp = wire.response()
        wire.send(chat(again := e2e.case()))  # the app's connection goes on
        check_chat(e2e, again, wire.response())
    assert resp.status == 502, (resp.status, resp.body[:200])
    doc = resp.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}  # OpenAI's shape
    assert "head" in doc["error"]["message"]
    assert len(resp.headers) < 20, "none of the upstream's headers may reach the app"
    assert rss_kib(pid) - before < 50 * 1024
    row = e2e.row(case)
    e2e.expect(row, outcome="network_error", status_code=None)


def test_huge_upstream_head_anthropic_shape(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", "/rawant/v1/huge-head", b'{"model":"claude-haiku-4-5","max_tokens":5}',
                          {**chat_headers(case), "anthropic-version": "2023-06-01"}))
        resp = wire.response()
    assert resp.status == 502
    doc = resp.json()
    assert doc["type"] == "error" and set(doc["error"]) == {"type", "message"}


# --- 6. a non-streamed body that breaks off before its head left ------------------------------------


def test_non_streamed_body_broken_off_is_a_502(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", "/raw/v1/chat/break-body", chat_body(), chat_headers(case)))
        resp = wire.response()
    assert resp.status == 502, (resp.status, resp.body[:200])
    doc = resp.json()
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert b"chatcmpl-raw" not in resp.body  # none of the cut body: the app sees an error, not half a document
    row = e2e.row(case)
    e2e.expect(row, outcome="network_error", status_code=200)


# --- 7. metadata that is not UTF-8 --------------------------------------------------------------------


@pytest.mark.parametrize("via", ["front", "aiohttp"])
def test_latin_1_user_header_is_forwarded_and_recorded(e2e: E2E, via: str) -> None:
    case = e2e.case()
    data = chat(case)
    head, _, body = data.partition(b"\r\n\r\n")
    head += b"\r\nx-meterline-user: caf\xe9\r\nx-meterline-app: b\xe4r"
    head = head.replace(b"x-meterline-tags: case=" + case.id.encode(), b"x-meterline-tags: case=" + case.id.encode()
                        + b",team=\xfcber", 1)
    with Wire(e2e.sidecar.url) as wire:
        if via == "aiohttp":
            wire.send(healthz())
            assert wire.response("GET").status == 200
        wire.send(head + b"\r\n\r\n" + body)
        resp = wire.response()
    ex = e2e.exchange(case)  # the fake saw the call
    assert resp.status == 200 and resp.body == ex.response_body
    row = e2e.row(case)
    e2e.expect(row, user_id="café", app="bär", outcome="ok")
    assert row["tags"]["team"] == "über"


def test_non_utf8_api_key_is_forwarded(e2e: E2E) -> None:
    case = e2e.case()
    data = chat(case).replace(b"Bearer sk-e2e", b"Bearer sk-\xff\xfe", 1)
    with Wire(e2e.sidecar.url) as wire:
        wire.send(data)
        resp = wire.response()
    assert resp.status == 200
    row = e2e.row(case)
    assert row["key_fingerprint"] and row["key_fingerprint"].startswith("fp_")


# --- 8. upstream network errors say where and why -------------------------------------------------------


def test_connect_error_names_host_and_reason(e2e: E2E) -> None:
    port = e2e.sidecar.config["upstreams"]["down"]["base_url"].rsplit(":", 1)[1]
    got = e2e.raw("/down/v1/chat/completions", json.loads(chat_body()))
    assert got.status == 502
    message = json.loads(got.body)["error"]["message"]
    assert f"127.0.0.1:{port}" in message and "refused" in message.lower(), message
    log = e2e.sidecar.log()
    assert any(f"127.0.0.1:{port}" in line and "refused" in line.lower() for line in log.splitlines()), log[-2000:]


def test_disconnect_before_answer_names_host_and_reason(e2e: E2E) -> None:
    got = e2e.raw("/raw/v1/chat/close-early", json.loads(chat_body()))
    assert got.status == 502
    message = json.loads(got.body)["error"]["message"]
    assert "127.0.0.1" in message and "closed" in message, message


# --- 9. secrets in the query string ---------------------------------------------------------------


SECRET_PARAMS = ["key", "api_key", "api-key", "apikey", "API_KEY", "access_token", "token", "x-goog-api-key",
                 "sig", "signature", "Signature", "client_secret", "X-Amz-Signature", "auth", "password", "secret"]


def test_query_secrets_never_reach_the_ledger(e2e: E2E) -> None:
    case = e2e.case()
    secrets = {name: f"s3cr3t{i}x" for i, name in enumerate(SECRET_PARAMS)}
    query = "&".join(f"{name}={value}" for name, value in secrets.items()) + "&alt=sse&safe=1"
    got = e2e.raw(f"/openai/v1/chat/completions?{query}", json.loads(chat_body()), AUTH, case=case)
    assert got.status == 200
    row = e2e.row(case)
    endpoint = row["endpoint"]
    for value in secrets.values():
        assert value not in endpoint, endpoint
    assert "alt=sse" in endpoint and "safe=1" in endpoint  # what is not a secret stays
    assert endpoint.count("REDACTED") == len(SECRET_PARAMS)


@pytest.mark.parametrize("query", ["key=abc", "KEY=abc&x=1", "x=1&access_token=abc", "Api-Key=abc", "sig=abc",
                                   "x-goog-api-key=abc", "token=abc", "client_secret=abc"])
def test_api_key_in_the_query_is_fingerprinted_and_redacted(query: str) -> None:
    assert "abc" not in attribution.redact_query(query)
    if not query.lower().startswith(("sig", "client_secret")):
        assert attribution.api_key({}, query) == "abc"


def test_redact_query_leaves_other_parameters() -> None:
    assert attribution.redact_query("alt=sse&monkey=1&tokens=5") == "alt=sse&monkey=1&tokens=5"


# --- 10. memory after a spike ---------------------------------------------------------------------


def test_memory_is_returned_after_large_calls(e2e: E2E) -> None:
    pid = e2e.sidecar.forwarder_pid()
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (30 * 1024 * 1024)}]})
    for _ in range(3):
        case = e2e.case()
        with Wire(e2e.sidecar.url) as wire:
            wire.sock.settimeout(60)
            wire.send(request("POST", CHAT_PATH, body.encode(), chat_headers(case)))
            assert wire.response().status == 200
        e2e.fake.exchanges.clear()  # the fake keeps request bodies; this process's memory, not the sidecar's
    peak = rss_kib(pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and rss_kib(pid) > peak - 15 * 1024:
        time.sleep(0.2)
    # glibc kept the freed buffers (about +36 MiB after these calls, measured); malloc_trim returns them
    assert rss_kib(pid) <= peak - 15 * 1024, f"RSS {rss_kib(pid)} KiB, {peak} KiB right after the calls"


@pytest.mark.parametrize("path", [CHAT_PATH, "/_meterline/sql"])
def test_silent_body_on_a_connection_aiohttp_serves_is_a_408(e2e: E2E, path: str) -> None:
    case = e2e.case()
    body = chat_body()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(healthz())
        assert wire.response("GET").status == 200
        wire.send(request("POST", path, headers={**chat_headers(case), "Content-Length": str(len(body))},
                          length=False) + body[:10])
        t0 = time.monotonic()
        resp = wire.response()
        took = time.monotonic() - t0
        assert wire.closed_by_peer()
    assert resp.status == 408 and error_type(resp) == "meterline_timeout"
    assert took < TIMEOUT_S + 2.5
    assert not e2e.exchanges(case, 0, 0.2)


def test_proxied_call_after_hand_over_with_a_large_body(e2e: E2E) -> None:
    # read by read_body as it arrives: whole and exact
    case = e2e.case()
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "y" * (2 * 1024 * 1024)}]})
    with Wire(e2e.sidecar.url) as wire:
        wire.send(healthz())
        assert wire.response("GET").status == 200
        wire.send(request("POST", CHAT_PATH, body.encode(), chat_headers(case)))
        resp = wire.response()
    ex = e2e.exchange(case)
    assert resp.status == 200 and ex.request_body == body.encode()


@pytest.mark.parametrize("key", ["head_s", "body_idle_s"])
@pytest.mark.parametrize("value", [0, -1, "x", True])
def test_bad_front_timeout_names_its_key(key: str, value: Any) -> None:
    from sidecar.config import ConfigError, parse
    with pytest.raises(ConfigError, match=f"timeouts.{key}"):
        parse({"timeouts": {key: value}})
    assert getattr(parse({"timeouts": {key: 2.5}}), "head_timeout_s" if key == "head_s" else "body_idle_timeout_s") == 2.5
