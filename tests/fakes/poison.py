"""A fake OpenAI chat-completions upstream whose usage counts the test chooses, up to absurd ones.

`x-poison-prompt-tokens` (any JSON number text, e.g. 18446744073709551615, a valid JSON integer
no ledger column holds) becomes `usage.prompt_tokens` of an otherwise ordinary non-streamed
`chat.completion`. Without the header the counts are small and ordinary. Runs in a thread.
"""
from __future__ import annotations

import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_IDS = itertools.count(1)
HEADER = "x-poison-prompt-tokens"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length") or 0))
        prompt = self.headers.get(HEADER) or "12"
        body = (
            '{"id":"chatcmpl-poison-%d","object":"chat.completion","created":1764547200,'
            '"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant",'
            '"content":"hi","refusal":null},"logprobs":null,"finish_reason":"stop"}],'
            '"usage":{"prompt_tokens":%s,"completion_tokens":3,"total_tokens":15},'
            '"service_tier":"default"}' % (next(_IDS), prompt)
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class PoisonUpstream:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> PoisonUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
