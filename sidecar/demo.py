"""`meterline demo`: the sidecar with a built-in fake provider and a minute of varied traffic; no API key needed."""
from __future__ import annotations

import asyncio
import logging
import random
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from . import config as config_mod
from . import dashboard
from .demo_provider import DemoProvider

DEFAULT_DB = "meterline-demo.duckdb"
ALERT_RULE = "docs-team-daily"  # gets close to its limit: alerts fire at 50% and 80%
BLOCK_RULE = "playground-intern"  # an intern's playground that runs out of money: calls are refused
BLOCKED_USER = "intern-7"
DASHBOARD_VIEW = "#range=300&by=app"  # the last 5 minutes, spend by app
CLOSE_ENOUGH = 0.85  # the demo stops sending docs-team traffic once its budget is this far used

QUERIES = (
    "SELECT value AS team, calls, cost_usd FROM spend_by_tag WHERE tag = 'team' ORDER BY cost_usd DESC",
    "SELECT model, calls, cost_usd, cache_read_tokens, reasoning_tokens FROM spend_by_model ORDER BY cost_usd DESC",
    "SELECT outcome, count(*) AS calls, sum(cost_usd) AS cost_usd FROM calls GROUP BY ALL ORDER BY calls DESC",
)

log = logging.getLogger("meterline.demo")


def demo_config(upstream_url: str, duration_s: float) -> dict[str, Any]:
    """The demo's own config: every upstream is the fake, and four budget rules to watch."""
    # about a third of a cent a second goes to the docs team: its daily limit is set so the demo
    # reaches it about halfway through, whatever the duration
    docs_limit = max(Decimal("0.02"), (Decimal("0.0035") * Decimal(str(duration_s)) * Decimal("0.5"))
                     .quantize(Decimal("0.01")))
    return {
        "upstreams": {name: {"base_url": upstream_url} for name in ("openai", "anthropic", "gemini")},
        "budgets": [
            {"name": "org-monthly", "window": "month", "limit_usd": 25, "action": "alert"},
            {"name": ALERT_RULE, "match": {"tags": {"team": "docs"}}, "window": "day",
             "limit_usd": float(docs_limit), "action": "alert", "thresholds": [0.5, 0.8]},
            {"name": "search-rate", "match": {"app": "search"}, "window": "minute", "limit_requests": 300,
             "action": "block"},
            {"name": BLOCK_RULE, "match": {"user": BLOCKED_USER}, "window": "day", "limit_usd": 0.3,
             "action": "block"},
        ],
    }


# --- the traffic ---------------------------------------------------------------------------------

_LOREM = ("You are a careful assistant for an online store. Answer from the policy and catalogue below, "
          "cite the section you used, and never invent prices or delivery dates. ").split()


def _text(seed: str, chars: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < chars:
        w = rng.choice(_LOREM)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


@dataclass
class Call:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    stream: bool


@dataclass
class Persona:
    app: str
    weight: float
    make: Callable[[random.Random], Call]
    paused: bool = False
    frugal: bool = False  # cheaper models only: its budget is getting close


def _headers(app: str, user: str, tags: dict[str, str], auth: dict[str, str]) -> dict[str, str]:
    return {"content-type": "application/json", "x-meterline-app": app, "x-meterline-user": user,
            "x-meterline-tags": ",".join(f"{k}={v}" for k, v in tags.items()), **auth}


def _openai(app: str, key: str, model: str, user: str, tags: dict[str, str], system: str, question: str,
            stream: bool, **extra: Any) -> Call:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "system", "content": system},
                                                         {"role": "user", "content": question}], **extra}
    if stream:
        body["stream"] = True  # no stream_options: the sidecar asks for usage itself
    return Call("/openai/v1/chat/completions", body, _headers(app, user, tags, {"authorization": f"Bearer {key}"}),
                stream)


def _anthropic(app: str, model: str, user: str, tags: dict[str, str], system: str, question: str, stream: bool,
               max_tokens: int, thinking: bool = False, cache: bool = True) -> Call:
    block: dict[str, Any] = {"type": "text", "text": system}
    if cache:
        block["cache_control"] = {"type": "ephemeral"}
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "system": [block],
                            "messages": [{"role": "user", "content": question}], "stream": stream}
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": max_tokens // 2}
    auth = {"x-api-key": f"sk-ant-demo-{app}", "anthropic-version": "2023-06-01"}
    return Call("/anthropic/v1/messages", body, _headers(app, user, tags, auth), stream)


