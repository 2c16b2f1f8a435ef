"""Per-request behaviour switches for the fake providers, read from ``x-fake-*`` request headers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

SCENARIO_HEADER = "x-fake-scenario"
CHUNKS_HEADER = "x-fake-chunks"
CHUNK_DELAY_HEADER = "x-fake-chunk-delay-ms"
RETRY_AFTER_HEADER = "x-fake-retry-after"

#: Every token accepted in ``x-fake-scenario`` besides ``errorNNN`` (any 3-digit HTTP status).
KNOWN_TOKENS = frozenset(
    {
        "cache",  # usage reports cache-read (and, for Anthropic, cache-creation) tokens
        "reasoning",  # usage reports reasoning / thinking tokens
        "malformed",  # 200 with invalid JSON; streams get one broken frame in the middle
        "reset",  # connection aborted (streams: after a few content chunks)
        "slow",  # content chunks paced by the chunk delay (non-streams wait chunks*delay)
        "gzip",  # non-stream JSON sent with Content-Encoding: gzip if the client accepts it
        "stream-error",  # streams: provider-shaped error event after a few content chunks
        "delta-output-only",  # Anthropic: message_delta.usage carries only output_tokens
        "stall",  # streams: the head goes out, then nothing (until the client leaves, at most 30 s)
        "tool-call",  # chat: the answer calls the request's first tool (tests/fakes/tools.py)
    }
)

_ERROR_TOKEN = re.compile(r"^error(\d{3})$")

DEFAULT_CHUNKS = 5
DEFAULT_CHUNK_DELAY_MS = 50
DEFAULT_RETRY_AFTER = "1"
MAX_CHUNKS = 10_000


class ScenarioError(ValueError):
    """Raised for an unknown scenario token or a bad ``x-fake-*`` header value."""


@dataclass(frozen=True)
class Scenario:
    """The parsed behaviour of one request."""

    tokens: frozenset[str] = frozenset()
    chunks: int = DEFAULT_CHUNKS
    chunk_delay: float = DEFAULT_CHUNK_DELAY_MS / 1000.0
    retry_after: str = DEFAULT_RETRY_AFTER

    def has(self, token: str) -> bool:
        return token in self.tokens

    @property
    def cache(self) -> bool:
        return "cache" in self.tokens

    @property
    def reasoning(self) -> bool:
        return "reasoning" in self.tokens

    @property
    def malformed(self) -> bool:
        return "malformed" in self.tokens

    @property
    def reset(self) -> bool:
        return "reset" in self.tokens

    @property
    def slow(self) -> bool:
        return "slow" in self.tokens

    @property
    def gzip(self) -> bool:
        return "gzip" in self.tokens

    @property
    def stream_error(self) -> bool:
        return "stream-error" in self.tokens

    @property
    def error_status(self) -> Optional[int]:
        """The HTTP status of an ``errorNNN`` token, if any."""
        for token in self.tokens:
            match = _ERROR_TOKEN.match(token)
            if match:
                return int(match.group(1))
        return None

    @property
    def disruption_index(self) -> int:
        """How many content chunks go out intact before reset / malformed / stream-error strikes.

        The disruption happens just before content chunk number ``chunks // 2`` (0-based), so
        with the default 5 chunks, 2 intact content chunks reach the client first.
        """
        return self.chunks // 2


def parse_tokens(text: str) -> frozenset[str]:
    """Split a comma-separated scenario string, rejecting unknown tokens."""
    tokens = frozenset(t.strip().lower() for t in text.split(",") if t.strip())
    unknown = sorted(t for t in tokens if t not in KNOWN_TOKENS and not _ERROR_TOKEN.match(t))
    if unknown:
        raise ScenarioError(f"unknown {SCENARIO_HEADER} token(s): {', '.join(unknown)}")
    return tokens


def parse_scenario(
    headers: Mapping[str, str],
    *,
    default_scenario: str = "",
    default_chunks: int = DEFAULT_CHUNKS,
    default_chunk_delay_ms: float = DEFAULT_CHUNK_DELAY_MS,
    default_retry_after: str = DEFAULT_RETRY_AFTER,
) -> Scenario:
    """Build the scenario of a request from its (lower-cased) headers and the server defaults.

    The ``x-fake-scenario`` header, when present, replaces ``default_scenario``.
    """
    raw = headers.get(SCENARIO_HEADER)
    tokens = parse_tokens(default_scenario if raw is None else raw)
    try:
        chunks = int(headers.get(CHUNKS_HEADER, default_chunks))
        delay_ms = float(headers.get(CHUNK_DELAY_HEADER, default_chunk_delay_ms))
    except ValueError as exc:
        raise ScenarioError(f"bad {CHUNKS_HEADER} / {CHUNK_DELAY_HEADER} header: {exc}") from None
    if not 1 <= chunks <= MAX_CHUNKS:
        raise ScenarioError(f"{CHUNKS_HEADER} must be between 1 and {MAX_CHUNKS}")
    if delay_ms < 0:
        raise ScenarioError(f"{CHUNK_DELAY_HEADER} must not be negative")
    retry_after = headers.get(RETRY_AFTER_HEADER, default_retry_after)
    return Scenario(tokens=tokens, chunks=chunks, chunk_delay=delay_ms / 1000.0, retry_after=retry_after)
