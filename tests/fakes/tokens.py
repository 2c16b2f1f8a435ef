"""Deterministic token arithmetic and reply text shared by all fake providers.

Every number the fakes report comes from :func:`counts_for`:

* ``fresh`` = ceil(len(raw request body bytes) / 4), at least 1 (input tokens not served from cache)
* ``cache_read`` = 1024 with the ``cache`` scenario, else 0
* ``cache_write_5m`` = 256 and ``cache_write_1h`` = 128 with ``cache`` (Anthropic only), else 0
* ``output`` = 4 * chunks (visible output text; the reply text is ``chunks`` parts of ~4 tokens)
* ``reasoning`` = 32 * chunks with the ``reasoning`` scenario, else 0

Each provider then reports them in its own convention (see the provider modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .scenarios import Scenario

CACHE_READ_TOKENS = 1024
CACHE_WRITE_5M_TOKENS = 256
CACHE_WRITE_1H_TOKENS = 128
OUTPUT_TOKENS_PER_CHUNK = 4
REASONING_TOKENS_PER_CHUNK = 32


@dataclass(frozen=True)
class Counts:
    """Provider-neutral token counts of one request."""

    fresh: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    output: int
    reasoning: int

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h


def text_tokens(data: bytes | str) -> int:
    """Approximate tokens of a text or payload: one per 4 bytes, at least 1."""
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    return max(1, math.ceil(size / 4))


def counts_for(body: bytes, scenario: Scenario) -> Counts:
    """The token counts of a request with this raw body under this scenario."""
    cache = scenario.cache
    return Counts(
        fresh=text_tokens(body),
        cache_read=CACHE_READ_TOKENS if cache else 0,
        cache_write_5m=CACHE_WRITE_5M_TOKENS if cache else 0,
        cache_write_1h=CACHE_WRITE_1H_TOKENS if cache else 0,
        output=OUTPUT_TOKENS_PER_CHUNK * scenario.chunks,
        reasoning=REASONING_TOKENS_PER_CHUNK * scenario.chunks if scenario.reasoning else 0,
    )


def reply_parts(chunks: int) -> list[str]:
    """The reply text, split the way streams send it: ``chunks`` parts."""
    return [f"This is part {i}. " for i in range(1, chunks + 1)]


def reply_text(chunks: int) -> str:
    return "".join(reply_parts(chunks))
