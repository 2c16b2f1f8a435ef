"""A routed call's tries: each target admitted by the budgets, sent, and retried or left for the next until one answers.

Nothing reaches the app before an attempt is committed: a failure the route falls back on (its
`fallback_on`: a status, a timeout, a network error) is read whole, metered, priced and kept as an
attempt row, then the next try starts. A stream is committed with its first body bytes, a whole
body with its head; from then on the call is the forwarder's ordinary exchange (sidecar/proxy.py),
and a failure ends the call the way the upstream ended it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from datetime import datetime, timezone
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson

from ledger import records
from ledger.attempt_rows import total
from ledger.budgets import CallAttrs, Refusal, Reservation, Tally
from ledger.records import Attempt, CallExtras, CallInfo, CallRecord, Observation

from ..decoding import decoder_for
from ..guard import Pending
from ..translate.base import TranslateError
from ..upstream import Response as UpstreamResponse, UpstreamError
from .circuit import Breaker
from .config import Target
from .strategies import RouteState

ROUTE_HEADER = "x-meterline-route"
ATTEMPTS_HEADER = "x-meterline-attempts"
SERVED_BY_HEADER = "x-meterline-served-by"
_MAX_ERROR_BODY = 1024 * 1024  # a failure's body read before the next try (error bodies are small)
_SUMMED = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
           "input_cost_usd", "output_cost_usd", "cost_usd")


def table(routes: dict[str, Any], upstreams: dict[str, Any]) -> dict[str, RouteState]:
    """The forwarder's routes by name (one dict hit per call), each with its runtime state."""
    providers = {name: u.provider for name, u in upstreams.items()}
    return {name: RouteState(route, providers) for name, route in routes.items()}


def status(states: dict[str, RouteState]) -> dict[str, Any]:
    """Every route's strategy and targets with their circuit states and recent error rates (healthz, `meterline routes`)."""
    return {name: {"strategy": s.route.strategy, "targets": s.status()} for name, s in states.items()}


