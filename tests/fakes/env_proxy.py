"""A forward HTTP proxy that only records what it is asked for and answers 502: a stand-in for the
HTTP_PROXY a container or CI runner sets, to show which calls it captures.

    proxy = RecordingProxy().start()
    env = proxy.env()          # HTTP_PROXY, HTTPS_PROXY, ALL_PROXY (and lower case) at it; NO_PROXY empty
    ...
    proxy.requests             # request targets it saw, e.g. "http://example.com:8720/_meterline/healthz"
    proxy.close()
"""
from __future__ import annotations

import http.server
import threading
from typing import Any

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


class RecordingProxy:
    def __init__(self) -> None:
        self.requests: list[str] = []
        seen = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                seen.append(self.path if self.command != "CONNECT" else f"CONNECT {self.path}")
                body = b"proxy says no"
                self.send_response(502)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_CONNECT = _answer  # noqa: N815 - the stdlib's names

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> RecordingProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def env(self) -> dict[str, str]:
        """Every proxy variable (both cases, as urllib and httpx2 read either) at this proxy, and no exceptions."""
        out = {}
        for name in PROXY_VARS:
            out[name] = out[name.lower()] = self.url
        out["NO_PROXY"] = out["no_proxy"] = ""
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
