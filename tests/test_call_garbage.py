"""A finished call leaves no reference cycles: its objects are freed as it ends, by reference
counting, not later by a garbage-collector pass that pauses the event loop and walks them all.

The real sidecar (`app.serve`: the front, the ledger writer, budgets) runs in a thread of the
test process so the test can see its garbage; calls go through the openai and anthropic SDKs:
whole and streamed answers, and calls a budget refuses.
"""
from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections import Counter
from pathlib import Path

import anthropic
import openai
import pytest

from sidecar import app, config
from tests.fakes import FakeProvider
from tests.sidecar_process import Sidecar

MESSAGES = [{"role": "user", "content": "Does this call leave garbage?"}]
OURS = ("sidecar.", "ledger.", "exporters.")


def test_calls_leave_no_cyclic_garbage(fake: FakeProvider, tmp_path: Path) -> None:
    cfg = config.parse({
        "upstreams": {"openai": {"base_url": fake.base_url}, "anthropic": {"base_url": fake.base_url}},
        "budgets": [{"name": "per-key", "per": "key", "window": "day", "limit_usd": 1000, "action": "block"},
                    {"name": "spent", "match": {"user": "blocked"}, "window": "day", "limit_usd": 0.000001,
                     "action": "block"}],
    })
    side = Sidecar(tmp_path, {})  # not started: its helpers read the in-process sidecar's endpoints
    cfg.port, cfg.ledger_path = side.port, str(side.db)
    base = side.url
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sidecar", daemon=True)
    thread.start()
    serving = asyncio.run_coroutine_threadsafe(app.serve(cfg), loop)
    try:
        side.wait_healthy()
        client = openai.OpenAI(api_key="sk-garbage", base_url=f"{base}/openai/v1", max_retries=0)
        refused = openai.OpenAI(api_key="sk-garbage", base_url=f"{base}/openai/v1", max_retries=0,
                                default_headers={"x-meterline-user": "blocked"})
        claude = anthropic.Anthropic(api_key="sk-ant-garbage", base_url=f"{base}/anthropic", max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # warms every path
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept for us to look at
        try:
            for _ in range(5):
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                        stream_options={"include_usage": True}):
                    pass
                with claude.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES) as stream:
                    stream.get_final_message()
                with pytest.raises(openai.APIStatusError):  # refused by the budget, before going upstream
                    refused.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert len(side.rows("true", 21)) == 21  # every call recorded, the refused ones too
            gc.collect()
            ours = Counter(type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith(OURS))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not ours, f"calls left reference cycles behind: {dict(ours)}"
    finally:
        loop.call_soon_threadsafe(serving.cancel)
        thread.join(0)
        deadline = time.monotonic() + 30
        while loop.is_running() and not serving.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the shutdown (ledger writer, telemetry) runs on as the task unwinds
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)

