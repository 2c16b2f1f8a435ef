"""A fake OpenAI chat-completions provider for the benchmarks: raw-asyncio HTTP/1.1 on uvloop, JSON and SSE.

It answers `POST .../chat/completions` as OpenAI does (a `model` and a `usage` block the sidecar
meters; SSE chunks with `"usage": null` and, when `stream_options.include_usage` is set, a last
chunk with `"choices": []` and the usage, then `data: [DONE]`). Every SSE chunk's content is
`t<ns>`, the CLOCK_MONOTONIC time at which the chunk was written, so a client on this machine
can tell each chunk's one-way delay through whatever sits in between. It also takes OTLP/HTTP
exports (`POST /v1/traces`, `/v1/metrics`) and drops them, so meterline runs with tracing on.
A path under `/fail/<status>/` (an upstream whose base_url ends in `/fail/503`) is a provider that
is down: every call there gets that status with OpenAI's error body, for the route fallback row.

    python bench/fake_upstream.py --port 9100 [--delay-ms 0] [--body-bytes 600]
                                  [--chunks 64] [--chunk-interval-ms 20]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson

MAX_HEADER_BYTES = 64 * 1024
REASONS = {400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


@dataclass(frozen=True, slots=True)
class Shape:
    """How the fake answers; set once from the command line."""

    delay_s: float = 0.0  # before the response (JSON) or its first chunk (SSE)
    body_bytes: int = 600  # length of the assistant's message in a JSON response
    chunks: int = 64  # content chunks in an SSE response
    chunk_interval_s: float = 0.020  # pause between two content chunks


_ids = itertools.count(1)


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """OpenAI's chat `usage`, with half of a long prompt served from the cache (in 128-token steps)."""
    cached = (prompt_tokens // 2) // 128 * 128
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def json_completion(model: str, prompt_tokens: int, shape: Shape) -> bytes:
    content = ("lorem ipsum dolor sit amet " * (shape.body_bytes // 27 + 1))[: shape.body_bytes]
    return orjson.dumps({
        "id": f"chatcmpl-bench{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None,
                                             "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage_block(prompt_tokens, max(1, shape.body_bytes // 4)),
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
    })


def sse_event(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def chunked(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of the transfer encoding."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Request:
    __slots__ = ("method", "path", "headers", "body")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body


class BadRequest(Exception):
    pass


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, path, _version = lines[0].split(" ", 2)
    except ValueError:
        raise BadRequest(lines[0][:80]) from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


def take_chunked(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decodes a chunked request body starting at `start`; None until it is complete."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # no trailers expected: the empty line
            return (bytes(out), end + 2) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        pos += size + 2


class FakeProvider(asyncio.Protocol):
    """One client connection; requests are answered in order (a slow answer holds the ones behind it)."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.drain()

    def drain(self) -> None:
        """Answers every complete request in the buffer, stopping at one that needs time."""
        while not self.busy and not self.closing:
            request = self.next_request()
            if request is None:
                return
            self.answer(request)

    def next_request(self) -> Request | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEADER_BYTES:
                self.fail(431)
            return None
        try:
            method, path, headers = parse_head(bytes(self.buf[:end]))
        except BadRequest:
            self.fail(400)
            return None
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            got = take_chunked(self.buf, start)
            if got is None:
                return None
            body, stop = got
        else:
            length = int(headers.get("content-length") or 0)
            if len(self.buf) < start + length:
                return None
            body, stop = bytes(self.buf[start:start + length]), start + length
        del self.buf[:stop]
        return Request(method, path, headers, body)

    def fail(self, status: int) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %d Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % status)
        self.transport.close()
        self.closing = True

    def send(self, status: int, content_type: str, body: bytes, keep_alive: bool) -> None:
        assert self.transport is not None
        reason = b"OK" if status < 300 else REASONS.get(status, "Error").encode()
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nx-request-id: req_bench\r\n%s\r\n"
                % (status, reason, content_type.encode(), len(body), b"" if keep_alive else b"connection: close\r\n"))
        self.transport.write(head + body)
        if not keep_alive:
            self.transport.close()
            self.closing = True

    def answer(self, request: Request) -> None:
        keep_alive = request.headers.get("connection", "").lower() != "close"
        if request.method == "GET" and request.path.startswith("/healthz"):
            self.send(200, "application/json", b'{"status":"ok"}', keep_alive)
            return
        if request.method == "POST" and request.path in ("/v1/traces", "/v1/metrics"):
            # an OTLP/HTTP collector that keeps nothing: an empty Export*ServiceResponse is a full success
            self.send(200, "application/x-protobuf", b"", keep_alive)
            return
        if request.path.startswith("/fail/"):
            self.send_failure(request.path, keep_alive)
            return
        if request.method != "POST" or not request.path.split("?")[0].endswith("/chat/completions"):
            self.send(404, "application/json", b'{"error":{"message":"not found","type":"invalid_request_error"}}',
                      keep_alive)
            return
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self.send(400, "application/json", b'{"error":{"message":"body must be JSON","type":"invalid_request_error"}}',
                      keep_alive)
            return
        model = body.get("model") if isinstance(body.get("model"), str) else "gpt-4o-mini"
        prompt_tokens = max(1, len(request.body) // 4)
        if body.get("stream") is True:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            self.later(self.stream(model, prompt_tokens, usage, keep_alive))
        elif self.shape.delay_s > 0:
            self.later(self.delayed_json(model, prompt_tokens, keep_alive))
        else:
            self.send(200, "application/json", json_completion(model, prompt_tokens, self.shape), keep_alive)

    def send_failure(self, path: str, keep_alive: bool) -> None:
        """A provider that is down: the status in `/fail/<status>/...`, with the error body OpenAI sends
        with a 503 (a `{"error": {...}}` object), read whole by the route before it falls back."""
        try:
            status = int(path.split("/", 3)[2])
        except ValueError:
            status = 503
        if not 400 <= status <= 599:
            status = 503
        self.send(status, "application/json",
                  b'{"error":{"message":"The server is overloaded or not ready yet.","type":"server_error",'
                  b'"param":null,"code":null}}', keep_alive)

    def later(self, work: Any) -> None:
        self.busy = True
        task = asyncio.get_running_loop().create_task(work)
        task.add_done_callback(self.resume)

    def resume(self, task: asyncio.Task[None]) -> None:
        self.busy = False
        if not task.cancelled() and task.exception() is not None and self.transport is not None:
            self.transport.abort()
            self.closing = True
        self.drain()

    async def delayed_json(self, model: str, prompt_tokens: int, keep_alive: bool) -> None:
        await asyncio.sleep(self.shape.delay_s)
        if not self.closing:
            self.send(200, "application/json", json_completion(model, prompt_tokens, self.shape), keep_alive)

    async def stream(self, model: str, prompt_tokens: int, include_usage: bool, keep_alive: bool) -> None:
        assert self.transport is not None
        shape = self.shape
        if shape.delay_s > 0:
            await asyncio.sleep(shape.delay_s)
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                             b"transfer-encoding: chunked\r\ncache-control: no-cache\r\nx-request-id: req_bench\r\n"
                             + (b"" if keep_alive else b"connection: close\r\n") + b"\r\n")
        base = {"id": f"chatcmpl-bench{next(_ids)}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "service_tier": "default", "system_fingerprint": "fp_bench"}
        null_usage = {"usage": None} if include_usage else {}
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(shape.chunks):
            if self.closing:
                return
            delta: dict[str, Any] = {"content": f"t{time.monotonic_ns()}"}
            if i == 0:
                delta = {"role": "assistant", **delta, "refusal": None}
            event = sse_event({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": None}], **null_usage})
            self.transport.write(chunked(event))
            if i + 1 < shape.chunks:
                # paced against the start, so the fake's own jitter does not accumulate
                await asyncio.sleep(max(0.0, start + (i + 1) * shape.chunk_interval_s - loop.time()))
        tail = [sse_event({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                           **null_usage})]
        if include_usage:
            tail.append(sse_event({**base, "choices": [], "usage": usage_block(prompt_tokens, shape.chunks)}))
        tail.append(b"data: [DONE]\n\n")
        self.transport.write(chunked(b"".join(tail)) + b"0\r\n\r\n")
        if not keep_alive:
            self.transport.close()
            self.closing = True


async def serve(host: str, port: int, shape: Shape) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeProvider(shape), host, port, reuse_address=True, backlog=4096)
    print(f"fake upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--body-bytes", type=int, default=600)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--chunk-interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    shape = Shape(args.delay_ms / 1000, args.body_bytes, args.chunks, args.chunk_interval_ms / 1000)
    import uvloop

    try:
        uvloop.run(serve(args.host, args.port, shape))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
