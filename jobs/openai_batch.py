"""The OpenAI Batch API as jobs: POST /v1/batches, GET /v1/batches/{id}, and the output file's usage lines.

Documented shapes (platform.openai.com, Batch API): a batch object `{id, object: "batch", endpoint,
input_file_id, status: validating|failed|in_progress|finalizing|completed|expired|cancelling|
cancelled, output_file_id, error_file_id, request_counts}`. Its cost is in the output file
(`GET /v1/files/{id}/content`, JSON lines `{id, custom_id, response: {status_code, request_id,
body}, error}`): each body carries its model and usage, priced at batch rates. A batch that
expired or was cancelled still bills the requests it completed, which its output file lists.
"""
from __future__ import annotations

import re
from typing import Any

from .model import CANCELLED, EXPIRED, FAILED, RUNNING, SUBMITTED, SUCCEEDED, JobAsk, JobPoll, JobSeen

KIND = "openai_batch"
_STATES = {"validating": SUBMITTED, "in_progress": RUNNING, "finalizing": RUNNING, "cancelling": RUNNING,
           "completed": SUCCEEDED, "failed": FAILED, "expired": EXPIRED, "cancelled": CANCELLED}
_POLL = re.compile(r"^/v1/batches/([^/]+)$")
_FILE = re.compile(r"^/v1/files/([^/]+)/content$")


def ask(method: str, path: str, body: Any, fields: list[tuple[str, dict[str, str]]] = ()) -> JobAsk | None:
    if method != "POST" or path.rstrip("/") != "/v1/batches":
        return None
    # the requests live in an uploaded file the request only names: nothing to estimate from here
    endpoint = body.get("endpoint") if isinstance(body, dict) else None
    return JobAsk(KIND, None, {"endpoint": endpoint} if isinstance(endpoint, str) else {})


def poll(method: str, path: str) -> JobPoll | None:
    if method != "GET":
        return None
    if m := _POLL.match(path):
        return JobPoll(KIND, provider_job_id=m.group(1))
    if m := _FILE.match(path):
        return JobPoll(KIND, file_id=m.group(1))
    return None


def read(doc: Any) -> JobSeen | None:
    if not isinstance(doc, dict) or doc.get("object") != "batch" or not isinstance(doc.get("id"), str):
        return None
    counts = doc.get("request_counts") if isinstance(doc.get("request_counts"), dict) else {}
    made = {"requests": counts["completed"]} if isinstance(counts.get("completed"), int) else {}
    out = doc.get("output_file_id")
    return JobSeen(provider_job_id=doc["id"], state=_STATES.get(doc.get("status")), units_made=made,
                   output_file_id=out if isinstance(out, str) and out else None)


def needs_file(seen: JobSeen) -> bool:
    """A finished batch with an output file is priced from that file, once the app downloads it."""
    return seen.output_file_id is not None and seen.state in (SUCCEEDED, EXPIRED, CANCELLED)


def line_usage(doc: Any) -> tuple[str | None, dict[str, int]] | None:
    """One output line's model and usage, in our convention (input includes cached; output includes
    reasoning), from a Chat Completions, Responses or Embeddings body; None for an error line."""
    response = doc.get("response") if isinstance(doc, dict) else None
    body = response.get("body") if isinstance(response, dict) else None
    if not isinstance(body, dict) or not isinstance(body.get("usage"), dict):
        return None
    u = body["usage"]
    counts: dict[str, int] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            counts[name] = value

    if "prompt_tokens" in u:  # chat completions, embeddings
        put("input_tokens", u.get("prompt_tokens"))
        put("output_tokens", u.get("completion_tokens", 0))
        put("cache_read_tokens", (u.get("prompt_tokens_details") or {}).get("cached_tokens"))
        put("reasoning_tokens", (u.get("completion_tokens_details") or {}).get("reasoning_tokens"))
    else:  # responses
        put("input_tokens", u.get("input_tokens"))
        put("output_tokens", u.get("output_tokens"))
        put("cache_read_tokens", (u.get("input_tokens_details") or {}).get("cached_tokens"))
        put("reasoning_tokens", (u.get("output_tokens_details") or {}).get("reasoning_tokens"))
    model = body.get("model")
    return (model if isinstance(model, str) else None), counts


def units_made(asked: dict[str, Any], seen: JobSeen) -> dict[str, Any]:
    return dict(seen.units_made)


def poll_request(base_url: str, provider_job_id: str, api_key: str) -> tuple[str, dict[str, str]]:
    return f"{base_url}/v1/batches/{provider_job_id}", {"Authorization": f"Bearer {api_key}"}
