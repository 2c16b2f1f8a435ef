"""The forwarding handler: one call from the app, passed to its upstream untouched and metered on the way."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ledger import records, validate
from ledger.budgets import CallAttrs, Refusal
from ledger.pricing import FREE_COST
from ledger.records import CallExtras, CallInfo, CallRecord, Observation

from jobs.model import JobAsk

from . import attribution, content, hostcheck, jobs_hook, memory
from .adapters.base import JsonObserver
from .decoding import Decoder, decoder_for
from .guard import NO_RESERVATION, Pending
from .oneapi import call as oneapi_call, routed as oneapi_routed
from .routes import attempts
from .reply import AioReply, Incoming, Reply, incoming_of, read_body, timed_out
from .runtime import ADAPTER_MODULES, Runtime
from .upstream import Origin, Response as UpstreamResponse, UpstreamError

RUNTIME = web.AppKey("runtime", Runtime)
log = logging.getLogger("meterline")

# RFC 9110 hop-by-hop headers, plus those recomputed for the upstream connection (Expect: the
# sidecar already read the whole body)
_DROP_REQUEST = frozenset({"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization",
                           "te", "trailer", "transfer-encoding", "upgrade", "content-length", "traceparent",
                           "expect"})
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                            "transfer-encoding", "upgrade"})
_META_PREFIX = "x-meterline-"


class _Call:
    """What the handler learns as one call proceeds; becomes a CallRecord at the end."""

    __slots__ = ("t0", "started_at", "info", "upstream", "status", "outcome", "error_type", "error_detail", "ttft",
                 "work", "response_bytes", "observation", "output_messages", "conclude", "concluded")

    def __init__(self, t0: float, started_at: datetime, info: CallInfo, upstream: str) -> None:
        self.t0 = t0
        self.started_at = started_at
        self.info = info
        self.upstream = upstream
        self.status: int | None = None
        self.outcome = records.OK
        self.error_type: str | None = None
        self.error_detail = ""  # what went wrong with the upstream, for the log and the 502
        self.ttft: float | None = None
        self.work = 0.0  # seconds spent in the sidecar's own code for this call
        self.response_bytes = 0
        self.observation = Observation()
        self.output_messages: str | None = None  # only with telemetry.capture_content
        # writes the final record (journal, budgets, ledger); called once, as soon as the call is over
        self.conclude: Any = None
        self.concluded = False


async def handle(request: web.Request) -> web.StreamResponse:
    """The aiohttp route for /{upstream}/{tail}: connections the fast front handed to aiohttp."""
    t0 = time.perf_counter()
    rt = request.app[RUNTIME]
    if not all(hostcheck.host_ok(host, rt.config.allowed_hosts) for host in request.headers.getall("Host", ())):
        # the front checks the calls it serves itself; these came through aiohttp (after a hand-over, HTTP/1.0)
        raise web.HTTPMisdirectedRequest(
            body=b'{"error":{"message":"meterline: this Host is not served (add it to allowed_hosts if it is yours)",'
                 b'"type":"meterline_misdirected"}}', content_type="application/json")
    try:
        body = await read_body(request, rt.config.body_idle_timeout_s, request.client_max_size)
    except TimeoutError:
        return await timed_out(request, rt.config.body_idle_timeout_s)
    reply = AioReply(request)
    await forward(rt, incoming_of(request, body), reply, t0)
    assert reply.response is not None
    return reply.response


async def forward(rt: Runtime, incoming: Incoming, reply: Reply, t0: float) -> None:
    """One call: admitted, forwarded, answered through `reply`, recorded. `t0` is when it arrived."""
    started_at = datetime.now(timezone.utc)
    name = incoming.upstream
    upstream = rt.config.upstreams.get(name)
    if upstream is None:
        if name == "v1" and oneapi_call.serves(incoming.path):  # the root paths: One API (sidecar/oneapi)
            await oneapi_call.forward(rt, incoming, reply, t0, forward)
            return
        reply.simple(404, orjson.dumps(
            {"error": {"message": f"meterline: no upstream named {name!r}; configure it under 'upstreams:'",
                       "type": "meterline_unknown_upstream"}}))
        return
    adapter = ADAPTER_MODULES[upstream.adapter]
    path = incoming.path
    query = incoming.query
    raw = incoming.body
    t_read = time.perf_counter()

    headers = incoming.headers
    body: Any = None
    if raw and raw[:1] in (b"{", b"[") and "json" in headers.get("content-type", "json"):
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None  # forwarded as is; the upstream will say what is wrong
    info = adapter.describe(upstream.provider, path, body, raw)
    job = jobs_hook.classify(rt, upstream, incoming.method, path, body)
    if job is not None:
        info.job, info.priced = job, False  # the call is free; the job's cost goes on its `jobs` row
        if not isinstance(job, JobAsk):  # a poll's path names the job, not the model: the job says it
            info.request_model = jobs_hook.model_of(rt, upstream, job)
    if query:
        info.endpoint = f"{path}?{attribution.redact_query(query)}"
    call = _Call(t0, started_at, info, upstream.name)
    ids = os.urandom(40).hex()  # one system call for the call id, the span id and a trace id
    call_id, span_id = ids[:32], ids[32:48]
    trace_id, parent_span, sampled = _trace_context(headers.get("traceparent"), ids[48:])
    extras = CallExtras(parent_span_id=parent_span, sampled=sampled, tracestate=attribution.text(headers.get("tracestate")),
                        server_address=upstream.host, server_port=upstream.port,
                        temperature=info.temperature, top_p=info.top_p,
                        max_output_tokens=info.max_output_tokens)
    if rt.capture_content:
        extras.input_messages = content.input_messages(upstream.adapter, body)
    record_base = dict(
        call_id=call_id, app=attribution.text(headers.get(attribution.APP_HEADER)) or rt.config.app,
        user_id=attribution.text(headers.get(attribution.USER_HEADER)) or info.user_id,
        tags=attribution.parse_tags(attribution.text(headers.get(attribution.TAGS_HEADER))),
        key_fingerprint=attribution.fingerprint(
            attribution.api_key(headers, query) if incoming.formats is None else incoming.app_key, rt.salt),
        trace_id=trace_id, span_id=span_id, request_bytes=len(raw),
    )
    if incoming.formats is not None:
        record_base["client_format"], record_base["upstream_format"] = incoming.formats

    est = mine = idem_key = None  # an async job's estimate, its idempotency entry and key (jobs_hook)
    # a route: one dict hit (a job's submit or poll is never routed)
    routed = rt.routes.get(info.request_model) if rt.routes and job is None else None
    if routed is not None:
        if routed.route.adapter != upstream.adapter and incoming.formats is None:
            reply.simple(400, adapter.error_body(400, (
                f"meterline: route {routed.route.name!r} has {routed.route.adapter} targets; call it on a "
                f"{routed.route.adapter} path, not /{name}/ ({upstream.adapter})"
                + (" (its targets mix formats: call it on the root /v1/ paths)" if routed.route.mixed else "")),
                "meterline_route_format"))
            return
        routed = attempts.RoutedCall(routed)
        if incoming.formats is not None and (routed.state.route.mixed or routed.state.route.adapter != upstream.adapter):
            # a root-path call (sidecar/oneapi): each try of another format is translated for its target
            routed.oneapi = oneapi_routed.RouteTranslation(incoming.formats[0], incoming.path)
        decision = NO_RESERVATION  # each try is admitted at its own model's price (routes/attempts.py)
        rewritten = None
        traceparent = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}" \
            if parent_span is not None or rt.tracing else None

        def upstream_headers(identity: bool) -> dict[str, str]:  # per try: its body may be rewritten or not
            out = _forward_headers(headers, identity=identity)
            if traceparent is not None:
                out["traceparent"] = traceparent
            return out
    else:
        if isinstance(job, JobAsk):
            found, mine, idem_key = jobs_hook.replay(rt, upstream.name, headers, raw, job)
            if found is not None:
                _replay(rt, call, record_base, extras, found, reply)
                return
            decision, est = jobs_hook.admit(rt, info, _attrs(info, record_base), started_at)
            if isinstance(decision, Pending):  # a fleet lease without room for the job's estimate
                decision = await rt.guard.resolve(decision)
                if isinstance(decision, Refusal):
                    decision = rt.guard.job_refused(decision, info)
        else:
            decision = rt.guard.admit(info, _attrs(info, record_base), started_at) if rt.guard.active else NO_RESERVATION
            if isinstance(decision, Pending):  # a fleet lease without room for it: one round trip to Redis
                decision = await rt.guard.resolve(decision)
        if isinstance(decision, Refusal):
            if mine is not None:
                rt.guard.jobs.forget(upstream.name, idem_key, mine)
            _refuse(rt, adapter, call, record_base, extras, decision, reply)
            return
        rewritten = adapter.prepare(info, body)
        if rewritten is not None:
            raw = rewritten
        out_headers = _forward_headers(headers, identity=rewritten is not None)
        if parent_span is not None or rt.tracing:
            # the upstream request is a child of the call's span, which is a child of the app's
            out_headers["traceparent"] = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
    provisional = _record(rt, call, record_base, provisional=True)
    if routed is not None:
        provisional.route = routed.state.route.name  # an interrupted routed call says which route it was
    segment = rt.journal.begin(provisional)

    def conclude(lazily: bool = False) -> None:
        if call.concluded:
            return
        call.concluded = True
        call.conclude = None  # this closure holds `call`: without the cycle the call is freed at once, not by the GC
        t_end = time.perf_counter()
        record = _record(rt, call, record_base, provisional=False)
        if routed is not None:
            if routed.oneapi is not None:  # the format of the target that answered
                record.upstream_format = rt.config.upstreams[call.upstream].adapter
            routed.finish(record, call)
            extras.attempts = routed.attempts
            rt.guard.settle(decision if routed.reservation is None else routed.reservation, record, extras)
        elif info.job is None:
            rt.guard.settle(decision, record, extras)
        else:
            try:
                jobs_hook.conclude(rt, upstream, info, call.observation, record, decision, extras, est, mine, idem_key)
            except Exception as e:  # noqa: BLE001 - a metering fault never breaks the call
                rt.anomaly("job_error", f"{type(e).__name__}: {e}")
                if mine is not None and idem_key:
                    rt.guard.jobs.forget(upstream.name, idem_key, mine)
        extras.output_messages = call.output_messages
        rt.journal.end(record, segment, lazily, extras)
        call.work += time.perf_counter() - t_end

    call.conclude = conclude
    rt.in_flight += 1
    app_reply = reply  # the app's own Reply (a translated try's answer goes through routed.reply)
    started = False
    pending: bytes | None = None
    try:
        call.work += time.perf_counter() - t_read
        if routed is None:
            started, pending = await _exchange(rt, incoming.method, adapter, upstream.origin, incoming.target,
                                               raw, out_headers, call, rewritten is not None, reply)
        else:
            started, pending = await attempts.run(rt, routed, call, incoming, adapter, info, body, record_base,
                                                  extras, reply, upstream_headers, _exchange)
            if routed.reply is not None:  # a translated try answered: its answer goes back translated
                reply = routed.reply
    except asyncio.CancelledError:
        # the app went away: the upstream request was dropped with it
        if not call.concluded:
            _app_left(call)
        raise
    finally:
        rt.in_flight -= 1
        conclude(lazily=reply.defers_final)
        memory.after_call(len(raw) + call.response_bytes)
    if call.outcome in (records.NETWORK_ERROR, records.TIMEOUT) and (not started or reply.unsent()):
        # nothing reached the app yet (a non-streamed head waits for its body): it gets an error it can read
        if routed is not None:  # the last target tried
            upstream = rt.config.upstreams.get(call.upstream, upstream)
        where = f"{upstream.origin.host}:{upstream.origin.port}" if upstream.origin else upstream.base_url
        message = f"meterline: upstream {upstream.name} ({where}) failed: {call.error_detail or call.error_type}"
        log.warning("%s", message.removeprefix("meterline: "))
        status = 504 if call.outcome == records.TIMEOUT else 502
        app_reply.simple(status, adapter.error_body(status, message, "api_error"),
                         None if routed is None else dict(routed.headers()))
        return
    if call.outcome in (records.CANCELLED, records.BLOCKED):  # BLOCKED: a route whose every try was refused
        return
    if call.outcome in (records.NETWORK_ERROR, records.TIMEOUT):
        log.warning("upstream %s (%s) broke off mid-response: %s", upstream.name, upstream.base_url,
                    call.error_detail or call.error_type)
        reply.abort()  # the stream broke upstream: break it for the app too rather than end it cleanly
        return
    try:
        await reply.finish(pending)
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        pass  # the app left as its response ended; the call is recorded as the upstream answered it


def _attrs(info: CallInfo, base: dict[str, Any]) -> CallAttrs:
    return CallAttrs(info.provider, info.request_model or "", info.operation, base["app"] or "",
                     base["user_id"] or "", base["key_fingerprint"] or "", base["tags"])


def _refuse(rt: Runtime, adapter: Any, call: _Call, base: dict[str, Any], extras: CallExtras,
            refusal: Refusal, reply: Reply) -> None:
    """A 429 in the provider's own shape that SDKs surface at once instead of retrying."""
    rule = refusal.account.rule.name
    call.outcome, call.status, call.error_type = records.BLOCKED, 429, "budget_exceeded"
    rt.guard.refused_call(refusal, base["call_id"], extras)
    record = _record(rt, call, base, provisional=False)
    rt.journal.end(record, None, extras=extras)
    headers = {"x-should-retry": "false", "x-meterline-budget": rule}
    if refusal.retry_after is not None:
        headers["retry-after"] = str(refusal.retry_after)
    reply.simple(429, adapter.error_body(429, refusal.message, "budget_exceeded"), headers)


