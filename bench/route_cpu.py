"""CPU a one-target route adds to a call, measured in-process: the plan, the try's request, its headers and the
record's fold into attempts (what sidecar/routes adds on top of the direct path's work).

    python -m bench.route_cpu [--calls 20000]

bench/run.py runs it before the rounds when a route row runs and prints its number next to the route target
(the whole-process row cannot resolve a few microseconds on a noisy machine); it isolates the route's own code.
"""
from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from typing import Any

import orjson

from ledger.records import CallRecord
from sidecar import config
from sidecar.adapters import openai as adapter
from sidecar.routes import attempts


class _Incoming:
    method = "POST"
    target = "/v1/chat/completions"


class _Call:
    ttft = 0.01
    t0 = 0.0


def _record() -> CallRecord:
    now = datetime.now(timezone.utc)
    return CallRecord("c", now, now, 5.0, 1.0, 0.1, None, "openai", "openai", "chat", "/v1/chat/completions",
                      "gpt-4o-mini", "gpt-4o-mini", "r", False, 200, "ok", None, "stop", 30, 7, None, None, None,
                      None, None, None, None, None, None, None, {}, None, None, 10, 20)


def measure(calls: int) -> float:
    """Microseconds of CPU per call that the route adds."""
    cfg = config.parse({"routes": {"r": {"targets": [{"upstream": "openai", "model": "gpt-4o-mini"}]}}})
    states = attempts.table(cfg.routes, cfg.upstreams)
    body: dict[str, Any] = {"model": "r", "messages": [{"role": "user", "content": "hello"}]}
    incoming = _Incoming()
    incoming.body = orjson.dumps(body)  # type: ignore[attr-defined]
    info = adapter.describe("openai", "/v1/chat/completions", body, incoming.body)  # type: ignore[attr-defined]
    at = datetime.now(timezone.utc)
    records = [_record() for _ in range(calls)]
    start = time.process_time()
    for record in records:
        rc = attempts.RoutedCall(states[info.request_model])
        order, rc.arm = rc.state.plan(info, None, None, {}, None, at)
        target = order[0]
        rc.state.breakers[target.key].allow()
        tinfo = attempts._target_info(info, "openai", target.model, "r", adapter)
        attempts._request(adapter, tinfo, body, incoming, "r", target.model)
        rc.committed, rc.target, rc.breaker = True, target, rc.state.breakers[target.key]
        rc.headers()
        rc.finish(record, _Call())
    return (time.process_time() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    print(f"a one-target route adds {measure(args.calls):.1f} us of CPU per call (in-process, {args.calls:,} calls)")


if __name__ == "__main__":
    main()
