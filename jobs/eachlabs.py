"""each::labs predictions as jobs: POST /v1/prediction (submit), GET /v1/prediction/{id} (poll), POST /v1/prediction/run (sync).

Documented shapes (docs.eachlabs.ai): a submit `{model, version, input}` answers
`{"status": "success", "predictionID": "..."}`; a prediction reads `{id, status:
starting|processing|success|failed|cancelled, output, metrics: {predict_time, cost}}` and `cost` is
what each::labs bills for it (all of a fallback chain's attempts). Auth is `X-API-Key`.
"""
from __future__ import annotations

import re
from typing import Any

from .fields import override, read_units
from .model import CANCELLED, FAILED, RUNNING, SUBMITTED, SUCCEEDED, JobAsk, JobPoll, JobSeen, decimal_or_none

KIND = "eachlabs"
_STATES = {"starting": SUBMITTED, "processing": RUNNING, "success": SUCCEEDED, "succeeded": SUCCEEDED,
           "failed": FAILED, "cancelled": CANCELLED, "canceled": CANCELLED}
# the units of most each::labs video and image models; `jobs.fields` in the config names others
DEFAULT_FIELDS = {"seconds": "input.duration", "images": "input.num_images", "resolution": "input.resolution"}
_POLL = re.compile(r"^/v1/prediction/([^/]+)$")


def ask(method: str, path: str, body: Any, fields: list[tuple[str, dict[str, str]]] = ()) -> JobAsk | None:
    if method != "POST" or path.rstrip("/") not in ("/v1/prediction", "/v1/prediction/run"):
        return None
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    units = read_units(body, DEFAULT_FIELDS, override(list(fields), model))
    return JobAsk(KIND, model, units, sync=path.rstrip("/").endswith("/run"))


def poll(method: str, path: str) -> JobPoll | None:
    m = _POLL.match(path)
    if method != "GET" or m is None or m.group(1) == "run":
        return None
    return JobPoll(KIND, provider_job_id=m.group(1))


def read(doc: Any) -> JobSeen | None:
    """A submit's or a prediction's answer."""
    if not isinstance(doc, dict):
        return None
    pid = doc.get("predictionID") or doc.get("id")
    if not isinstance(pid, str) or not pid:
        return None
    status = doc.get("status")
    metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
    if "predictionID" in doc and "output" not in doc and status in ("success", None):
        state = SUBMITTED  # the submit's "status": "success" says the request was taken, not that it finished
    else:
        state = _STATES.get(status) if isinstance(status, str) else None
    error = doc.get("error")
    return JobSeen(provider_job_id=pid, state=state, provider_cost_usd=decimal_or_none(metrics.get("cost")),
                   model=doc.get("model") if isinstance(doc.get("model"), str) else None,
                   error=error if isinstance(error, str) else None)


def units_made(asked: dict[str, Any], seen: JobSeen) -> dict[str, Any]:
    """each::labs reports the cost, not the seconds made: a success made what it was asked for."""
    return dict(seen.units_made) or (dict(asked) if seen.state == SUCCEEDED else {})


def poll_request(base_url: str, provider_job_id: str, api_key: str) -> tuple[str, dict[str, str]]:
    return f"{base_url}/v1/prediction/{provider_job_id}", {"X-API-Key": api_key}
