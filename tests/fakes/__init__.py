"""Fake OpenAI / Anthropic / Gemini HTTP APIs for meterline's tests (see server.FakeProvider).

    fake = FakeProvider().start_in_thread()          # or: async with FakeProvider() as fake
    client = openai.OpenAI(api_key="k", base_url=fake.openai_base_url, max_retries=0)
    client.chat.completions.create(..., extra_headers={"x-fake-scenario": "cache,reasoning"})
    fake.exchanges[-1].usage                          # what the fake reported, provider convention
    fake.stop_thread()

Scenario tokens (header ``x-fake-scenario``): see ``scenarios.KNOWN_TOKENS`` plus ``errorNNN``.
Token formulas: see ``tokens.py``. Subprocess use: ``python -m tests.fakes --port N`` and
``fetch_exchanges(base_url)``.
"""

from .records import Exchange
from .scenarios import (
    CHUNK_DELAY_HEADER,
    CHUNKS_HEADER,
    KNOWN_TOKENS,
    RETRY_AFTER_HEADER,
    SCENARIO_HEADER,
    Scenario,
)
from .server import FakeProvider, clear_exchanges, fetch_exchanges
from .tokens import Counts, counts_for, reply_text

__all__ = [
    "CHUNK_DELAY_HEADER",
    "CHUNKS_HEADER",
    "KNOWN_TOKENS",
    "RETRY_AFTER_HEADER",
    "SCENARIO_HEADER",
    "Counts",
    "Exchange",
    "FakeProvider",
    "Scenario",
    "clear_exchanges",
    "counts_for",
    "fetch_exchanges",
    "reply_text",
]