def metrics_text(states: dict[str, RouteState], body: bytes) -> bytes:
    """The scrape's text with each target's circuit state and openings added (before an OpenMetrics `# EOF`)."""
    def label(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines = ["# HELP meterline_route_circuit_state A route target's circuit state in this forwarder (1 for the current one)",
             "# TYPE meterline_route_circuit_state gauge"]
    opened = ["# HELP meterline_route_circuit_opened Times a route target's circuit opened in this forwarder",
              "# TYPE meterline_route_circuit_opened gauge"]
    for name, state in states.items():
        for key, breaker in state.breakers.items():
            labels = f'route="{label(name)}",target="{label(key)}"'
            lines.append(f'meterline_route_circuit_state{{{labels},state="{breaker.state}"}} 1')
            opened.append(f"meterline_route_circuit_opened{{{labels}}} {breaker.opened}")
    text = ("\n".join(lines + opened) + "\n").encode()
    if body.rstrip().endswith(b"# EOF"):
        head = body.rstrip()[:-len(b"# EOF")]
        return head + text + b"# EOF\n"
    return body + (b"" if body.endswith(b"\n") or not body else b"\n") + text


@dataclasses.dataclass(slots=True)
class Opened:
    """The committed attempt's upstream response, its body (the first bytes already read) and the headers it adds."""

    up: UpstreamResponse
    chunks: AsyncIterator[bytes]
    headers: list[tuple[str, str]]


class RoutedCall:
    """What one routed call knows of its tries; `finish` folds them into the call's record."""

    __slots__ = ("state", "arm", "attempts", "reservation", "committed", "t_commit", "started_commit",
                 "breaker", "target", "oneapi", "reply")

    def __init__(self, state: RouteState) -> None:
        self.state = state
        self.arm: str | None = None
        self.attempts: list[Attempt] = []
        self.reservation: Any = None  # the committed attempt's budget reservation, settled with the call
        self.committed = False  # an attempt's response went to the app (its row is made by `finish`)
        self.t_commit = 0.0
        self.started_commit: datetime | None = None
        self.breaker: Breaker | None = None
        self.target: Target | None = None
        self.oneapi: Any = None  # a root-path call of a mixed-format route (sidecar/oneapi/routed.py)
        self.reply: Any = None  # the translating Reply of the try that answered, when it was translated

    def headers(self) -> list[tuple[str, str]]:
        out = [(ROUTE_HEADER, self.state.route.name), (ATTEMPTS_HEADER, str(len(self.attempts) + self.committed))]
        if self.target is not None:
            out.append((SERVED_BY_HEADER, self.target.key))
        return out

    def finish(self, record: CallRecord, call: Any) -> None:
        """At the call's end: the committed attempt's row from the record, and the record made the
        sum of its attempts (a failed attempt the provider billed costs the call too)."""
        route = self.state.route
        if self.committed and self.target is not None:
            now = time.perf_counter()
            ttft = None
            if call.ttft is not None:
                ttft = max(0.0, (call.ttft - (self.t_commit - call.t0)) * 1000)
                self.state.observe_ttft(self.target.key, ttft / 1000)
            self.attempts.append(Attempt(
                call_id=record.call_id, attempt=len(self.attempts) + 1, upstream=self.target.upstream,
                provider=record.provider, model=self.target.model, started_at=self.started_commit or record.started_at,
                ttft_ms=ttft, duration_ms=(now - self.t_commit) * 1000, status_code=record.status_code,
                outcome=record.outcome, error_type=record.error_type, input_tokens=record.input_tokens,
                output_tokens=record.output_tokens, cache_read_tokens=record.cache_read_tokens,
                cache_write_tokens=record.cache_write_tokens, reasoning_tokens=record.reasoning_tokens,
                units=record.units, input_cost_usd=record.input_cost_usd, output_cost_usd=record.output_cost_usd,
                cost_usd=record.cost_usd, price_source=record.price_source, response_model=record.response_model))
            if self.breaker is not None:
                failed = record.outcome in (records.TIMEOUT, records.NETWORK_ERROR) or (
                    record.status_code is not None and route.fallback_on.status(record.status_code))
                if record.outcome != records.CANCELLED:
                    self.breaker.record(not failed)
                else:
                    self.breaker.release()
        record.route = route.name
        record.attempts = len(self.attempts)
        record.served_by = self.target.key if self.target is not None and record.outcome != records.BLOCKED else None
        record.arm = self.arm
        tries = self.attempts
        if len(tries) > 1 or not self.committed:
            for name in _SUMMED:
                setattr(record, name, total(tries, name))
            # a try that reported usage but has no price leaves the call's cost unknown, never partial
            if any(a.cost_usd is None and a.price_source == "unpriced" for a in tries):
                record.input_cost_usd = record.output_cost_usd = record.cost_usd = None
                record.price_source = "unpriced"
            elif record.cost_usd is not None and record.price_source is None:
                record.price_source = next(a.price_source for a in tries if a.price_source)


Exchange = Callable[..., Awaitable[tuple[bool, bytes | None]]]


async def run(rt: Any, rc: RoutedCall, call: Any, incoming: Any, adapter: Any, info: CallInfo, body: Any,
              base: dict[str, Any], extras: CallExtras, reply: Any,
              forward_headers: Callable[[bool], dict[str, str]], exchange: Exchange) -> tuple[bool, bytes | None]:
    """Tries the route's targets until one is committed (then runs `exchange` on it) or none is
    left; returns what `exchange` returns: whether a response was started, and its held-back bytes."""
    state = rc.state
    route = state.route
    order, rc.arm = state.plan(info, base["app"], base["user_id"], base["tags"], rt.pricer, call.started_at)
    tries = route.retry.attempts
    plan = [(t, k) for t in order for k in range(tries)]
    deadline = call.t0 + route.timeouts.total_s if route.timeouts.total_s else None
    waited = 0.0
    refusal: Refusal | None = None
    failure: tuple[Any, ...] | None = None  # the last failed try: replayed to the app if none follows
    skip: Target | None = None  # a target whose remaining tries are skipped
    untranslatable: TranslateError | None = None  # a mixed route's target the request cannot be translated to
    i = -1
    while i + 1 < len(plan):
        i += 1
        target, k = plan[i]
        if target is skip:
            continue
        if deadline is not None and time.perf_counter() >= deadline:
            break
        breaker = state.breakers[target.key]
        if not breaker.allow():
            skip = target
            continue
        upstream = rt.config.upstreams[target.upstream]
        xl = tadapter = None  # a try translated for a target of another wire format
        if rc.oneapi is not None and rc.oneapi.needed(upstream.adapter):
            try:
                xl = rc.oneapi.prepare(body, target.model, upstream)
            except TranslateError as e:
                breaker.release()
                untranslatable, skip = e, target
                continue
            tadapter, tinfo = xl.adapter, xl.info
        else:
            tadapter = adapter
            tinfo = _target_info(info, upstream.provider, target.model, route.name, adapter)
        started_at = datetime.now(timezone.utc)
        decision: Any = Reservation([])
        if rt.guard.active:
            decision = rt.guard.admit(tinfo, _attrs(tinfo, base), started_at)
            if isinstance(decision, Pending):  # a fleet lease without room for this try: one round trip
                decision = await rt.guard.resolve(decision)
            if isinstance(decision, Refusal):
                breaker.release()
                refusal = decision
                rc.attempts.append(Attempt(base["call_id"], len(rc.attempts) + 1, target.upstream,
                                           upstream.provider, target.model, started_at, status_code=429,
                                           outcome=records.REFUSED, error_type="budget_exceeded"))
                skip = target  # the budget would refuse its retries too
                continue
        more = i + 1 < len(plan)  # another try may follow (circuits and budgets permitting)
        if xl is None:
            raw, rewritten, path = _request(adapter, tinfo, body, incoming, route.name, target.model)
            headers = forward_headers(rewritten is not None)
        else:
            raw, rewritten, path = xl.raw, xl.rewritten, xl.path
            headers = xl.headers(forward_headers(True))
        key = target.api_key or getattr(upstream, "api_key", None)
        if key:
            path = _with_key(headers, path, tadapter, key)
        t_try = time.perf_counter()
        up: UpstreamResponse | None = None
        first: bytes | None = None
        chunks: AsyncIterator[bytes] | None = None
        kind = detail = network_kind = None
        fails = False
        try:
            async with asyncio.timeout(route.timeouts.ttft_s):
                up = await rt.pool.request(upstream.origin, incoming.method, path, headers, raw)
                fails = route.fallback_on.status(up.status) and more
                if fails:
                    data = b""
                    async for chunk in up.chunks():
                        data += chunk
                        if len(data) > _MAX_ERROR_BODY:
                            break
                else:
                    chunks = up.chunks().__aiter__()
                    try:
                        first = await anext(chunks)
                    except StopAsyncIteration:
                        first = None
        except TimeoutError as e:
            kind, detail = records.TIMEOUT, f"timeout: {e or f'no first byte in {route.timeouts.ttft_s:g} s'}"
        except UpstreamError as e:
            kind, detail = records.NETWORK_ERROR, str(e)
            network_kind = e.kind
        except BaseException:  # the app left (CancelledError): the try's probe and reservation go back
            if up is not None:
                up.close()
            breaker.release()
            _release(rt, decision, started_at)
            raise
        if kind is not None:
            if up is not None:
                up.close()
            allowed = route.fallback_on.timeout if kind == records.TIMEOUT else route.fallback_on.network
            breaker.record(False)
            _hold(rt, rc, decision, started_at)
            rc.attempts.append(Attempt(base["call_id"], len(rc.attempts) + 1, target.upstream, upstream.provider,
                                       target.model, started_at, duration_ms=(time.perf_counter() - t_try) * 1000,
                                       outcome=kind,
                                       error_type="timeout" if kind == records.TIMEOUT else network_kind))
            failure = ("error", kind, detail, target, tinfo)
            if not allowed:
                break
            if k + 1 < tries:
                after = await _backoff(route, k, None, waited)
                skip, waited = (target, waited) if after is None else (skip, after)
            continue
        assert up is not None
        if fails:
            obs = _observe(tadapter, tinfo, up, data, rewritten is not None)
            up.close()
            breaker.record(False)
            _hold(rt, rc, decision, started_at)
            cost = _price(rt, tinfo, obs, started_at)
            rc.attempts.append(_failed_attempt(base["call_id"], len(rc.attempts) + 1, target, upstream.provider,
                                               started_at, t_try, up.status, obs, cost))
            failure = ("response", up, data, target, tinfo, obs, xl)
            if k + 1 < tries:
                after = await _backoff(route, k, up, waited)
                skip, waited = (target, waited) if after is None else (skip, after)
            continue
        # committed: this response is the call's
        rc.committed, rc.t_commit, rc.started_commit = True, t_try, started_at
        _hold(rt, rc, decision, started_at)
        rc.breaker, rc.target = breaker, target
        call.info, call.upstream = tinfo, target.upstream
        if xl is not None:
            rc.reply = reply = xl.reply(reply, rc.oneapi.client)
        return await exchange(rt, incoming.method, tadapter, upstream.origin, path, raw, headers, call,
                              rewritten is not None, reply, opened=Opened(up, _chain(first, chunks), rc.headers()))
    # no try was committed
    if failure is not None and failure[0] == "response":
        _, up, data, target, tinfo, obs, xl = failure
        if xl is not None:
            rc.reply = reply = xl.reply(reply, rc.oneapi.client)
        rc.target = target
        call.info, call.upstream, call.status, call.observation = tinfo, target.upstream, up.status, obs
        call.outcome = records.UPSTREAM_ERROR
        # the body as the upstream sent it (still compressed, if it was); its length only if it is whole
        cut = len(data) > _MAX_ERROR_BODY
        keep = [(key, value) for key, value in up.headers
                if (lower := key.lower()) not in _DROP_REPLAYED and not (cut and lower == "content-length")]
        await reply.start(up.status, up.reason, keep + rc.headers(), whole=True)
        return True, data
    if failure is not None:
        _, kind, detail, target, tinfo = failure
        rc.target = target
        call.info, call.upstream = tinfo, target.upstream
        call.outcome, call.error_type, call.error_detail = kind, rc.attempts[-1].error_type, detail
        return False, None
    if refusal is not None:
        call.outcome, call.status, call.error_type = records.BLOCKED, 429, "budget_exceeded"
        rt.guard.refused_call(refusal, base["call_id"], extras)
        hdrs = {"x-should-retry": "false", "x-meterline-budget": refusal.account.rule.name, **dict(rc.headers())}
        if refusal.retry_after is not None:
            hdrs["retry-after"] = str(refusal.retry_after)
        reply.simple(429, adapter.error_body(429, refusal.message, "budget_exceeded"), hdrs)
        return False, None
    if untranslatable is not None:  # every target left was of a format this request cannot be translated to
        call.outcome, call.status, call.error_type = records.BLOCKED, untranslatable.status, "untranslatable"
        reply.simple(untranslatable.status, adapter.error_body(untranslatable.status, untranslatable.message,
                                                               "meterline_translate"), dict(rc.headers()))
        return False, None
    call.outcome, call.error_type = records.NETWORK_ERROR, "circuit_open"
    call.error_detail = f"route {route.name!r}: every target's circuit is open (or its time is up)"
    return False, None


# hop-by-hop headers of a replayed failure (as sidecar/proxy.py drops them from every response)
_DROP_REPLAYED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                            "upgrade"})


