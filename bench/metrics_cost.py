"""What metrics cost: Telemetry.consume() of a 1,000-call batch (metrics only, then with the OTLP push's reader) and prometheus() at about 1,000 series.

Thread CPU time, best and median of 7 runs, with the garbage collector paused while timing (the
sidecar runs with a high threshold and its start-up objects frozen; a collection landing in a run
made single runs up to 70% slower). Run from the root of the tree to measure (it imports
`exporters` from the current directory), e.g. against an older commit unpacked elsewhere:

    .venv/bin/python bench/metrics_cost.py
    git archive <commit> exporters ledger tests/otlp_receiver.py | tar -x -C /tmp/old
    cd /tmp/old && /path/to/.venv/bin/python /path/to/bench/metrics_cost.py
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.getcwd())

from exporters import Telemetry  # noqa: E402
from tests.otlp_receiver import call  # noqa: E402

RUNS = 7


def cpu_ms(fn: Callable[[], object], number: int) -> tuple[float, float]:
    """Best and median thread CPU time of one call of `fn`, in ms."""
    runs = []
    for _ in range(RUNS):
        gc.collect()
        gc.disable()
        start = time.thread_time()
        for _ in range(number):
            fn()
        runs.append((time.thread_time() - start) / number * 1e3)
        gc.enable()
    runs.sort()
    return runs[0], runs[RUNS // 2]


def consume(config: dict, label: str) -> None:
    telemetry = Telemetry(config, {}, "checkout")
    batch = [call(i, request_model=f"model-{i % 10}") for i in range(1000)]  # 10 models: ~60 series
    telemetry.consume(batch)
    best, median = cpu_ms(lambda: telemetry.consume(batch), 5)
    print(f"{label}: consume(1,000 calls) {best:.1f} ms best, {median:.1f} ms median "
          f"({best:.0f}-{median:.0f} us a call)")
    telemetry.shutdown(0.1)


def render() -> None:
    # 166 request models x 6 series (2 token types, duration, time to first chunk, cost, requests)
    # + 1 overhead series = 997 series
    telemetry = Telemetry({}, {}, "checkout")
    telemetry.consume([call(i, request_model=f"model-{i % 166}") for i in range(1000)])
    body = telemetry.prometheus()[0]
    lines = body.count(b"\n")
    best, median = cpu_ms(telemetry.prometheus, 3)
    print(f"prometheus() at 997 series ({lines} lines, "
          f"{len(body) // 1024} KiB): {best:.1f} ms best, {median:.1f} ms median")


if __name__ == "__main__":
    logging.getLogger("meterline.telemetry").setLevel(logging.ERROR)  # the dead endpoint's last push
    consume({}, "metrics, Prometheus only")
    consume({"otlp_endpoint": "http://127.0.0.1:9", "traces": False, "metrics_export_interval_s": 3600},
            "metrics, Prometheus + OTLP push")
    render()
