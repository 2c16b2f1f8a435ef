"""httpx2 clients for meterline's own outbound calls (alert webhooks, the CLI's calls to the sidecar), not forwarded calls.

The environment is trusted as httpx2 trusts it (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY,
SSL_CERT_FILE), with one exception: loopback never goes through a proxy. Containers and CI
runners often set HTTP_PROXY without a NO_PROXY for localhost, and a proxy cannot reach the
sidecar (or a webhook receiver) on this machine's loopback anyway; it would also see the admin token.
"""
from __future__ import annotations

import httpx2

# more specific than any proxy pattern from the environment, so these win; None: the direct transport
LOOPBACK_DIRECT: dict[str, None] = {
    "all://127.0.0.0/8": None,
    "all://[::1]": None,
    "all://localhost": None,
    "all://*.localhost": None,
}


def timeout(seconds: float) -> httpx2.Timeout:
    """The same bound on connecting, each read, each write and waiting for a pooled connection."""
    return httpx2.Timeout(seconds)


def client(timeout_s: float, **kw: object) -> httpx2.Client:
    return httpx2.Client(timeout=timeout(timeout_s), follow_redirects=False, mounts=LOOPBACK_DIRECT, **kw)


def async_client(timeout_s: float, **kw: object) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(timeout=timeout(timeout_s), follow_redirects=False, mounts=LOOPBACK_DIRECT, **kw)
