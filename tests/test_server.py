"""The listening socket's HTTP/1.1 front (sidecar/server.py), spoken to in raw bytes over sockets.

The front serves proxied calls itself and hands any other connection to aiohttp at a message
boundary (the admin API, unknown upstreams, HTTP/1.0, `Expect`, `Upgrade`). These tests write
exactly the bytes an app would (keep-alive, pipelining, chunked bodies, 100-continue, HTTP/1.0,
`Connection: close`, garbage) to the real sidecar process and check every response's framing,
its body against what the fake provider sent, and the ledger row of each call.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from tests.fakes import reply_text

if TYPE_CHECKING:
    from conftest import E2E, Case

MESSAGES = [{"role": "user", "content": "Say hello to the meter."}]
CHAT_PATH = "/openai/v1/chat/completions"
AUTH = {"Authorization": "Bearer sk-e2e"}
# every read waits at most this long: a hung connection fails the test instead of stalling it
READ_TIMEOUT_S = 5.0
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(60),  # the module's first test also waits for the sidecar to start
]


# --- raw HTTP/1.1 ------------------------------------------------------------------------------


@dataclass
class Response:
    version: str  # "HTTP/1.1"
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as sent, in order
    body: bytes = b""  # de-chunked
    chunks: list[bytes] = field(default_factory=list)  # the chunks as framed (chunked responses only)
    framing: str = ""  # "length" | "chunked" | "eof" | "none"
    terminated: bool = False  # a chunked body's terminating 0-chunk was read

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Wire:
    """One connection to the sidecar: bytes go out exactly as given; responses are parsed by hand."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=READ_TIMEOUT_S)
        self.buf = bytearray()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(256 * 1024)
        if not data:
            return False
        self.buf += data
        return True

    def _line(self, sep: bytes = b"\r\n") -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if not self._fill():
                raise EOFError(f"connection closed while waiting for {sep!r}; unread: {bytes(self.buf)[:200]!r}")
        out = bytes(self.buf[:i])
        del self.buf[:i + len(sep)]
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed {n - len(self.buf)} bytes short of {n}")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def head(self) -> Response:
        """A response's status line and headers (an interim 1xx included)."""
        lines = self._line(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        return Response(version, int(status), reason[0] if reason else "", headers)

    def chunk(self) -> bytes | None:
        """One chunk of a chunked body; None for the terminating 0-chunk (its trailers read too)."""
        size = int(self._line().split(b";")[0], 16)
        if size == 0:
            while self._line():  # trailers, up to the blank line
                pass
            return None
        data = self._exactly(size)
        assert self._exactly(2) == b"\r\n", "a chunk's data must end with CRLF"
        return data

    def body(self, resp: Response, method: str = "POST") -> Response:
        """Reads the body of `resp` as its headers frame it."""
        if method == "HEAD" or 100 <= resp.status < 200 or resp.status in (204, 304):
            resp.framing = "none"
        elif "chunked" in (resp.header("transfer-encoding") or "").lower():
            resp.framing = "chunked"
            while (data := self.chunk()) is not None:
                resp.chunks.append(data)
            resp.body, resp.terminated = b"".join(resp.chunks), True
        elif (length := resp.header("content-length")) is not None:
            resp.framing = "length"
            resp.body = self._exactly(int(length))
        else:
            resp.framing = "eof"
            while self._fill():
                pass
            resp.body, self.buf = bytes(self.buf), bytearray()
        return resp

    def response(self, method: str = "POST") -> Response:
        """The next whole final response (an interim 1xx here fails the test)."""
        resp = self.head()
        assert not 100 <= resp.status < 200, f"unexpected interim response {resp.status} {resp.reason}"
        return self.body(resp, method)

    def closed_by_peer(self, wait: float = READ_TIMEOUT_S) -> bool:
        """Whether the sidecar closes the connection (nothing more arrives before its EOF)."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(READ_TIMEOUT_S)
        self.buf += data
        return not data


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            version: str = "HTTP/1.1", length: bool = True) -> bytes:
    """A request's bytes: a Host header, the given headers, Content-Length (with `length`) and the body."""
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length and (body or method in ("POST", "PUT")):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat_body(stream: bool = False, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, **extra}
    if stream:  # with usage asked for, the sidecar sends the stream on exactly as the fake wrote it
        doc.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(doc).encode()


def chat_headers(case: Case, **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", **AUTH, **case.headers, **extra}


def chat(case: Case, stream: bool = False, version: str = "HTTP/1.1", **extra: str) -> bytes:
    """A whole proxied OpenAI chat call of `case`."""
    return request("POST", CHAT_PATH, chat_body(stream), chat_headers(case, **extra), version=version)


def healthz() -> bytes:
    return request("GET", "/_meterline/healthz")


def check_chat(e2e: E2E, case: Case, resp: Response, parts: int = 5) -> dict[str, Any]:
    """`resp` is the case's whole non-streamed answer, exactly as the fake sent it; returns its row."""
    ex = e2e.exchange(case)
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert resp.body == ex.response_body
    doc = resp.json()
    assert doc["id"] == ex.response_id and doc["choices"][0]["message"]["content"] == reply_text(parts)
    row = e2e.row(case)
    e2e.expect(row, status_code=200, outcome="ok", response_id=ex.response_id, request_model="gpt-4o-mini",
               input_tokens=ex.usage["prompt_tokens"])
    return row


def check_health(resp: Response, e2e: E2E) -> None:
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert (resp.header("content-type") or "").startswith("application/json")
    doc = resp.json()
    assert doc["status"] == "ok" and doc["ledger"]["path"] == str(e2e.sidecar.db)


def sse_data(body: bytes) -> list[bytes]:
    return [line[len(b"data: "):] for line in body.split(b"\n") if line.startswith(b"data: ")]


# --- keep-alive ----------------------------------------------------------------------------------


def test_two_proxied_calls_on_one_connection(e2e: E2E) -> None:
    first, second = e2e.case(), e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(first))
        one = wire.response()
        wire.send(chat(second))
        two = wire.response()
        assert one.framing == two.framing == "length"
        assert one.header("connection") is None  # keep-alive is HTTP/1.1's default: nothing to say
    check_chat(e2e, first, one)
    check_chat(e2e, second, two)
    assert one.json()["id"] != two.json()["id"]


def test_admin_request_between_proxied_calls(e2e: E2E) -> None:
    first, third = e2e.case(), e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(first))
        one = wire.response()
        wire.send(healthz())  # the connection goes to aiohttp here
        two = wire.response("GET")
        wire.send(chat(third))  # and stays there: aiohttp's route forwards it
        three = wire.response()
        wire.send(healthz())
        four = wire.response("GET")
    check_chat(e2e, first, one)
    check_health(two, e2e)
    check_chat(e2e, third, three)
    check_health(four, e2e)


