"""A stand-in OpenAI-compatible upstream for the compose demo, so it runs without an API key.

It is the fake provider `meterline demo` uses (sidecar/demo_provider.py): realistic token usage
(caching, reasoning models), latencies of a busy real API, and now and then a provider-shaped
error. Runs from the meterline image, which has the sidecar's code. Not for production.
"""
from __future__ import annotations

import asyncio
import os
import signal

from sidecar.demo_provider import DemoProvider


async def main() -> None:
    host = os.environ.get("FAKE_LLM_HOST", "0.0.0.0")
    port = int(os.environ.get("FAKE_LLM_PORT", "9000"))
    provider = DemoProvider(error_rate=float(os.environ.get("FAKE_LLM_ERROR_RATE", "0.03")),
                            speed=float(os.environ.get("FAKE_LLM_SPEED", "1.0")))  # smaller is faster
    await provider.start(host, port)
    print(f"fake-llm: OpenAI/Anthropic/Gemini wire formats on {provider.base_url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # PID 1 in a container: SIGTERM needs a handler
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await provider.stop()


if __name__ == "__main__":
    asyncio.run(main())