async def _chain(first: bytes | None, rest: AsyncIterator[bytes] | None) -> AsyncIterator[bytes]:
    if first is None:
        return
    yield first
    if rest is not None:
        async for chunk in rest:
            yield chunk


def _target_info(info: CallInfo, provider: str, model: str, route: str, adapter: Any) -> CallInfo:
    tinfo = dataclasses.replace(info, provider=provider, request_model=model)
    if adapter.__name__.endswith("gemini"):
        tinfo.endpoint = info.endpoint.replace(f"/models/{route}:", f"/models/{model}:", 1)
    return tinfo


def _request(adapter: Any, tinfo: CallInfo, body: Any, incoming: Any, route: str,
             model: str) -> tuple[bytes, bytes | None, str]:
    """The try's request body (its model is the target's), whether the adapter rewrote it, and its path."""
    path = incoming.target
    if adapter.__name__.endswith("gemini"):  # the model is in the path
        path = path.replace(f"/models/{route}:", f"/models/{model}:", 1)
        rewritten = adapter.prepare(tinfo, body)
        return (rewritten if rewritten is not None else incoming.body), rewritten, path
    if isinstance(body, dict):
        body = {**body, "model": model}
        rewritten = adapter.prepare(tinfo, body)
        return (rewritten if rewritten is not None else orjson.dumps(body)), rewritten, path
    return incoming.body, None, path