def test_admin_request_first_then_proxied_call(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(healthz())
        one = wire.response("GET")
        wire.send(chat(case))
        two = wire.response()
    check_health(one, e2e)
    check_chat(e2e, case, two)


# --- pipelining ----------------------------------------------------------------------------------


def test_pipelined_proxied_calls_are_answered_in_order(e2e: E2E) -> None:
    cases = [e2e.case(), e2e.case(), e2e.case()]
    with Wire(e2e.sidecar.url) as wire:
        wire.send(b"".join(chat(case) for case in cases))  # one write
        got = [wire.response() for _ in cases]
        wire.send(chat(after := e2e.case()))  # the connection still serves calls afterwards
        last = wire.response()
    for case, resp in zip(cases, got):
        check_chat(e2e, case, resp)  # each response is its own request's (ids match the exchanges)
    assert len({resp.json()["id"] for resp in got}) == len(cases)
    check_chat(e2e, after, last)


def test_pipelined_proxied_call_then_admin_request(e2e: E2E) -> None:
    first, third = e2e.case(), e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(first) + healthz() + chat(third) + healthz())
        got = [wire.response(), wire.response("GET"), wire.response(), wire.response("GET")]
    check_chat(e2e, first, got[0])
    check_health(got[1], e2e)
    check_chat(e2e, third, got[2])
    check_health(got[3], e2e)


