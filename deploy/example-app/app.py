"""A tiny app that calls an OpenAI-compatible API through the meterline sidecar (standard library only).

It does what an app with the OpenAI SDK does when OPENAI_BASE_URL points at the sidecar, plus what
an OpenTelemetry-instrumented app does: each call runs inside a span of the app's own, whose
context goes to the sidecar in a `traceparent` header. The sidecar's span of the call joins that
trace, and the app exports its own span to the same OTLP endpoint (OTLP/HTTP with JSON), so
Jaeger shows app -> sidecar as one trace. Each line printed ends with that trace's Jaeger URL.

Environment:
  OPENAI_BASE_URL              the sidecar route, e.g. http://meterline:8720/openai/v1
  OPENAI_API_KEY               forwarded untouched by the sidecar (the demo upstream ignores it)
  OTEL_EXPORTER_OTLP_ENDPOINT  where the app's own spans go (http://jaeger:4318); unset: none
  OTEL_SERVICE_NAME            the app's service name in traces (default example-app)
  JAEGER_UI_URL                printed trace links (default http://localhost:16686)
  EXAMPLE_CALLS                how many calls, 0 = forever (default 0)
  EXAMPLE_INTERVAL_S           pause between calls (default 2)
"""
from __future__ import annotations

import json
import os
import random
import secrets
import sys
import time
import urllib.error
import urllib.request

MODELS = ("gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4.1-nano")
USERS = ("u-ada", "u-grace", "u-linus")
FEATURES = ("summarize", "classify", "chat")
PROMPTS = ("Summarize this ticket in one line: the export button does nothing on Safari.",
           "Classify the sentiment of: 'the new release is fast, finally'.",
           "Suggest a name for a sidecar that meters model calls.")


def main() -> int:
    base_url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8720/openai/v1").rstrip("/")
    api_key = os.environ.get("OPENAI_API_KEY", "sk-demo-not-a-real-key")
    otlp = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").rstrip("/")
    service = os.environ.get("OTEL_SERVICE_NAME", "example-app")
    jaeger_ui = os.environ.get("JAEGER_UI_URL", "http://localhost:16686").rstrip("/")
    calls = int(os.environ.get("EXAMPLE_CALLS", "0"))
    interval = float(os.environ.get("EXAMPLE_INTERVAL_S", "2"))

    print(f"example-app: calling {base_url}/chat/completions", flush=True)
    n = 0
    while calls == 0 or n < calls:
        n += 1
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        model, user, feature = random.choice(MODELS), random.choice(USERS), random.choice(FEATURES)
        stream = n % 3 == 0
        body = {"model": model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": 300, "stream": stream}
        headers = {
            "authorization": f"Bearer {api_key}",
            "content-type": "application/json",
            "traceparent": f"00-{trace_id}-{span_id}-01",  # sampled: the sidecar exports its span
            "x-meterline-user": user,                       # attribution, removed before forwarding
            "x-meterline-tags": f"team=support,feature={feature}",
        }
        start = time.time_ns()
        status, error = call(f"{base_url}/chat/completions", body, headers, stream)
        end = time.time_ns()
        if otlp:
            export_span(otlp, service, trace_id, span_id, f"{feature} ({model})", start, end, status, error)
        print(f"call {n}: {model:<13} {'stream' if stream else 'json  '} -> {status} in {(end - start) / 1e9:.2f}s"
              f"  trace {jaeger_ui}/trace/{trace_id}", flush=True)
        if calls == 0 or n < calls:
            time.sleep(interval)
    return 0


def call(url: str, body: dict, headers: dict, stream: bool) -> tuple[int, str | None]:
    """POSTs one chat completion; reads a stream to its end as an SDK would. (status, error or None)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            if stream:
                for _line in resp:  # SSE lines as they arrive
                    pass
            else:
                resp.read()
            return resp.status, None
    except urllib.error.HTTPError as e:  # provider errors and budget refusals (429) pass through
        return e.code, e.read().decode("utf-8", "replace")[:200]
    except OSError as e:  # the sidecar is not up (yet)
        return 0, str(e)


_warned = False


def export_span(endpoint: str, service: str, trace_id: str, span_id: str, name: str,
                start_ns: int, end_ns: int, status: int, error: str | None) -> None:
    """Sends the app's own span as OTLP/HTTP JSON (ids are hex strings in OTLP JSON)."""
    global _warned
    failed = status == 0 or status >= 400
    span = {"traceId": trace_id, "spanId": span_id, "name": name, "kind": 1,
            "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(end_ns),
            "attributes": [{"key": "http.response.status_code", "value": {"intValue": str(status)}}],
            "status": {"code": 2, "message": error or f"HTTP {status}"} if failed else {"code": 1}}
    doc = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "example-app"}, "spans": [span]}]}]}
    req = urllib.request.Request(f"{endpoint}/v1/traces", data=json.dumps(doc).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
    except OSError as e:
        if not _warned:
            _warned = True
            print(f"example-app: cannot export spans to {endpoint}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
