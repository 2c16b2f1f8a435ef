"""The systems under test (direct, bare forwarder, meterline with one and two workers, with budgets on Redis,
through a route and a route that falls back, LiteLLM, Portkey): how each is started and called."""
from __future__ import annotations

import json
import re
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from procs import LOOPBACK, RedisService, Service, free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODEL = "gpt-4o-mini"
ROUTE = "bench-route"  # meterline-route: one target, the fake's gpt-4o-mini
FALLBACK_ROUTE = "bench-fallback"  # meterline-fallback: a target that answers 503, then the fake's gpt-4o-mini
API_KEY = "sk-bench-7f3c9a1e5d2b8046c1e9f7a3b5d0e2c4a6f8b1d3e5c7a9f0"  # also LiteLLM's master key

# sent to every system alike; meterline reads and strips the x-meterline-* ones, the others pass them on
COMMON_HEADERS = {
    "Authorization": f"Bearer {API_KEY}",
    "x-meterline-tags": "team=bench,feature=load",
    "x-meterline-app": "bench",
}


@dataclass
class System:
    """One system under test: where a client sends chat completions, and the process serving them."""

    name: str
    url: str
    service: Service
    headers: dict[str, str] = field(default_factory=dict)
    version: str = ""
    model: str = MODEL  # what the request body's `model` says (a route's name for the route rows)
    attempts: int = 0  # the `x-meterline-attempts` every call must answer with (0: not a route)
    redis: RedisService | None = None  # the redis-server its budgets live on (meterline-redis): its CPU counts

    def body(self, stream: bool = False) -> bytes:
        return request_body(stream, model=self.model)

    def companions(self) -> dict[str, int]:
        """Servers only this system uses (role -> pid), whose CPU counts for it."""
        return {"redis": self.redis.pid} if self.redis is not None and self.redis.proc is not None else {}

    def stop(self) -> None:
        self.service.stop()
        if self.redis is not None:
            self.redis.stop()

    def all_headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**COMMON_HEADERS, **self.headers, **(extra or {})}


def request_body(stream: bool = False, prompt_chars: int = 400, model: str = MODEL) -> bytes:
    """A chat request like an app's: a system and a user message, and a token limit."""
    body: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for an online shop."},
            {"role": "user", "content": ("Summarise this order history for the support agent. " * 8)[:prompt_chars]},
        ],
        "max_tokens": 256,
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _python() -> str:
    return sys.executable


def start_fake(workdir: Path, delay_ms: float, body_bytes: int, chunks: int, chunk_interval_ms: float) -> System:
    port = free_port()
    service = Service("fake", [_python(), str(BENCH / "fake_upstream.py"), "--port", str(port),
                               "--delay-ms", str(delay_ms), "--body-bytes", str(body_bytes),
                               "--chunks", str(chunks), "--chunk-interval-ms", str(chunk_interval_ms)],
                      f"http://{LOOPBACK}:{port}/healthz", workdir / "fake.log").start()
    return System("direct", f"http://{LOOPBACK}:{port}/v1/chat/completions", service)


def fake_base(fake: System) -> str:
    return fake.url.split("/v1/", 1)[0]


def start_bare(workdir: Path, fake: System) -> System:
    port = free_port()
    service = Service("bare", [_python(), str(BENCH / "bare_forwarder.py"), "--port", str(port),
                               "--upstream", fake_base(fake)],
                      f"http://{LOOPBACK}:{port}/", workdir / "bare.log").start()
    return System("bare", f"http://{LOOPBACK}:{port}/openai/v1/chat/completions", service)


def meterline_command() -> list[str]:
    exe = Path(sys.executable).parent / "meterline"
    return [str(exe)] if exe.exists() else [_python(), "-m", "sidecar.cli"]


def start_meterline(workdir: Path, fake: System, name: str = "meterline", workers: int = 1,
                    fleet_redis: str | None = None, upstreams: str = "", extra: str = "") -> System:
    """`meterline serve` as users run it, on a fresh ledger in `workdir`, with everything on: journal
    and ledger, two budget rules every call is admitted and settled against (one split per API
    key), traces exported over OTLP/HTTP to the fake (which drops them), metrics. With `workers` > 1
    (`--workers N`) the same without the budget rules, which meterline refuses with more than one
    forwarder unless they are shared through Redis (`fleet_redis`: fleet.redis, budgets kept).
    `upstreams` adds entries to the upstreams block (lines indented two spaces), `extra` top-level
    config (routes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / f"{name}.yaml"
    budgets = ("budgets:\n"
               "  - {name: bench-daily, window: day, limit_usd: 1000000, action: block}\n"
               "  - {name: bench-per-key, per: key, window: hour, limit_usd: 100000, action: block}\n")
    config.write_text(
        f"upstreams:\n  openai: {{base_url: {fake_base(fake)}}}\n" + upstreams
        + (budgets if workers == 1 or fleet_redis else "")
        + (f"fleet: {{redis: '{fleet_redis}'}}\n" if fleet_redis else "")
        + "telemetry: {batch_delay_s: 1}\n"
        + extra
    )
    env = {"PYTHONPATH": str(ROOT), "OTEL_EXPORTER_OTLP_ENDPOINT": fake_base(fake),
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    service = Service(name, [*meterline_command(), "serve", "--config", str(config), "--port", str(port),
                             "--db", str(workdir / f"{name}.duckdb"), "--workers", str(workers)],
                      f"http://{LOOPBACK}:{port}/_meterline/healthz", workdir / f"{name}.log",
                      cwd=workdir, env=env).start()
    return System(name, f"http://{LOOPBACK}:{port}/openai/v1/chat/completions", service)


def start_meterline_redis(workdir: Path, fake: System) -> System:
    """meterline as `start_meterline` runs it, its two budget rules shared through `fleet.redis` on a
    redis-server of its own (free loopback port, temp directory, no persistence)."""
    redis = RedisService(workdir / "redis").start()
    try:
        system = start_meterline(workdir, fake, "meterline-redis", fleet_redis=redis.url)
    except Exception:
        redis.stop()
        raise
    system.redis = redis
    return system


def start_meterline_route(workdir: Path, fake: System) -> System:
    """meterline as `start_meterline` runs it (budgets and all), called with `model: bench-route`: a
    route of one target, the fake's gpt-4o-mini. Against meterline: what a route adds to a call."""
    system = start_meterline(workdir, fake, "meterline-route", extra=(
        f"routes:\n  {ROUTE}:\n    targets:\n      - {{upstream: openai, model: {MODEL}}}\n"))
    system.model, system.attempts = ROUTE, 1
    return system