def _gemini(app: str, model: str, user: str, tags: dict[str, str], system: str, question: str, stream: bool,
            thinking: bool) -> Call:
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    body = {"systemInstruction": {"parts": [{"text": system}]},
            "contents": [{"role": "user", "parts": [{"text": question}]}],
            "generationConfig": {"maxOutputTokens": 2048, "temperature": 0.3,
                                 "thinkingConfig": {"thinkingBudget": 1024 if thinking else 0}}}
    return Call(f"/gemini/v1beta/models/{model}:{method}", body,
                _headers(app, user, tags, {"x-goog-api-key": f"demo-gemini-{app}"}), stream)


def _user(rng: random.Random, n: int = 24) -> str:
    # a few heavy users and a long tail
    return f"u-{1001 + rng.choices(range(n), weights=[1 / (i + 1) ** 0.8 for i in range(n)])[0]:04d}"


def _question(rng: random.Random) -> str:
    return _text(str(rng.random()), int(rng.lognormvariate(6.5, 0.8)))


SUPPORT_SYSTEM = _text("support", 9000)
TRIAGE_SYSTEM = _text("triage", 2500)
SEARCH_SYSTEM = _text("search", 6000)
DOCS_SYSTEM = _text("docs", 12000)
DATA_SYSTEM = _text("data", 5000)
PLAYGROUND_SYSTEM = _text("playground", 4500)


def personas() -> list[Persona]:
    def support(rng: random.Random) -> Call:
        model = "claude-haiku-4-5" if rng.random() < 0.7 else "claude-sonnet-4-5"
        if rng.random() < 0.25:  # triage: a short prompt of its own, not cached
            return _anthropic("support-bot", model, _user(rng), {"team": "support", "feature": "triage"},
                              TRIAGE_SYSTEM, _question(rng), False, 256, cache=False)
        return _anthropic("support-bot", model, _user(rng), {"team": "support", "feature": "chat"},
                          SUPPORT_SYSTEM, _question(rng), rng.random() < 0.85, 1024)

    def search(rng: random.Random) -> Call:
        tags = {"team": "search"}
        r = rng.random()
        if r < 0.3:
            text = [_question(rng)[:400] for _ in range(rng.randint(1, 8))]
            return Call("/openai/v1/embeddings", {"model": "text-embedding-3-small", "input": text},
                        _headers("search", _user(rng), {**tags, "feature": "embed"},
                                 {"authorization": "Bearer sk-demo-search"}), False)
        if r < 0.8:
            return _openai("search", "sk-demo-search", "gpt-4o-mini", _user(rng), {**tags, "feature": "rerank"},
                           SEARCH_SYSTEM, _question(rng), rng.random() < 0.5, max_tokens=512)
        return _openai("search", "sk-demo-search", "gpt-5-mini", _user(rng), {**tags, "feature": "answer"},
                       SEARCH_SYSTEM, _question(rng), True, max_completion_tokens=4096)

    def docs(rng: random.Random) -> Call:
        pro = rng.random() < 0.15 and not docs_persona.frugal
        return _gemini("docs-summarizer", "gemini-2.5-pro" if pro else "gemini-2.5-flash", _user(rng, 8),
                       {"team": "docs", "feature": "summarize"}, DOCS_SYSTEM, _question(rng) * 3,
                       rng.random() < 0.5, thinking=pro or rng.random() < 0.3)

    def data(rng: random.Random) -> Call:
        model = "o4-mini" if rng.random() < 0.6 else "gpt-4.1"
        return _openai("analytics", "sk-demo-analytics", model, _user(rng, 6), {"team": "data", "feature": "sql-gen"},
                       DATA_SYSTEM, _question(rng), rng.random() < 0.3, max_completion_tokens=2048)

    docs_persona = Persona("docs-summarizer", 2.5, docs)
    return [Persona("support-bot", 4, support), Persona("search", 5, search), docs_persona,
            Persona("analytics", 1.5, data)]


