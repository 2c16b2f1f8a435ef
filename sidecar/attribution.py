"""Who made a call: attribution headers, API-key fingerprints, and keys redacted from stored paths."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

TAGS_HEADER = "x-meterline-tags"
USER_HEADER = "x-meterline-user"
APP_HEADER = "x-meterline-app"
MAX_TAGS = 32
MAX_TAG_LEN = 128

# where each provider's SDK puts the API key
_KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")
_QUERY_KEY = re.compile(r"(?i)(^|&)(key|api_key|api-key)=[^&]*")


def parse_tags(value: str | None) -> dict[str, str]:
    """`team=search,feature=summarize` -> {"team": "search", "feature": "summarize"}; bad pieces are skipped."""
    tags: dict[str, str] = {}
    if not value:
        return tags
    for piece in value.split(","):
        key, sep, val = piece.partition("=")
        key, val = key.strip(), val.strip()
        if sep and key and len(key) <= MAX_TAG_LEN and len(val) <= MAX_TAG_LEN:
            tags[key] = val
            if len(tags) == MAX_TAGS:
                break
    return tags


def api_key(headers: Mapping[str, str], query: str) -> str | None:
    """The caller's API key as sent (header or Gemini's `?key=`); never stored, only fingerprinted."""
    for name in _KEY_HEADERS:
        value = headers.get(name)
        if value:
            scheme, _, token = value.partition(" ")
            return token if token and scheme.lower() == "bearer" else value
    if query:
        m = re.search(r"(?:^|&)key=([^&]+)", query)
        if m:
            return m.group(1)
    return None


def fingerprint(key: str | None, salt: bytes) -> str | None:
    """A short salted hash that tells keys apart without revealing them."""
    if not key:
        return None
    return "fp_" + hashlib.blake2b(key.encode(), key=salt, digest_size=6).hexdigest()


def redact_query(query: str) -> str:
    return _QUERY_KEY.sub(lambda m: f"{m.group(1)}{m.group(2)}=REDACTED", query) if query else query
