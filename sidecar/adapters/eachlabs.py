"""The each::labs prediction API wire format (api.eachlabs.ai): predictions are async jobs, metered through jobs/eachlabs.py.

A call to each::labs carries no token usage: its cost is the prediction's, reported by each::labs
in `metrics.cost` and recorded on the job's row (the forwarder's job hook reads the bodies).
"""
from __future__ import annotations

from typing import Any

import orjson

from ledger.records import CallInfo, Observation

from .base import JsonObserver, Observer, error_observation, estimate_tokens


def describe(provider: str, path: str, body: Any, raw: bytes = b"") -> CallInfo:
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    # the call itself is free: what it costs is the job's (the `jobs` table)
    return CallInfo(provider=provider, operation="prediction", endpoint=path, request_model=model,
                    input_estimate=estimate_tokens(len(raw)), priced=False)


def prepare(info: CallInfo, body: Any) -> bytes | None:
    return None


def _model(doc: Any) -> Observation:
    model = doc.get("model") if isinstance(doc, dict) else None
    return Observation(response_model=model if isinstance(model, str) else None)


def observe(info: CallInfo, status: int, content_type: str, rewritten: bool) -> Observer:
    return JsonObserver(error_observation if status >= 400 else _model)


def error_body(status: int, message: str, kind: str) -> bytes:
    return orjson.dumps({"status": "error", "message": message, "error": kind})