def playground(rng: random.Random) -> Call:
    return _anthropic("playground", "claude-opus-4-1", BLOCKED_USER, {"team": "research", "feature": "playground"},
                      PLAYGROUND_SYSTEM, _question(rng), rng.random() < 0.5, 2048, thinking=True, cache=False)


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    blocked: int = 0
    errors: int = 0
    by_app: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.sent} calls: {self.ok} ok, {self.blocked} blocked by a budget, "
                f"{self.errors} upstream errors")


class Driver:
    """Sends the demo's traffic through the sidecar with plain aiohttp, in each SDK's wire format."""

    def __init__(self, base_url: str, duration_s: float, seed: int | None, workers: int = 4) -> None:
        self.base_url = base_url
        self.duration_s = duration_s
        self.rng = random.Random(seed)
        self.workers = workers
        self.personas = personas()
        self.stats = Stats()

    async def run(self, progress: Callable[[float, Stats], None] | None = None) -> Stats:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.session = session
            self.deadline = time.monotonic() + self.duration_s
            tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
            tasks.append(asyncio.create_task(self._intern()))
            tasks.append(asyncio.create_task(self._watch_budget()))
            start = time.monotonic()
            try:
                while time.monotonic() < self.deadline:
                    await asyncio.sleep(min(10.0, max(0.0, self.deadline - time.monotonic())))
                    if progress and time.monotonic() < self.deadline - 1:
                        progress(time.monotonic() - start, self.stats)
                await asyncio.gather(*tasks[:-1])
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.stats

    async def _worker(self, n: int) -> None:
        rng = random.Random(self.rng.random())
        await asyncio.sleep(n * 0.15)
        while time.monotonic() < self.deadline:
            live = [p for p in self.personas if not p.paused]
            persona = rng.choices(live, weights=[p.weight for p in live])[0]
            await self._send(persona.make(rng))
            await asyncio.sleep(rng.uniform(0.1, 0.6))

    async def _intern(self) -> None:
        rng = random.Random(self.rng.random())
        while time.monotonic() < self.deadline:
            status = await self._send(playground(rng))
            # an app that backs off when its budget says no, and tries again later
            await asyncio.sleep(rng.uniform(3, 5) if status == 429 else rng.uniform(0.4, 0.9))

    async def _watch_budget(self) -> None:
        docs = next(p for p in self.personas if p.app == "docs-summarizer")
        while True:
            try:
                async with self.session.get(f"{self.base_url}/_meterline/budgets") as resp:
                    rows = (await resp.json())["budgets"]
                rule = next(r for r in rows if r["rule"] == ALERT_RULE)
                limit = Decimal(rule["limit_usd"])
                committed = (Decimal(rule["spent_usd"]) + Decimal(rule["reserved_usd"])) / limit
                # halfway there, the docs team moves to its cheaper model; close to the limit, it stops
                docs.frugal = rule["utilization"] >= 0.5
                docs.paused = committed >= Decimal(str(CLOSE_ENOUGH))
            except (aiohttp.ClientError, KeyError, ValueError, StopIteration, ArithmeticError):
                pass
            await asyncio.sleep(0.5)

    async def _send(self, call: Call) -> int:
        s = self.stats
        s.sent += 1
        app = call.headers.get("x-meterline-app", "")
        s.by_app[app] = s.by_app.get(app, 0) + 1
        try:
            async with self.session.post(self.base_url + call.path, data=orjson.dumps(call.body),
                                         headers=call.headers) as resp:
                async for _ in resp.content.iter_any():
                    pass  # a stream is read chunk by chunk, as an SDK would
                status = resp.status
                budget = resp.headers.get("x-meterline-budget")
        except (aiohttp.ClientError, TimeoutError):
            s.errors += 1
            return 0
        if status == 200:
            s.ok += 1
        elif status == 429 and budget:
            s.blocked += 1
        else:
            s.errors += 1
        return status


# --- the command -----------------------------------------------------------------------------------

@dataclass
class Options:
    duration_s: float = 60.0
    exit: bool = False
    host: str = config_mod.DEFAULT_HOST
    port: int = config_mod.DEFAULT_PORT
    db: str = DEFAULT_DB
    seed: int | None = None
    jaeger_ui_url: str | None = None
    fast: bool = False  # shorter fake latencies (tests)


