"""Connection URLs without their secrets: what may appear in a log line, an error, healthz or the ledger."""
from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

HIDDEN = "***"


def redact(url: str | None) -> str | None:
    """`url` with its password (and any `password=` query value) replaced by ***: safe to show."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}:{HIDDEN}@{host}" if sep else f"{user}@{host}"
        query = "&".join(f"{k}={HIDDEN}" if k.lower() == "password" else f"{k}{eq}{v}"
                         for k, eq, v in (item.partition("=") for item in parts.query.split("&") if item))
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return HIDDEN  # not a URL we can take apart: show none of it


def secrets_of(url: str | None) -> list[str]:
    """The secret parts of `url` (its password, raw and decoded), for `scrub`."""
    if not url:
        return []
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        for item in parts.query.split("&"):
            key, _, value = item.partition("=")
            if key.lower() == "password" and value:
                found += [value, unquote(value)]
    except ValueError:
        found.append(url)
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, url: str | None) -> str:
    """`text` (e.g. a driver's error message) with every secret of `url` in it replaced by ***,
    and the URL itself by its redacted form."""
    if url:
        text = text.replace(url, redact(url) or "")
    for secret in secrets_of(url):
        text = text.replace(secret, HIDDEN)
    return text
