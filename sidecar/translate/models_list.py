"""Build the `GET /v1/models` reply from what the config can reach: OpenAI's list format, or
Anthropic's (paged) when the client sends `anthropic-version`. Pure; docs/one-api.md has the shapes."""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple
from urllib.parse import unquote

from sidecar.translate.base import TranslateError

# Neither format has a field for "unknown": OpenAI's `created` is Unix seconds and Anthropic's
# `created_at` "may be set to an epoch value if the release date is unknown". meterline does not
# know when an upstream released a model, so both say the epoch.
EPOCH_SECONDS = 0
EPOCH_RFC3339 = "1970-01-01T00:00:00Z"
ROUTE_OWNER = "meterline"  # a route is meterline's own name, served by several upstreams

ANTHROPIC_DEFAULT_LIMIT = 20  # Anthropic's documented default and range for `limit`
ANTHROPIC_MAX_LIMIT = 1000


class ModelEntry(NamedTuple):
    """A model the config can reach: the upstream's name in the config, the model id at that
    upstream, and who provides it (`openai`, `anthropic`, `google`, ...). Plain 3-tuples work too."""

    upstream: str
    model: str
    owned_by: str


def wants_anthropic(headers: Mapping[str, str]) -> bool:
    """Whether a request's headers are an Anthropic client's: every Anthropic SDK sends
    `anthropic-version`; OpenAI clients never do."""
    return any(key.lower() == "anthropic-version" for key in headers)


def _models(entries: Iterable[tuple[str, str, str]], routes: Iterable[str]) -> list[tuple[str, str]]:
    """(id, owned_by) in listing order: routes first (the names an app is meant to use), then
    `<upstream>/<model>`, each in config order and once."""
    out: dict[str, str] = {}
    for name in routes:
        out.setdefault(name, ROUTE_OWNER)
    for upstream, model, owned_by in entries:
        out.setdefault(f"{upstream}/{model}", owned_by)
    return list(out.items())


def _openai_model(mid: str, owner: str) -> dict:
    return {"id": mid, "object": "model", "created": EPOCH_SECONDS, "owned_by": owner}


def _anthropic_model(mid: str) -> dict:
    return {"type": "model", "id": mid, "display_name": mid, "created_at": EPOCH_RFC3339,
            "lifecycle": "active"}


def openai_list(entries: Iterable[tuple[str, str, str]], routes: Iterable[str] = ()) -> dict:
    """OpenAI's `GET /v1/models`: `{"object": "list", "data": [{id, object, created, owned_by}]}`."""
    return {"object": "list",
            "data": [_openai_model(mid, owner) for mid, owner in _models(entries, routes)]}


def _limit(value: str | int | None) -> int:
    if value is None or value == "":
        return ANTHROPIC_DEFAULT_LIMIT
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if not 1 <= limit <= ANTHROPIC_MAX_LIMIT:
        raise TranslateError(400, f"limit: must be an integer from 1 to {ANTHROPIC_MAX_LIMIT}, got {value!r}")
    return limit


def anthropic_list(entries: Iterable[tuple[str, str, str]], routes: Iterable[str] = (), *,
                   limit: str | int | None = None, after_id: str | None = None,
                   before_id: str | None = None, lifecycle: Iterable[str] = ()) -> dict:
    """Anthropic's `GET /v1/models`: one page of `{type, id, display_name, created_at, lifecycle}`
    with `has_more`, `first_id`, `last_id`, paged by `limit` and the `after_id` / `before_id`
    cursors as the anthropic SDK's auto-pagination sends them. Every listed model is `active`
    (the config reaches it), so a `lifecycle` filter without `active` lists none. Raises
    TranslateError (400) on a bad limit, an unknown cursor, or both cursors at once."""
    stages = set(lifecycle)
    ids = [mid for mid, _ in _models(entries, routes)] if not stages or "active" in stages else []
    size = _limit(limit)
    if after_id and before_id:
        raise TranslateError(400, "after_id and before_id cannot be used together")
    for name, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor and cursor not in ids:
            raise TranslateError(400, f"{name}: no model {cursor!r} in this list")
    if before_id:
        end = ids.index(before_id)
        start = max(0, end - size)
        page, more = ids[start:end], start > 0
    else:
        start = ids.index(after_id) + 1 if after_id else 0
        page, more = ids[start:start + size], start + size < len(ids)
    return {"data": [_anthropic_model(mid) for mid in page],
            "has_more": more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None}


def _all(query: Mapping[str, str], key: str) -> list[str]:
    # aiohttp's request.query is a MultiDict (getall); a plain mapping holds one value a key.
    getall = getattr(query, "getall", None)
    if getall is not None:
        return list(getall(key, []))
    return [query[key]] if key in query else []


def models_list(entries: Iterable[tuple[str, str, str]], routes: Iterable[str],
                headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> dict:
    """The reply to `GET /v1/models` for this request: Anthropic's format (with its paging query;
    the anthropic SDK sends the lifecycle filter as `lifecycle[]=`) when the client sends
    `anthropic-version`, else OpenAI's."""
    if wants_anthropic(headers):
        query = query or {}
        return anthropic_list(entries, routes, limit=query.get("limit"),
                              after_id=query.get("after_id"), before_id=query.get("before_id"),
                              lifecycle=_all(query, "lifecycle[]") + _all(query, "lifecycle"))
    return openai_list(entries, routes)


def retrieve(entries: Iterable[tuple[str, str, str]], routes: Iterable[str], model_id: str,
             anthropic: bool = False) -> dict:
    """`GET /v1/models/{model_id}`: one model in the client's format. Both SDKs percent-encode the
    slash of `<upstream>/<model>` (`anthropic%2Fclaude-sonnet-4-5`), so the id is unquoted here.
    Raises TranslateError (404) for a model the config does not reach."""
    wanted = unquote(model_id)
    for mid, owner in _models(entries, routes):
        if mid == wanted:
            return _anthropic_model(mid) if anthropic else _openai_model(mid, owner)
    raise TranslateError(404, f"model {wanted!r} is not a route or an <upstream>/<model> this config reaches")