def start_meterline_fallback(workdir: Path, fake: System) -> System:
    """The same with `model: bench-fallback`: a route whose first target (upstream `down`, the fake's
    `/fail/503` path) answers every call 503, so each call falls back once to the fake's gpt-4o-mini.
    Its circuit never opens (a million failures a second), so every call pays the failed try."""
    system = start_meterline(
        workdir, fake, "meterline-fallback",
        upstreams=f"  down: {{base_url: {fake_base(fake)}/fail/503, adapter: openai}}\n", extra=(
        f"routes:\n  {FALLBACK_ROUTE}:\n    strategy: fallback\n    targets:\n"
        f"      - {{upstream: down, model: {MODEL}}}\n      - {{upstream: openai, model: {MODEL}}}\n"
        "    fallback_on: [5xx]\n    circuit: {failures: 1000000, window_s: 1}\n"))
    system.model, system.attempts = FALLBACK_ROUTE, 2
    return system


def is_meterline(system: System) -> bool:
    return system.name.startswith("meterline")


def sinks_pid(system: System) -> int | None:
    """The pid of meterline's sinks process, from healthz (None for other systems, or when it is down)."""
    if not is_meterline(system):
        return None
    try:
        with urllib.request.urlopen(f"{meterline_base(system)}/_meterline/healthz", timeout=5) as resp:
            return json.loads(resp.read()).get("sinks", {}).get("pid")
    except (OSError, ValueError):
        return None


def meterline_base(system: System) -> str:
    return system.url.split("/openai/", 1)[0]


def start_litellm(workdir: Path, fake: System, exe: str, version: str) -> System:
    """LiteLLM's proxy: one worker, no database, the model pointed at the fake."""
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {fake_base(fake)}/v1\n"
        f"      api_key: {API_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {API_KEY}\n"  # it refuses to start without one; every request sends it
    )
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION",
           "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True"}
    service = Service("litellm", [exe, "--config", str(config), "--host", LOOPBACK, "--port", str(port),
                                  "--num_workers", "1"],
                      f"http://{LOOPBACK}:{port}/health/liveliness", workdir / "litellm.log", env=env,
                      cwd=workdir).start(timeout=180)
    return System("litellm", f"http://{LOOPBACK}:{port}/v1/chat/completions", service, version=version)


def start_portkey(workdir: Path, fake: System, entry: str, version: str) -> System:
    """Portkey's gateway on node, routed to the fake by its provider and custom-host headers."""
    port = free_port()
    service = Service("portkey", ["node", entry, f"--port={port}", "--headless"],
                      f"http://{LOOPBACK}:{port}/", workdir / "portkey.log",
                      env={"NODE_ENV": "production"}, cwd=workdir).start(timeout=60)
    headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"{fake_base(fake)}/v1"}
    return System("portkey", f"http://{LOOPBACK}:{port}/v1/chat/completions", service, headers, version)


def verify(system: System, chunks: int) -> str | None:
    """One JSON and one streamed call; None when both look like OpenAI's, else what is wrong."""
    try:
        req = urllib.request.Request(system.url, data=system.body(), method="POST",
                                     headers={**system.all_headers(), "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc = json.loads(resp.read())
            tries = resp.headers.get("x-meterline-attempts")
        if not isinstance(doc.get("usage"), dict) or doc.get("model") is None:
            return f"JSON answer lacks usage or model: {str(doc)[:200]}"
        if system.attempts and tries != str(system.attempts):
            return f"route call made {tries} attempts (x-meterline-attempts), not {system.attempts}"
        req = urllib.request.Request(system.url, data=system.body(stream=True), method="POST",
                                     headers={**system.all_headers(), "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read()
            tries = resp.headers.get("x-meterline-attempts")
        if system.attempts and tries != str(system.attempts):
            return f"streamed route call made {tries} attempts (x-meterline-attempts), not {system.attempts}"
        got = len(re.findall(rb'"content":\s*"t\d+"', text))
        if b"[DONE]" not in text or got != chunks:
            return f"stream had {got} of {chunks} content chunks, [DONE] {'seen' if b'[DONE]' in text else 'missing'}"
    except Exception as e:  # noqa: BLE001 - any failure here just takes the system out of the run
        detail = e.read()[:200].decode("utf-8", "replace") if hasattr(e, "read") else ""
        return f"{type(e).__name__}: {e} {detail}".strip()
    return None