async def run(opts: Options, out: Callable[[str], None] = print) -> int:
    """Runs the demo until done (--exit) or cancelled (Ctrl-C); returns the exit status."""
    from .app import build  # imported late, as `meterline serve` does

    provider = await DemoProvider(seed=opts.seed, speed=0.3 if opts.fast else 1.0).start()
    cfg = config_mod.parse(demo_config(provider.base_url, opts.duration_s))
    cfg.host, cfg.port, cfg.ledger_path = opts.host, opts.port, opts.db
    if opts.jaeger_ui_url:
        cfg.telemetry = {**cfg.telemetry, "jaeger_ui_url": opts.jaeger_ui_url}
    app = build(cfg)
    dashboard.add_routes(app)  # does nothing when the app already has the dashboard
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    try:
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            out(f"meterline demo: cannot listen on {cfg.host}:{cfg.port}: {e.strerror} (try --port)")
            return 1
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        url = f"http://{host}:{cfg.port}"
        started = datetime.now(timezone.utc)
        out(f"meterline demo: sidecar on {url} (ledger {cfg.ledger_path}), fake OpenAI/Anthropic/Gemini "
            f"on {provider.base_url}")
        out(f"Dashboard: {url}/_meterline/{DASHBOARD_VIEW}   (it updates live while the traffic runs)")
        out(f"Sending {opts.duration_s:g} s of traffic from 5 apps ...")
        driver = Driver(url, opts.duration_s, opts.seed)
        stats = await driver.run(lambda t, s: out(f"  {t:4.0f} s  {s.line()}"))
        await _settled(driver_url=url)
        out("")
        out(await _summary(url, stats, opts.duration_s, started))
        out("")
        out(f"Dashboard: {url}/_meterline/{DASHBOARD_VIEW}")
        out("Try some SQL:")
        if opts.exit:  # the sidecar stops: query the file
            where = f" --db {shlex.quote(cfg.ledger_path)}"
        elif (cfg.host, cfg.port) != (config_mod.DEFAULT_HOST, config_mod.DEFAULT_PORT):
            where = f" --url {url}"
        else:
            where = ""
        for q in QUERIES:
            out(f'  meterline sql "{q}"{where}')
        if opts.exit:
            return 0
        out("")
        out("Serving until Ctrl-C.")
        await asyncio.Event().wait()
        return 0
    finally:
        await runner.cleanup()
        await provider.stop()


async def _settled(driver_url: str, timeout_s: float = 10.0) -> None:
    """Waits until the ledger has every call (the sinks process reads the journal, then commits)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(f"{driver_url}/_meterline/healthz") as resp:
                health = await resp.json()
            sinks = health.get("sinks") or {}
            if health["ledger"].get("pending") == 0 and sinks.get("backlog_bytes") == 0 \
                    and sinks.get("open_calls") == 0:
                return
            await asyncio.sleep(0.1)


async def _summary(url: str, stats: Stats, duration_s: float, started: datetime) -> str:
    async with aiohttp.ClientSession() as session:
        query = f"SELECT sum(cost_usd) AS spend FROM calls WHERE started_at >= TIMESTAMPTZ '{started.isoformat()}'"
        async with session.post(f"{url}/_meterline/sql", data=query.encode()) as resp:
            rows = (await resp.json())["rows"]
        async with session.get(f"{url}/_meterline/budgets") as resp:
            budgets = {r["rule"]: r for r in (await resp.json())["budgets"]}
    spend = Decimal(rows[0][0] or 0)
    lines = [f"Done: {stats.line()}, ${spend:.4f} metered, from {len(stats.by_app)} apps in {duration_s:g} s."]
    close = budgets.get(ALERT_RULE)
    if close:
        fired = ", ".join(f"{Decimal(t):.0%}" for t in close["alerts_fired"]) or "none yet"
        lines.append(f"  budget {ALERT_RULE}: {close['utilization']:.0%} of ${Decimal(close['limit_usd']):.2f} "
                     f"used (alert only); alerts fired at {fired}")
    block = budgets.get(BLOCK_RULE)
    if block:
        lines.append(f"  budget {BLOCK_RULE}: {block['utilization']:.0%} of ${Decimal(block['limit_usd']):.2f} used; "
                     f"{BLOCKED_USER}'s calls refused with 429 once it would overspend")
    return "\n".join(lines)