def _replay(rt: Runtime, call: _Call, base: dict[str, Any], extras: CallExtras, found: Any, reply: Reply) -> None:
    """A submit repeating an earlier one's Idempotency-Key and body: it gets that one's answer (409
    while it is in flight) and is not forwarded, so the job is submitted, reserved and recorded once."""
    status, body, headers = jobs_hook.replay_answer(found)
    call.status = status
    if status >= 400:
        call.outcome, call.error_type = records.UPSTREAM_ERROR, "idempotency_conflict"
    record = _record(rt, call, base, provisional=False)
    rt.journal.end(record, None, extras=extras)
    reply.simple(status, body, headers)


async def _exchange(rt: Runtime, method: str, adapter: Any, origin: Origin, target: str,
                    raw: bytes, headers: dict[str, str], call: _Call, rewritten: bool, reply: Reply,
                    opened: attempts.Opened | None = None) -> tuple[bool, bytes | None]:
    """Sends the request upstream and streams the response back. Returns whether the response was
    started and, for non-streamed bodies, the last chunk, held back so the journal gets the record first.
    `opened`: a route's committed try, already sent (its first body bytes read)."""
    assert rt.pool is not None
    started = False
    pending: bytes | None = None
    observer = None
    info = call.info
    up: UpstreamResponse | None = None
    try:
        up = await rt.pool.request(origin, method, target, headers, raw) if opened is None else opened.up
        t = time.perf_counter()
        call.status = up.status
        content_type = up.header("content-type")
        observer = None
        if info.job is not None:
            observer = jobs_hook.observer(rt, rt.config.upstreams[call.upstream], info, up.status)
        if observer is None:
            observer = adapter.observe(info, up.status, content_type, rewritten)
        streaming = info.stream or content_type.startswith("text/event-stream")
        try:
            decoder = decoder_for(up.header("content-encoding"), streaming)
        except ValueError as e:
            decoder = None
            observer = None
            rt.anomaly("unknown_encoding", str(e))
        out_headers = [(key, value) for key, value in up.headers
                       if (lower := key.lower()) not in _DROP_RESPONSE and not (rewritten and lower == "content-length")]
        if opened is not None:
            out_headers += opened.headers
        call.work += time.perf_counter() - t
        started = True
        await reply.start(up.status, up.reason, out_headers, whole=not streaming)
        async for chunk in (up.chunks() if opened is None else opened.chunks):
            t = time.perf_counter()
            if call.ttft is None:
                call.ttft = t - call.t0
            call.response_bytes += len(chunk)
            out = chunk
            if observer is not None:
                observer, out = _meter(rt, call, observer, decoder, chunk)
            call.work += time.perf_counter() - t
            if streaming:
                if observer is not None and observer.done:
                    # SDKs stop reading at the closing event ([DONE], message_stop): the record is
                    # written before they can see it, whatever the HTTP body still has to say
                    _end_observation(rt, adapter, call, observer, up.status)
                    observer = None
                    call.conclude()
                if out:
                    await _send(reply, out)
            else:
                if pending:
                    await _send(reply, pending)
                pending = out
        if observer is not None and decoder is None and streaming and (rest := observer.leftover()):
            await _send(reply, rest)  # a rewritten stream that ended inside an event
        if not call.concluded:
            if observer is not None and decoder is not None:
                observer, _ = _meter(rt, call, observer, decoder, None)
            _end_observation(rt, adapter, call, observer, up.status)
    except TimeoutError as e:
        call.outcome, call.error_type, call.error_detail = records.TIMEOUT, "timeout", f"timeout: {e}"
    except _AppGone:
        _finish_partial(call, observer)
        _app_left(call)
    except UpstreamError as e:
        call.outcome, call.error_type, call.error_detail = records.NETWORK_ERROR, e.kind, str(e)
        _finish_partial(call, observer)
    except asyncio.CancelledError:
        _finish_partial(call, observer)
        raise
    finally:
        if up is not None:
            up.close()
    return started, pending


