"""A small fake model provider for `meterline demo`: OpenAI, Anthropic and Gemini wire formats, JSON and SSE.

Token counts follow the request (about 4 characters a token) and each provider's own usage
conventions: prompt caching when a prompt prefix was seen before (OpenAI and Gemini implicitly,
Anthropic where the request marks `cache_control`), reasoning tokens for reasoning models, and
now and then a provider-shaped error. Not a test double: just enough for realistic demo data.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any

import orjson
from aiohttp import web

REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")
_WORDS = ("the meter reads every call and the ledger keeps each token so the team can see what "
          "it spends where and why caching helps").split()


class DemoProvider:
    """`await DemoProvider().start()`; its `base_url` serves /v1/chat/completions, /v1/embeddings,
    /v1/messages and /v1beta/models/{model}:generateContent / :streamGenerateContent."""

    def __init__(self, seed: int | None = None, error_rate: float = 0.02, speed: float = 1.0) -> None:
        self.rng = random.Random(seed)
        self.error_rate = error_rate
        self.speed = speed  # 1.0: latencies of a busy real API; smaller is faster
        self.seen_prefixes: set[str] = set()
        self.calls = 0
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> DemoProvider:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_post("/v1/embeddings", self.openai_embeddings)
        app.router.add_post("/v1/messages", self.anthropic_messages)
        app.router.add_post("/v1beta/models/{model}:{method}", self.gemini)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.base_url = f"http://{host}:{bound[1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- shared ----------------------------------------------------------------------------------

    def _tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def _cached(self, model: str, prefix: str, quantum: int) -> int:
        """Tokens of `prefix` served from cache: all of it (rounded down to `quantum`) once seen before."""
        key = hashlib.sha1(f"{model}\0{prefix}".encode()).hexdigest()
        if key in self.seen_prefixes:
            return self._tokens(prefix) // quantum * quantum
        self.seen_prefixes.add(key)
        return 0

    def _output(self, max_tokens: Any, reasoning: bool) -> tuple[int, int]:
        limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 4096
        text = min(limit, int(self.rng.lognormvariate(5.3, 0.6)))  # a few hundred, sometimes more
        thought = min(limit - text, int(self.rng.lognormvariate(6.2, 0.7))) if reasoning else 0
        return max(1, text), max(0, thought)

    async def _think(self, model: str, reasoning: bool) -> None:
        base = 0.35 if "mini" in model or "flash" in model or "haiku" in model else 0.7
        await asyncio.sleep(self.speed * self.rng.uniform(0.5, 1.5) * (base + (0.6 if reasoning else 0)))

    def _fail(self) -> int | None:
        if self.rng.random() >= self.error_rate:
            return None
        return self.rng.choice((429, 500, 503))

    def _text(self, n: int) -> list[str]:
        words = [self.rng.choice(_WORDS) for _ in range(min(n, 60))]
        size = max(1, len(words) // self.rng.randint(6, 10))
        return [" ".join(words[i:i + size]) + " " for i in range(0, len(words), size)]

    async def _sse(self, request: web.Request, events: list[bytes],
                   content_type: str = "text/event-stream") -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, event in enumerate(events):
            if i:
                await asyncio.sleep(self.speed * self.rng.uniform(0.015, 0.05))
            await resp.write(event)
        await resp.write_eof()
        return resp

    @staticmethod
    def _event(doc: Any, name: str | None = None) -> bytes:
        return (f"event: {name}\n" if name else "").encode() + b"data: " + orjson.dumps(doc) + b"\n\n"

    # --- OpenAI ----------------------------------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        model = body.get("model", "gpt-4o-mini")
        messages = body.get("messages") or []
        prefix = str(messages[0].get("content", "")) if messages else ""
        prompt = self._tokens("".join(str(m.get("content", "")) for m in messages))
        reasoning = model.startswith(REASONING_MODELS)
        cached = self._cached(model, prefix, 128) if prompt >= 1024 else 0
        await self._think(model, reasoning)
        self.calls += 1
        if (status := self._fail()) is not None:
            kind = {429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}[status]
            return web.json_response({"error": {"message": "The demo upstream is having a moment.", "type": kind,
                                                "param": None, "code": kind}}, status=status)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        text, thought = self._output(limit, reasoning)
        usage = {"prompt_tokens": prompt, "completion_tokens": text + thought, "total_tokens": prompt + text + thought,
                 "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": thought, "audio_tokens": 0}}
        cid, created, served = f"chatcmpl-{self.rng.getrandbits(64):016x}", int(time.time()), _dated(model)
        finish = "length" if isinstance(limit, int) and text + thought >= limit else "stop"
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self._text(text))},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage, "system_fingerprint": "fp_demo"})
        with_usage = (body.get("stream_options") or {}).get("include_usage") is True
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served,
                "system_fingerprint": "fp_demo"}
        extra = {"usage": None} if with_usage else {}
        events = [self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None}], **extra})]
        events += [self._event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                                **extra}) for piece in self._text(text)]
        events.append(self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}], **extra}))
        if with_usage:
            events.append(self._event({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await self._sse(request, events)

    async def openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        items = body.get("input")
        items = items if isinstance(items, list) else [items]
        prompt = sum(self._tokens(str(i)) for i in items)
        await asyncio.sleep(self.speed * self.rng.uniform(0.05, 0.15))
        self.calls += 1
        return web.json_response({
            "object": "list", "model": body.get("model", "text-embedding-3-small"),
            "data": [{"object": "embedding", "index": i, "embedding": [0.01, -0.02, 0.03]} for i in range(len(items))],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})

    # --- Anthropic -------------------------------------------------------------------------------

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        model = body.get("model", "claude-haiku-4-5")
        system = body.get("system") or ""
        blocks = system if isinstance(system, list) else [{"type": "text", "text": system}]
        system_text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict))
        marked = any(isinstance(b, dict) and b.get("cache_control") for b in blocks)
        rest = self._tokens("".join(str(m.get("content", "")) for m in body.get("messages") or []))
        prefix_tokens = self._tokens(system_text) if system_text else 0
        read = write = 0
        if marked and prefix_tokens >= 1024:
            read = self._cached(model, system_text, 1)
            write = 0 if read else prefix_tokens
        uncached = prefix_tokens + rest - read - write
        reasoning = (body.get("thinking") or {}).get("type") == "enabled"
        await self._think(model, reasoning)
        self.calls += 1
        if (status := self._fail()) is not None:
            status = 529 if status == 503 else status
            kind = {429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}[status]
            return web.json_response({"type": "error", "error": {"type": kind, "message": "Demo upstream hiccup."}},
                                     status=status)
        text, thought = self._output(body.get("max_tokens"), reasoning)
        mid, served = f"msg_{self.rng.getrandbits(80):020x}", model
        usage = {"input_tokens": uncached, "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
                 "output_tokens": text + thought, "service_tier": "standard"}
        stop = "max_tokens" if text + thought >= body.get("max_tokens", 1 << 30) else "end_turn"
        if not body.get("stream"):
            return web.json_response({
                "id": mid, "type": "message", "role": "assistant", "model": served,
                "content": [{"type": "text", "text": "".join(self._text(text))}],
                "stop_reason": stop, "stop_sequence": None, "usage": usage})
        start_usage = {**usage, "output_tokens": 1}
        events = [
            self._event({"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": served, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}}, "message_start"),
            self._event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                        "content_block_start"),
        ]
        events += [self._event({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
                   for piece in self._text(text)]
        events += [
            self._event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            self._event({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                         "usage": {"output_tokens": text + thought}}, "message_delta"),
            self._event({"type": "message_stop"}, "message_stop"),
        ]
        return await self._sse(request, events)

    # --- Gemini ----------------------------------------------------------------------------------

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        model, method = request.match_info["model"], request.match_info["method"]
        if method not in ("generateContent", "streamGenerateContent"):
            raise web.HTTPNotFound()
        body = orjson.loads(await request.read())
        system = "".join(p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts") or [])
        contents = "".join(p.get("text", "") for c in body.get("contents") or [] for p in c.get("parts") or [])
        prompt = self._tokens(system + contents)
        cached = self._cached(model, system, 1) if self._tokens(system) >= 1024 else 0
        config = body.get("generationConfig") or {}
        budget = (config.get("thinkingConfig") or {}).get("thinkingBudget")
        reasoning = "2.5" in model and budget != 0
        await self._think(model, reasoning)
        self.calls += 1
        if (status := self._fail()) is not None:
            name = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}[status]
            return web.json_response({"error": {"code": status, "message": "Demo upstream hiccup.", "status": name}},
                                     status=status)
        text, thought = self._output(config.get("maxOutputTokens"), reasoning)
        meta = {"promptTokenCount": prompt, "candidatesTokenCount": text, "totalTokenCount": prompt + text + thought}
        if thought:
            meta["thoughtsTokenCount"] = thought
        if cached:
            meta["cachedContentTokenCount"] = cached
        rid = f"{self.rng.getrandbits(96):024x}"
        pieces = self._text(text)

        def chunk(piece: str, last: bool) -> dict[str, Any]:
            cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0}
            if last:
                cand["finishReason"] = "STOP"
            return {"candidates": [cand], "usageMetadata": meta if last else {"promptTokenCount": prompt},
                    "modelVersion": model, "responseId": rid}

        if method == "generateContent":
            return web.json_response(chunk("".join(pieces), True))
        if request.query.get("alt") == "sse":
            return await self._sse(request, [self._event(chunk(p, i == len(pieces) - 1)) for i, p in enumerate(pieces)])
        # without alt=sse Gemini streams one JSON array, element by element
        parts = [orjson.dumps(chunk(p, i == len(pieces) - 1)) for i, p in enumerate(pieces)]
        return await self._sse(request, [b"[" + parts[0]] + [b",\r\n" + p for p in parts[1:]] + [b"]"],
                               "application/json; charset=UTF-8")


def _dated(model: str) -> str:
    """OpenAI answers with a dated snapshot of the model asked for."""
    return {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4.1": "gpt-4.1-2025-04-14",
            "o4-mini": "o4-mini-2025-04-16", "gpt-5-mini": "gpt-5-mini-2025-08-07"}.get(model, model)
