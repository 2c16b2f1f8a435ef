"""The SQL endpoint cannot keep a core busy: a statement timeout, interruption when the client leaves
and at shutdown, and a bound on queries at once; against the real sidecar process."""
from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from typing import Any

import orjson
import pytest

from tests.sidecar_process import Sidecar

RUNAWAY = b"SELECT sum(hash(range)) FROM range(10000000000)"  # minutes of one core; nothing shortcuts it


def post_sql(sc: Sidecar, query: bytes, timeout: float = 60) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=timeout)
    try:
        conn.request("POST", "/_meterline/sql", body=query, headers={"Content-Type": "text/plain"})
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read()), time.monotonic() - started
    finally:
        conn.close()


def healthz_s(sc: Sidecar) -> float:
    started = time.monotonic()
    sc.health()
    return time.monotonic() - started


def test_a_runaway_query_is_interrupted_at_the_timeout(start_sidecar: Any) -> None:
    sc = start_sidecar({"sql": {"timeout_s": 1.5}})
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(zip(("status", "doc", "took"), post_sql(sc, RUNAWAY))))
    worker.start()
    time.sleep(0.5)
    # while it runs, the sidecar answers
    assert healthz_s(sc) < 1.0
    status, doc, took = post_sql(sc, b"SELECT 42 AS n")
    assert (status, doc["rows"]) == (200, [[42]]) and took < 2.0
    worker.join(30)
    assert not worker.is_alive()
    assert result["status"] == 400 and "interrupted" in result["doc"]["error"]
    assert "sql.timeout_s" in result["doc"]["error"]
    assert 1.4 < result["took"] < 6.0, result["took"]


def _start_runaway(sc: Sidecar) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", sc.port))
    s.sendall(b"POST /_meterline/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(RUNAWAY), RUNAWAY))
    return s


def test_a_query_is_interrupted_when_its_client_leaves(start_sidecar: Any) -> None:
    # one query at a time: the next one runs only once the thread of the first is free
    sc = start_sidecar({"sql": {"timeout_s": 600, "max_concurrent": 1}})
    s = _start_runaway(sc)
    time.sleep(1.0)
    s.close()
    status, doc, took = post_sql(sc, b"SELECT 3 AS n", timeout=60)
    assert (status, doc["rows"]) == (200, [[3]])
    assert took < 10.0, f"the next query waited {took:.1f} s: the first kept running after its client left"


def test_sigterm_during_a_query_exits_promptly(start_sidecar: Any) -> None:
    sc = start_sidecar({"sql": {"timeout_s": 600}})
    s = _start_runaway(sc)
    time.sleep(1.0)
    assert sc.proc is not None and sc.proc.poll() is None
    started = time.monotonic()
    sc.proc.send_signal(signal.SIGTERM)
    sc.proc.wait(60)
    took = time.monotonic() - started
    s.close()
    assert took < 8.0, f"SIGTERM took {took:.1f} s with a query running"
    assert sc.proc.returncode == 0, sc.log()


def test_past_the_bound_on_queries_at_once_it_answers_503(start_sidecar: Any) -> None:
    sc = start_sidecar({"sql": {"timeout_s": 3, "max_concurrent": 1}})
    results: list[Any] = []

    def one() -> None:
        try:
            results.append(post_sql(sc, RUNAWAY))
        except Exception as e:  # noqa: BLE001 - shown by the assertion below
            results.append((repr(e), {}, 0.0))

    workers = [threading.Thread(target=one) for _ in range(8)]
    for w in workers:  # one runs, seven wait their turn
        w.start()
    time.sleep(1.0)
    status, doc, took = post_sql(sc, b"SELECT 1")
    assert status == 503 and "sql.max_concurrent" in doc["error"] and took < 2.0
    assert healthz_s(sc) < 1.0
    for w in workers:
        w.join(30)
    # each was interrupted by its own timer, running or waiting: nothing ran on after it
    assert sorted(r[0] for r in results) == [400] * 8, results
    assert max(r[2] for r in results) < 10.0
    status, doc, _ = post_sql(sc, b"SELECT 2 AS n")
    assert (status, doc["rows"]) == (200, [[2]])


@pytest.mark.parametrize(("sql", "message"), [
    ({"timeout_s": 0}, "config key 'sql.timeout_s': expected a positive number of seconds"),
    ({"timeout_s": float("nan")}, "config key 'sql.timeout_s'"),
    ({"max_concurrent": 0}, "config key 'sql.max_concurrent'"),
    ({"threads": 2}, "unknown config key 'sql.threads'"),
])
def test_bad_sql_config_names_the_key(sql: dict[str, Any], message: str) -> None:
    from sidecar.config import ConfigError, parse
    with pytest.raises(ConfigError) as e:
        parse({"sql": sql})
    assert message in str(e.value)


def _ignore(fn: Any) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the connection is cut by the shutdown
        pass