def _meter(rt: Runtime, call: _Call, observer: Any, decoder: Decoder | None,
           chunk: bytes | None) -> tuple[Any, bytes]:
    """Feeds one chunk (None: the end of a compressed body) to the observer, through the decoder if
    the body is compressed. Returns the observer (None once metering stopped: the row says why)
    and the bytes for the app: the observer's, or the chunk as it came when compressed."""
    try:
        if decoder is None:
            return observer, observer.feed(chunk)
        data = decoder.drain() if chunk is None else decoder.feed(chunk)
        if data:
            observer.feed(data)
        if decoder.stopped is not None:
            _finish_partial(call, observer)
            call.observation.anomaly = decoder.stopped
            return None, chunk or b""
    except Exception as e:  # noqa: BLE001 - metering faults never break the call
        rt.anomaly("observer_error", f"{type(e).__name__}: {e}")
        call.observation = Observation(anomaly="observer_error")
        return None, chunk or b""
    return observer, chunk or b""


class _AppGone(Exception):
    """The app closed its connection while the response was being sent."""


async def _send(reply: Reply, data: bytes) -> None:
    try:
        await reply.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as e:
        raise _AppGone from e


def _output_content(adapter: Any, observer: JsonObserver) -> str | None:
    try:
        return content.output_messages(adapter.__name__.rsplit(".", 1)[-1], orjson.loads(observer.body.body()))
    except (orjson.JSONDecodeError, TypeError, AttributeError, ValueError):
        return None