_KEY_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "api-key"})
_QUERY_KEY = re.compile(r"(?<=[?&])key=[^&]*&?")
_AUTH = {"openai": ("Authorization", "Bearer {}"), "anthropic": ("x-api-key", "{}"),
         "gemini": ("x-goog-api-key", "{}")}


def _with_key(headers: dict[str, str], path: str, adapter: Any, key: str) -> str:
    """The target's own key replaces the app's, in the header its wire format uses (a Gemini `?key=` goes too)."""
    for name in [h for h in headers if h.lower() in _KEY_HEADERS]:
        del headers[name]
    fmt = adapter.__name__.rsplit(".", 1)[-1]
    header, value = _AUTH[fmt]
    headers[header] = value.format(key)
    if fmt == "gemini" and "key=" in path:
        path = _QUERY_KEY.sub("", path).rstrip("?&")
    return path


def _observe(adapter: Any, tinfo: CallInfo, up: UpstreamResponse, data: bytes, rewritten: bool) -> Observation:
    """What a failed try's body says (its error type; usage, when the provider billed it)."""
    try:
        observer = adapter.observe(tinfo, up.status, up.header("content-type"), rewritten)
        decoder = decoder_for(up.header("content-encoding"), False)
        if decoder is not None:
            data = decoder.feed(data) + decoder.drain()
        observer.feed(data)
        return observer.finish()
    except Exception:  # noqa: BLE001 - an unreadable error body: the row keeps the status
        return Observation()


