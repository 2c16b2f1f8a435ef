"""Realistic model names (dated snapshots of aliases) and response ids for the fake providers."""

from __future__ import annotations

import secrets
import string

_ALNUM = string.ascii_letters + string.digits
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B64URL = _ALNUM + "-_"

# Alias -> the snapshot the provider reports in its response.
_DATED_MODELS = {
    # OpenAI
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "gpt-5.1": "gpt-5.1-2025-11-13",
    "gpt-5.2": "gpt-5.2-2025-12-11",
    "gpt-5.4-mini": "gpt-5.4-mini-2026-03-17",
    "gpt-5.4-nano": "gpt-5.4-nano-2026-03-17",
    "gpt-5.5": "gpt-5.5-2026-04-23",
    "o1": "o1-2024-12-17",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "gpt-4-turbo": "gpt-4-turbo-2024-04-09",
    # Anthropic
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}


def dated_model(model: str) -> str:
    """The model name a provider reports for a requested name (unknown names are echoed)."""
    return _DATED_MODELS.get(model, model)


def _pick(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def openai_chat_id() -> str:
    return "chatcmpl-" + _pick(_ALNUM, 29)


def openai_completion_id() -> str:
    return "cmpl-" + _pick(_ALNUM, 29)


def openai_response_id() -> str:
    return "resp_" + secrets.token_hex(25)


def openai_item_id(prefix: str) -> str:
    """Ids of Responses API output items: ``msg_...``, ``rs_...``."""
    return f"{prefix}_" + secrets.token_hex(25)


def openai_request_id() -> str:
    return "req_" + secrets.token_hex(16)


def system_fingerprint() -> str:
    return "fp_" + secrets.token_hex(5)


def obfuscation() -> str:
    """The random padding OpenAI adds to streamed deltas."""
    return _pick(_ALNUM, secrets.randbelow(12) + 4)


def anthropic_message_id() -> str:
    return "msg_01" + _pick(_BASE58, 22)


def anthropic_request_id() -> str:
    return "req_011C" + _pick(_BASE58, 20)


def gemini_response_id() -> str:
    return _pick(_B64URL, 22)