def _end_observation(rt: Runtime, adapter: Any, call: _Call, observer: Any, status: int) -> None:
    """The response has ended: what the observer saw becomes the call's observation and outcome."""
    t = time.perf_counter()
    if status >= 400:
        call.outcome = records.UPSTREAM_ERROR
    if rt.capture_content and isinstance(observer, JsonObserver) and status < 400:
        call.output_messages = _output_content(adapter, observer)
    if observer is not None:
        try:
            call.observation = observer.finish()
        except Exception as e:  # noqa: BLE001
            rt.anomaly("observer_error", f"{type(e).__name__}: {e}")
            call.observation = Observation(anomaly="observer_error")
    if call.outcome == records.OK and call.observation.error_type:
        call.outcome = records.UPSTREAM_ERROR  # an error event inside a 200 stream
    call.work += time.perf_counter() - t


def _app_left(call: _Call) -> None:
    """The app closed its connection. If the upstream had already sent an error event, that is the
    call's outcome (SDKs raise on it and leave); otherwise the call was cancelled."""
    if call.observation.error_type:
        call.outcome = records.UPSTREAM_ERROR
    else:
        call.outcome, call.error_type = records.CANCELLED, "client_disconnected"


def _finish_partial(call: _Call, observer: Any) -> None:
    """A call that broke off keeps the usage seen so far (e.g. Anthropic's message_start)."""
    if observer is None:
        return
    try:
        call.observation = observer.finish()
    except Exception:  # noqa: BLE001 - partial bodies may not parse; the row says what is known
        pass


