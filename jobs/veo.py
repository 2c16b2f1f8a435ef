"""Gemini Veo videos as jobs: models/{model}:predictLongRunning returns an operation; GET {operation name} polls it.

Documented shapes (ai.google.dev, video generation): the request is `{instances: [{prompt, ...}],
parameters: {durationSeconds, resolution, aspectRatio, sampleCount}}`; the answer and every poll
is a google.longrunning Operation `{name, metadata, done, error: {code, message}, response:
{generateVideoResponse: {generatedSamples: [{video: {uri}}]}}}`. Auth is `x-goog-api-key`.
"""
from __future__ import annotations

import re
from typing import Any

from .fields import number, override, read_units
from .model import FAILED, RUNNING, SUBMITTED, SUCCEEDED, JobAsk, JobPoll, JobSeen

KIND = "veo"
DEFAULT_SECONDS = 8  # Veo's default durationSeconds
DEFAULT_FIELDS = {"seconds": "parameters.durationSeconds", "resolution": "parameters.resolution"}
_SUBMIT = re.compile(r"^/v1(?:beta)?/models/([^/:]+):predictLongRunning$")
_POLL = re.compile(r"^/v1(?:beta)?/((?:models/[^/]+/)?operations/[^/:]+)$")


def ask(method: str, path: str, body: Any, fields: list[tuple[str, dict[str, str]]] = ()) -> JobAsk | None:
    m = _SUBMIT.match(path)
    if method != "POST" or m is None:
        return None
    model = m.group(1)
    units = read_units(body, DEFAULT_FIELDS, override(list(fields), model))
    each = units.get("seconds", DEFAULT_SECONDS)
    count = number((body.get("parameters") or {}).get("sampleCount")) if isinstance(body, dict) else None
    count = int(count) if count else 1
    units["seconds_each"] = each
    units["videos"] = count
    units["seconds"] = each * count
    return JobAsk(KIND, model, units)


def poll(method: str, path: str) -> JobPoll | None:
    m = _POLL.match(path)
    return JobPoll(KIND, provider_job_id=m.group(1)) if method == "GET" and m else None


def read(doc: Any) -> JobSeen | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    seen = JobSeen(provider_job_id=doc["name"])
    if not doc.get("done"):
        seen.state = RUNNING if doc.get("metadata") else SUBMITTED
        return seen
    error = doc.get("error")
    if isinstance(error, dict):
        seen.state, seen.error = FAILED, str(error.get("message") or error.get("code") or "error")
        return seen
    seen.state = SUCCEEDED
    samples = ((doc.get("response") or {}).get("generateVideoResponse") or {}).get("generatedSamples")
    if isinstance(samples, list):
        seen.units_made = {"videos": len(samples)}
    return seen


def units_made(asked: dict[str, Any], seen: JobSeen) -> dict[str, Any]:
    """Veo reports the videos it made, not their seconds: each is as long as asked."""
    videos = seen.units_made.get("videos")
    if videos is None:
        return dict(asked) if seen.state == SUCCEEDED else {}
    made = {k: v for k, v in asked.items() if k == "resolution"}
    made["videos"] = videos
    made["seconds"] = asked.get("seconds_each", DEFAULT_SECONDS) * videos
    return made


def poll_request(base_url: str, provider_job_id: str, api_key: str) -> tuple[str, dict[str, str]]:
    return f"{base_url}/v1beta/{provider_job_id}", {"x-goog-api-key": api_key}