def test_request_split_across_many_writes(e2e: E2E) -> None:
    case = e2e.case()
    data = chat(case)
    with Wire(e2e.sidecar.url) as wire:
        wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), 7):  # headers and body cut anywhere, names and values included
            wire.send(data[i:i + 7])
            if i % 70 == 0:
                time.sleep(0.001)
        resp = wire.response()
    check_chat(e2e, case, resp)


# --- request bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("handed_over", [False, True], ids=["fresh-connection", "after-hand-over"])
def test_expect_100_continue(e2e: E2E, handed_over: bool) -> None:
    case = e2e.case()
    body = chat_body()
    with Wire(e2e.sidecar.url) as wire:
        if handed_over:  # aiohttp owns the connection: it answers the Expect itself
            wire.send(healthz())
            check_health(wire.response("GET"), e2e)
        head = request("POST", CHAT_PATH, headers={**chat_headers(case), "Content-Length": str(len(body)),
                                                   "Expect": "100-continue"}, length=False)
        wire.send(head)  # the body waits for the go-ahead
        interim = wire.head()
        assert (interim.version, interim.status) == ("HTTP/1.1", 100), interim
        wire.send(body)
        resp = wire.response()
        wire.send(chat(again := e2e.case()))  # and the connection goes on
        resp2 = wire.response()
    check_chat(e2e, case, resp)
    check_chat(e2e, again, resp2)
    assert "expect" not in e2e.exchange(case).request_headers  # answered by the sidecar, not forwarded


def test_expect_100_continue_pipelined_behind_a_call(e2e: E2E) -> None:
    # The Expect request's headers arrive while the call before it is being served: its
    # 100 Continue is owed once that call's response is out (aiohttp's own server does so).
    first, second = e2e.case("slow", chunks=2, delay_ms=100), e2e.case()  # the first takes 0.2 s upstream
    body = chat_body()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(first) + request("POST", CHAT_PATH, headers={
            **chat_headers(second), "Content-Length": str(len(body)), "Expect": "100-continue"}, length=False))
        one = wire.response()
        wire.sock.settimeout(3.0)
        try:
            interim = wire.head()
        except socket.timeout:
            interim = None
        wire.sock.settimeout(READ_TIMEOUT_S)
        assert interim is not None, ("no 100 Continue for the pipelined Expect request within 3 s: "
                                     "the app can only send its body after its own Expect timeout")
        assert interim.status == 100, interim
        wire.send(body)
        two = wire.response()
    check_chat(e2e, first, one, parts=2)
    check_chat(e2e, second, two)


def chunked(parts: list[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(part), part) for part in parts] + [b"0\r\n\r\n"]


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_chunked_request_body(e2e: E2E, expect: bool) -> None:
    case = e2e.case()
    body = chat_body()
    parts = chunked([body[:17], body[17:]])
    extra = {"Transfer-Encoding": "chunked", **({"Expect": "100-continue"} if expect else {})}
    with Wire(e2e.sidecar.url) as wire:
        wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire.send(request("POST", CHAT_PATH, headers={**chat_headers(case), **extra}, length=False))
        if expect:
            interim = wire.head()
            assert interim.status == 100, interim
        wire.send(parts[0])
        time.sleep(0.05)  # the body arrives in two writes
        wire.send(b"".join(parts[1:]))
        resp = wire.response()
        wire.send(chat(again := e2e.case()))
        resp2 = wire.response()
    ex = e2e.exchange(case)
    assert ex.request_body == body  # the upstream got the whole body, de-chunked
    row = check_chat(e2e, case, resp)
    assert row["request_bytes"] == len(body)
    check_chat(e2e, again, resp2)


