"""Translate an OpenAI embeddings client (`POST /v1/embeddings`) to a Gemini API upstream
(`models/{model}:embedContent` for one text, `:batchEmbedContents` for several): request, JSON
response and error body. A pure library; the tables are in docs/one-api.md."""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from sidecar.translate.base import Dropped, TranslateError

ONE = "embedContent"
BATCH = "batchEmbedContents"
ENCODINGS = ("float", "base64")

# Request fields consumed here. `task_type` is not OpenAI's: it is Gemini's taskType, accepted
# so an app on the openai SDK can still ask for query/document embeddings (extra_body).
_HANDLED = {"model", "input", "dimensions", "encoding_format", "task_type"}

# Gemini's google.rpc status -> (status for the OpenAI client, OpenAI error type).
_ERROR_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "INTERNAL": (500, "server_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
}


@dataclass
class EmbedCall:
    """What to send upstream: `models/{model}:{method}` with `body`; `dropped` names the client
    fields left out (for `x-meterline-dropped`); `encoding_format` is what the reply must use."""

    method: str
    body: dict
    dropped: list[str] = field(default_factory=list)
    encoding_format: str = "float"


def _refuse(message: str) -> TranslateError:
    return TranslateError(400, f"meterline cannot translate this request to Gemini embeddings: {message}")


def _texts(value: Any) -> list[str]:
    """OpenAI's `input`: a string or a list of strings. Token arrays (a list of ints, or a list
    of such lists) are OpenAI-tokenizer ids; Gemini takes text only and cannot read them."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _refuse("`input` must be a string or a list of strings")
    if not value:
        raise _refuse("`input` is an empty list")
    if any(isinstance(v, (int, list)) and not isinstance(v, bool) for v in value):
        raise _refuse("`input` is a token array; Gemini embeds text only, send the text instead")
    if not all(isinstance(v, str) for v in value):
        raise _refuse("`input` must be a string or a list of strings")
    return value


def _model_name(model: str) -> str:
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


def request(doc: dict, model: str) -> EmbedCall:
    """An OpenAI embeddings request -> the Gemini call for `model` (the model the route resolved
    to). Raises TranslateError when the request cannot be carried over without changing it."""
    if "input" not in doc:
        raise _refuse("`input` is required")
    texts = _texts(doc["input"])
    encoding = doc.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise _refuse(f"encoding_format {encoding!r} is not one of {list(ENCODINGS)}")
    options: dict = {}
    dims = doc.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise _refuse("`dimensions` must be a positive integer")
        options["outputDimensionality"] = dims
    if doc.get("task_type") is not None:
        options["taskType"] = doc["task_type"]

    # `user` (and any field not handled) is named, not sent: Gemini has no end-user field, and
    # losing it changes no vector.
    dropped: Dropped = [key for key in doc if key not in _HANDLED]
    if len(texts) == 1:
        body = {"content": {"parts": [{"text": texts[0]}]}, **options}
        return EmbedCall(ONE, body, dropped, encoding)
    # Each batch entry names the model again (Gemini requires it, equal to the path's model).
    name = _model_name(model)
    body = {"requests": [{"model": name, "content": {"parts": [{"text": t}]}, **options} for t in texts]}
    return EmbedCall(BATCH, body, dropped, encoding)


def path(model: str, method: str) -> str:
    """The upstream path after the API version: `models/{model}:{method}`."""
    return f"{_model_name(model)}:{method}"


# ---------------------------------------------------------------- response

def encode_base64(values: list[float]) -> str:
    """OpenAI's base64 embedding: the vector as little-endian float32 bytes, base64-encoded
    (what the openai SDK decodes with array('f') / numpy float32)."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def usage(meta: Any) -> dict:
    """Gemini's EmbeddingUsageMetadata -> OpenAI's usage. Embeddings have input tokens only, so
    total = prompt. Models that report no usage (gemini-embedding-001) give 0 here: the openai
    SDK's Usage needs integers. The ledger does not read this; it reads Gemini's own bytes and
    keeps NULL tokens and cost with anomaly `no_usage` (docs/one-api.md)."""
    prompt = meta.get("promptTokenCount") if isinstance(meta, dict) else None
    prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else 0
    return {"prompt_tokens": prompt, "total_tokens": prompt}


def usage_reported(doc: Any) -> bool:
    """Whether the Gemini reply carried a token count (so the client's usage is not a stand-in 0)."""
    meta = doc.get("usageMetadata") if isinstance(doc, dict) else None
    return isinstance(meta, dict) and isinstance(meta.get("promptTokenCount"), int)


def response(doc: dict, model: str, encoding_format: str = "float") -> dict:
    """A Gemini embedContent or batchEmbedContents reply -> an OpenAI embeddings list. `model` is
    the Gemini model the call went to (Gemini's reply does not name it)."""
    if "embedding" in doc:
        vectors = [doc.get("embedding") or {}]
    else:
        vectors = doc.get("embeddings") or []
    data = []
    for index, vector in enumerate(vectors):
        values = vector.get("values") or []
        data.append({"object": "embedding", "index": index,
                     "embedding": encode_base64(values) if encoding_format == "base64" else values})
    return {"object": "list", "data": data, "model": model, "usage": usage(doc.get("usageMetadata"))}


def error(status: int, doc: Any) -> tuple[int, dict]:
    """A Gemini error (status, body) -> (status, OpenAI error body). Gemini's body is
    `{"error": {"code", "message", "status", "details"}}` (sometimes inside a one-item list)."""
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("status"), str):
        kind = err["status"]
        new_status, new_type = _ERROR_STATUS.get(kind, (status if status >= 400 else 502, kind.lower()))
        # A bad API key is 400 INVALID_ARGUMENT with reason API_KEY_INVALID at Gemini; OpenAI
        # clients know it as 401 (the openai SDK's AuthenticationError).
        if any(isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in err.get("details") or []):
            new_status, new_type = 401, "authentication_error"
        message = str(err.get("message", ""))
    else:
        # Not Gemini's documented shape: pass its text on rather than lose it.
        kind, new_type = None, "upstream_error"
        new_status = status if status >= 400 else 502
        message = doc if isinstance(doc, str) else json.dumps(doc)
    return new_status, {"error": {"message": message, "type": new_type, "param": None, "code": kind}}