def _price(rt: Any, tinfo: CallInfo, obs: Observation, at: datetime) -> Any:
    if obs.usage.is_empty() or not tinfo.priced:
        return None
    return rt.pricer.cost(tinfo.provider, (obs.response_model, tinfo.request_model), obs.usage, at, obs.service_tier)


def _failed_attempt(call_id: str, n: int, target: Target, provider: str, started_at: datetime, t_try: float,
                    status: int, obs: Observation, cost: Any) -> Attempt:
    u = obs.usage
    return Attempt(call_id, n, target.upstream, provider, target.model, started_at,
                   duration_ms=(time.perf_counter() - t_try) * 1000, status_code=status,
                   outcome=records.UPSTREAM_ERROR, error_type=obs.error_type or f"http_{status}",
                   input_tokens=u.input_tokens, output_tokens=u.output_tokens, cache_read_tokens=u.cache_read_tokens,
                   cache_write_tokens=u.cache_write_tokens, reasoning_tokens=u.reasoning_tokens, units=u.units or None,
                   input_cost_usd=cost.input_usd if cost else None, output_cost_usd=cost.output_usd if cost else None,
                   cost_usd=cost.total_usd if cost else None,
                   price_source=cost.source if cost else (None if u.is_empty() else "unpriced"),
                   response_model=obs.response_model)


def _release(rt: Any, decision: Any, at: datetime) -> None:
    """A try's reservation goes back unspent."""
    if decision is not None and decision.holds:
        rt.guard.budgets.settle(decision, Tally(Decimal(0), 0, 0), at)


def _hold(rt: Any, rc: RoutedCall, decision: Any, at: datetime) -> None:
    """The latest try's reservation is the call's: the one before goes back. The call settles its
    whole cost (billed failures included) on it at the end, on the accounts of the try that
    answered, or of the last try when none did."""
    _release(rt, rc.reservation, at)
    rc.reservation = decision


async def _backoff(route: Any, k: int, up: UpstreamResponse | None, waited: float) -> float | None:
    """Waits before retrying the same target: backoff_ms doubling per retry with jitter (half to
    all of it), at least the upstream's retry-after. Returns the call's total wait so far, or None
    without waiting when this wait would pass max_wait_s (the target's retries are then skipped)."""
    base = route.retry.backoff_ms / 1000 * 2 ** k
    wait = base * (0.5 + random.random() / 2)
    after = _retry_after(up) if up is not None else None
    if after is not None:
        wait = max(wait, after)
    if waited + wait > route.retry.max_wait_s:
        return None
    await asyncio.sleep(wait)
    return waited + wait


def _retry_after(up: UpstreamResponse) -> float | None:
    """retry-after-ms (OpenAI) or retry-after in seconds or as an HTTP date."""
    ms = up.header("retry-after-ms")
    try:
        if ms:
            return max(0.0, float(ms) / 1000)
    except ValueError:
        pass
    text = up.header("retry-after").strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(text) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _attrs(info: CallInfo, base: dict[str, Any]) -> CallAttrs:
    return CallAttrs(info.provider, info.request_model or "", info.operation, base["app"] or "",
                     base["user_id"] or "", base["key_fingerprint"] or "", base["tags"])