def test_large_request_body(e2e: E2E) -> None:
    case = e2e.case()
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]}).encode()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", CHAT_PATH, body, chat_headers(case)))
        resp = wire.response()
        wire.send(chat(again := e2e.case()))
        resp2 = wire.response()
    ex = e2e.exchange(case)
    assert resp.status == 200 and resp.body == ex.response_body
    assert ex.request_body == body
    row = e2e.row(case)
    e2e.expect(row, outcome="ok", status_code=200, request_bytes=len(body), response_id=ex.response_id)
    check_chat(e2e, again, resp2)


# --- what the front hands to aiohttp ---------------------------------------------------------------


def test_http_1_0_proxied_call(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(case, version="HTTP/1.0"))
        resp = wire.response()
        assert wire.closed_by_peer(), "HTTP/1.0 without keep-alive: the connection ends with the response"
    assert resp.framing in ("length", "eof")
    check_chat(e2e, case, resp)


def test_unknown_upstream_is_a_404_of_meterline(e2e: E2E) -> None:
    before = len(e2e.fake.exchanges)
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", "/nope/x", b"{}", {"Content-Type": "application/json", **AUTH}))
        resp = wire.response()
        wire.send(chat(case := e2e.case()))  # the same connection still forwards calls
        resp2 = wire.response()
    assert resp.status == 404 and (resp.header("content-type") or "").startswith("application/json")
    assert resp.json()["error"]["type"] == "meterline_unknown_upstream"
    assert "nope" in resp.json()["error"]["message"]
    check_chat(e2e, case, resp2)
    assert len(e2e.fake.exchanges) == before + 1  # only the second call reached the fake


def test_percent_escapes_are_forwarded_as_sent(e2e: E2E) -> None:
    # The fake records the path as aiohttp decodes it (once): `%2541` reaches it as `%41` only if
    # the sidecar sent `%2541` on, and `%3F` stays in the path instead of starting a query.
    fast, handed = e2e.case(), e2e.case()
    path = "/openai/v1/chat/a%2541%3Fb%20c"
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", path + "?q=1%262", chat_body(), chat_headers(fast)))
        one = wire.response()
        wire.send(healthz())
        check_health(wire.response("GET"), e2e)
        wire.send(request("POST", path + "?q=1%262", chat_body(), chat_headers(handed)))  # now via aiohttp
        two = wire.response()
    for case, resp in ((fast, one), (handed, two)):
        ex = e2e.exchange(case)
        assert resp.status == 404 and resp.body == ex.response_body  # the fake has no such route
        assert (ex.path, ex.query_string) == ("/v1/chat/a%41?b c", "q=1%262")
        assert ex.query == {"q": "1&2"}


# --- connection handling -------------------------------------------------------------------------


def test_connection_close_is_honoured(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(case, Connection="close"))
        resp = wire.response()
        assert (resp.header("connection") or "").lower() == "close"
        assert wire.closed_by_peer(), "the sidecar must close the connection after a Connection: close response"
    check_chat(e2e, case, resp)


def test_stream_is_chunked_and_the_connection_reusable(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(case, stream=True))
        resp = wire.response()
        wire.send(chat(again := e2e.case()))
        resp2 = wire.response()
    ex = e2e.exchange(case)
    assert resp.status == 200 and resp.framing == "chunked" and resp.terminated
    assert resp.header("content-length") is None
    assert (resp.header("content-type") or "").startswith("text/event-stream")
    assert resp.body == ex.response_body and len(resp.chunks) > 1
    events = sse_data(resp.body)
    assert events[-1] == b"[DONE]" and resp.body.endswith(b"data: [DONE]\n\n")
    assert {json.loads(e)["id"] for e in events[:-1]} == {ex.response_id}
    e2e.expect(e2e.row(case), stream=True, status_code=200, outcome="ok", response_id=ex.response_id,
               input_tokens=ex.usage["prompt_tokens"], output_tokens=ex.usage["completion_tokens"])
    check_chat(e2e, again, resp2)


