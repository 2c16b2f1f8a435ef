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
# query parameters that carry a credential in the usual spellings (Gemini's `key`, Azure's `api-key`,
# OAuth's `access_token`, signed URLs' `sig`/`signature`/`X-Amz-Signature`): never stored
_SECRET_NAMES = (r"key|api[_-]?key|x-goog-api-key|access[_-]?token|token|id[_-]?token|refresh[_-]?token|auth|"
                 r"authorization|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
                 r"client[_-]?secret|secret|password|passwd|pwd|session[_-]?token|code")
_QUERY_KEY = re.compile(rf"(?i)(^|&)({_SECRET_NAMES})=[^&]*")
# those that are the caller's API key itself (fingerprinted when no header carries one)
_QUERY_API_KEY = re.compile(r"(?i)(?:^|&)(?:key|api[_-]?key|x-goog-api-key|access[_-]?token|token)=([^&]+)")


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
        m = _QUERY_API_KEY.search(query)
        if m:
            return m.group(1)
    return None


def fingerprint(key: str | None, salt: bytes) -> str | None:
    """A short salted hash that tells keys apart without revealing them."""
    if not key:
        return None
    # surrogateescape: a key of non-UTF-8 bytes (as the front decodes them) still hashes as its bytes
    return "fp_" + hashlib.blake2b(key.encode("utf-8", "surrogateescape"), key=salt, digest_size=6).hexdigest()


def text(value: str | None) -> str | None:
    """A metadata header's value as text that can be stored. The servers decode header bytes as
    UTF-8 with surrogateescape; bytes that are not UTF-8 (a latin-1 `café`) are read as latin-1
    instead of failing the call at the journal."""
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("latin-1")
    return value


def redact_query(query: str) -> str:
    return _QUERY_KEY.sub(lambda m: f"{m.group(1)}{m.group(2)}=REDACTED", query) if query else query