def _forward_headers(headers: Any, identity: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers.items():
        lower = key.lower()
        if lower in _DROP_REQUEST or lower.startswith(_META_PREFIX):
            continue
        out[key] = value
    if identity:
        # the sidecar rewrites this response, so it asks for it uncompressed
        for key in [k for k in out if k.lower() == "accept-encoding"]:
            del out[key]
        out["Accept-Encoding"] = "identity"
    return out


def _trace_context(traceparent: str | None, new_trace_id: str) -> tuple[str, str | None, bool]:
    """The app's W3C trace id, parent span and sampled flag (so the call joins its trace), or a new trace."""
    if traceparent:
        parts = traceparent.strip().split("-")
        if (len(parts) >= 4 and len(parts[0]) == 2 and parts[0] != "ff" and len(parts[1]) == 32
                and len(parts[2]) == 16 and len(parts[3]) == 2 and parts[1] != "0" * 32
                and parts[2] != "0" * 16 and _is_hex(parts[1] + parts[2] + parts[3])):
            return parts[1].lower(), parts[2].lower(), bool(int(parts[3], 16) & 1)
    return new_trace_id, None, True


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _record(rt: Runtime, call: _Call, base: dict[str, Any], provisional: bool) -> CallRecord:
    info = call.info
    seen = call.observation
    usage = seen.usage
    bad = None
    if provisional:
        ended_at = duration_ms = None
        outcome = records.INTERRUPTED
        cost = None
    else:
        # before pricing: a count no column holds (2**64 tokens) becomes NULL, prices nothing, reaches no budget
        bad = validate.usage(usage)
        if bad:
            rt.anomaly(bad, f"{info.provider} {info.endpoint} reported a usage count the ledger cannot hold")
        duration = time.perf_counter() - call.t0
        ended_at = call.started_at + timedelta(seconds=duration)
        duration_ms = duration * 1000
        outcome = call.outcome
        if outcome == records.OK and seen.anomaly and seen.anomaly not in ("no_usage",):
            rt.anomaly(seen.anomaly, f"{info.provider} {info.endpoint} status {call.status}")
        elif outcome == records.OK and seen.anomaly == "no_usage" and info.priced:
            rt.anomaly("no_usage", f"{info.provider} {info.endpoint} reported no usage")
        if outcome == records.BLOCKED:
            cost = None
        elif not info.priced:
            cost = FREE_COST if outcome == records.OK else None
        elif usage.is_empty() or bad:
            cost = None
        else:
            cost = rt.pricer.cost(info.provider, (seen.response_model, info.request_model), usage,
                                  call.started_at, seen.service_tier)
    record = CallRecord(
        call_id=base["call_id"], started_at=call.started_at, ended_at=ended_at, duration_ms=duration_ms,
        ttft_ms=call.ttft * 1000 if call.ttft is not None else None,
        overhead_ms=None if provisional else call.work * 1000,
        app=base["app"], upstream=call.upstream, provider=info.provider, operation=info.operation,
        endpoint=info.endpoint, request_model=info.request_model, response_model=seen.response_model,
        response_id=seen.response_id, stream=info.stream, status_code=call.status, outcome=outcome,
        error_type=call.error_type or seen.error_type, finish_reason=seen.finish_reason,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens, units=usage.units or None,
        input_cost_usd=cost.input_usd if cost else None, output_cost_usd=cost.output_usd if cost else None,
        cost_usd=cost.total_usd if cost else None,
        price_source=cost.source if cost else (None if provisional or usage.is_empty() else "unpriced"),
        user_id=base["user_id"], key_fingerprint=base["key_fingerprint"], tags=base["tags"],
        trace_id=base["trace_id"], span_id=base["span_id"], request_bytes=base["request_bytes"],
        response_bytes=call.response_bytes, anomaly=None if provisional else seen.anomaly,
        service_tier=seen.service_tier, instance=rt.config.fleet.instance,
        client_format=base.get("client_format"), upstream_format=base.get("upstream_format"),
    )
    if not provisional:
        validate.mark(record, bad)
        validate.costs(record)  # money that fits DECIMAL(38, 12), upstream strings that are strings
    return record