def test_stream_after_hand_over_is_chunked(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(healthz())
        check_health(wire.response("GET"), e2e)
        wire.send(chat(case, stream=True))
        resp = wire.response()
    ex = e2e.exchange(case)
    assert resp.status == 200 and resp.framing == "chunked" and resp.body == ex.response_body
    assert sse_data(resp.body)[-1] == b"[DONE]"


def test_app_disconnect_mid_stream_is_cancelled(e2e: E2E) -> None:
    case = e2e.case("slow", chunks=200, delay_ms=25)
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(case, stream=True))
        head = wire.head()
        assert head.status == 200 and "chunked" in (head.header("transfer-encoding") or "")
        first = wire.chunk()
        assert first and first.startswith(b"data: ")
    # the app left after one chunk of a five-second stream
    ex = e2e.exchange(case)
    assert not ex.complete and b"[DONE]" not in ex.response_body
    row = e2e.row(case)
    e2e.expect(row, stream=True, status_code=200, outcome="cancelled", response_id=ex.response_id)
    assert row["ended_at"] is not None and 0 < row["response_bytes"] <= len(ex.response_body)
    check_health(_fresh_healthz(e2e), e2e)


def _fresh_healthz(e2e: E2E) -> Response:
    with Wire(e2e.sidecar.url) as wire:
        wire.send(healthz())
        return wire.response("GET")


@pytest.mark.parametrize("garbage", [b"NOT HTTP\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
                                     b"POST /openai/v1/chat/completions HTTP/1.1\r\nContent-Length: zz\r\n\r\n"],
                         ids=["words", "tls-hello", "bad-length"])
def test_malformed_request_is_a_400(e2e: E2E, garbage: bytes) -> None:
    with Wire(e2e.sidecar.url) as wire:
        wire.send(garbage)
        try:
            head = wire.head()
        except (EOFError, ConnectionResetError):
            head = None  # closing without an answer is allowed too
        if head is not None:
            resp = wire.body(head)
            assert resp.status == 400, resp
            assert resp.json()["error"]["type"] == "meterline_bad_request"
            assert (resp.header("connection") or "").lower() == "close"
            assert wire.closed_by_peer()
    check_health(_fresh_healthz(e2e), e2e)


def test_malformed_request_pipelined_after_a_call(e2e: E2E) -> None:
    # The call already read is answered (and recorded as ok: the provider bills it), then the
    # garbage gets its 400 and the connection closes.
    case = e2e.case()
    got: list[Response] = []
    with Wire(e2e.sidecar.url) as wire:
        wire.send(chat(case) + b"NOT HTTP\r\n\r\n")
        while True:
            try:
                got.append(wire.response())
            except (EOFError, ConnectionResetError):
                break
    assert [resp.status for resp in got] == [200, 400]
    check_chat(e2e, case, got[0])
    assert got[1].json()["error"]["type"] == "meterline_bad_request"
    assert e2e.row(case)["outcome"] == "ok"
    check_health(_fresh_healthz(e2e), e2e)


def test_oversized_request_head_is_a_431(e2e: E2E) -> None:
    case = e2e.case()
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("POST", CHAT_PATH, headers={**chat_headers(case), "X-Padding": "a" * (70 * 1024),
                                                      "Content-Length": "2"}, length=False) + b"{}")
        got = wire.response()
        assert got.status == 431 and got.json()["error"]["type"] == "meterline_too_large"
        with pytest.raises((EOFError, ConnectionResetError)):
            wire.response()
    assert not e2e.exchanges(case, 0, 0.2)  # nothing reached the provider
    check_health(_fresh_healthz(e2e), e2e)


def test_upgrade_request_is_handed_to_aiohttp(e2e: E2E) -> None:
    with Wire(e2e.sidecar.url) as wire:
        wire.send(request("GET", "/_meterline/healthz", headers={"Connection": "Upgrade", "Upgrade": "foo"}))
        check_health(wire.response("GET"), e2e)
    check_health(_fresh_healthz(e2e), e2e)
