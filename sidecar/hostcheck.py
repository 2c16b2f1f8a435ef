"""Which `Host` values the sidecar answers: loopback names and the configured ones, so a DNS-rebinding page cannot reach it.

A web page that gets its own domain to resolve to 127.0.0.1 can send requests to the sidecar from
the user's browser; the one thing it cannot choose is the Host header, which carries its domain.
Every route (proxied calls, the dashboard, the admin API) answers 421 to any other Host.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})


def allowed_hosts(listen_host: str, configured: Iterable[str] = ()) -> frozenset[str]:
    """Host names (lower case, without port) besides loopback ones: the listen address when it is
    a specific one, and the config's `allowed_hosts`. `*` in the config allows any Host."""
    names = {h.strip().lower().strip("[]") for h in configured if h and h.strip()}
    host = listen_host.strip().lower().strip("[]")
    if host and host not in ("0.0.0.0", "::"):
        names.add(host)
    return frozenset(names)


def host_name(value: str) -> str:
    """The name part of a Host header value: `[::1]:8720` -> `::1`, `Example.com:80` -> `example.com`."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name
    return value


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_ok(value: str | bytes | None, allowed: frozenset[str]) -> bool:
    """Whether a request with this Host header is served. No Host at all (HTTP/1.0 clients, raw
    sockets) is served: browsers always send one."""
    if value is None:
        return True
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if "*" in allowed:
        return True
    name = host_name(value)
    return is_loopback_name(name) or name in allowed
