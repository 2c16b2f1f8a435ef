"""Fuzzing the adapters' observers, the splitters and the decoder with random and mutated provider
bodies cut at random places: no exception escapes `feed`, `leftover` or `finish`, and what `feed`
returns (what the app gets) is the body unchanged, but for the documented include_usage stripping."""
from __future__ import annotations

import gzip
import json
import re
from typing import Any, Callable

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import decoding
from sidecar.adapters import anthropic, gemini, openai
from sidecar.adapters.framing import JsonArraySplitter, SseSplitter

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- what providers send, with random values where they put numbers, names and text ----------

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
counts = st.one_of(st.integers(min_value=0, max_value=10**6), values)


def _dumps(doc: Any, indent: int | None = None) -> bytes:
    # json, not orjson: integers past 64 bits are valid JSON an upstream may send
    return json.dumps(doc, separators=None if indent else (",", ":"), indent=indent).encode()


def _openai_chunk(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["content", "usage", "finish", "error", "odd"]))
    if kind == "usage":
        return {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": draw(counts),
                                                             "completion_tokens": draw(counts)}}
    if kind == "error":
        return {"error": {"type": draw(values), "message": "x"}}
    if kind == "odd":
        return draw(st.dictionaries(st.sampled_from(["id", "model", "choices", "usage", "service_tier"]),
                                    values, max_size=4))
    choice = {"index": 0, "delta": {"content": draw(st.text(max_size=10))},
              "finish_reason": "stop" if kind == "finish" else None}
    return {"id": "chatcmpl-1", "model": draw(values), "choices": [choice], "usage": None}


def _responses_event(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["response.created", "response.output_text.delta", "response.completed",
                                 "response.failed", "error"]))
    response = {"id": "resp_1", "model": draw(values), "status": "completed",
                "usage": {"input_tokens": draw(counts), "output_tokens": draw(counts)}}
    return {"type": kind, "response": draw(st.one_of(st.just(response), values)), "code": draw(values)}


def _anthropic_event(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["message_start", "content_block_delta", "message_delta", "message_stop", "error"]))
    usage = {"input_tokens": draw(counts), "output_tokens": draw(counts),
             "cache_read_input_tokens": draw(counts), "cache_creation": draw(values)}
    if kind == "message_start":
        return {"type": kind, "message": draw(st.one_of(st.just({"id": "msg_1", "model": "m", "usage": usage}), values))}
    if kind == "message_delta":
        return {"type": kind, "delta": draw(values), "usage": draw(st.one_of(st.just(usage), values))}
    return {"type": kind, "error": draw(values), "delta": {"text": draw(st.text(max_size=8))}}


def _gemini_chunk(draw: Any) -> dict[str, Any]:
    meta = {"promptTokenCount": draw(counts), "candidatesTokenCount": draw(counts),
            "promptTokensDetails": draw(st.one_of(st.just([{"modality": "AUDIO", "tokenCount": 3}]), values))}
    return {"candidates": draw(st.one_of(st.just([{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}]),
                                         values)),
            "usageMetadata": draw(st.one_of(st.just(meta), values)), "modelVersion": draw(values)}


EVENT_MAKERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "openai": _openai_chunk, "responses": _responses_event, "anthropic": _anthropic_event, "gemini": _gemini_chunk}


@st.composite
def sse_bodies(draw: Any, provider: str) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        doc = EVENT_MAKERS[provider](draw)
        eol = draw(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"]))
        line = eol[: len(eol) // 2]
        name = draw(st.sampled_from([b"", b"event: message" + line, b": ping" + line]))
        parts.append(name + b"data: " + _dumps(doc) + eol)
    if draw(st.booleans()):
        parts.append(b"data: [DONE]\n\n")
    return _mutate(draw, b"".join(parts))


@st.composite
def array_bodies(draw: Any) -> bytes:
    docs = [_dumps(_gemini_chunk(draw), indent=2) for _ in range(draw(st.integers(0, 4)))]
    return _mutate(draw, b"[" + b",\r\n".join(docs) + b"]")


@st.composite
def json_bodies(draw: Any) -> bytes:
    doc = draw(st.one_of(
        st.builds(lambda u, m: {"id": "x", "model": m, "usage": u, "choices": [{"finish_reason": "stop"}]},
                  st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens",
                                                   "output_tokens", "total_tokens"]), counts), values),
        st.builds(lambda m: {"usageMetadata": m, "candidates": []}, values),
        values))
    return _mutate(draw, _dumps(doc))


def _mutate(draw: Any, body: bytes) -> bytes:
    """Sometimes the body as sent, sometimes broken: bytes flipped, cut out or inserted, or cut short."""
    for _ in range(draw(st.integers(0, 3))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if op == "flip":
            body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1:]
        elif op == "cut":
            body = body[:at] + body[at + draw(st.integers(1, 20)):]
        elif op == "insert":
            body = body[:at] + draw(st.sampled_from([b"\n\n", b"\r", b"{", b"}", b'"', b"\\", b"data: ", b"\x00\xff"])) + body[at:]
        else:
            body = body[:at]
    return body


def _cut(draw: Any, body: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=12))))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]


def _info(adapter: Any, provider: str, path: str, body: Any) -> Any:
    return adapter.describe(provider, path, body, _dumps(body))


# every observer the adapters hand out for a 200 response, with the body shape it reads
OBSERVERS: dict[str, tuple[Callable[[], Any], Any]] = {
    "openai chat sse": (lambda: openai.ChatStream(), sse_bodies("openai")),
    "openai completions sse": (lambda: openai.observe(_info(openai, "openai", "/v1/completions", {"stream": True}),
                                                      200, "text/event-stream", False), sse_bodies("openai")),
    "openai responses sse": (lambda: openai.observe(_info(openai, "openai", "/v1/responses", {"stream": True}),
                                                    200, "text/event-stream", False), sse_bodies("responses")),
    "openai transcription sse": (lambda: openai.observe(_info(openai, "openai", "/v1/audio/transcriptions", None),
                                                        200, "text/event-stream", False), sse_bodies("openai")),
    "openai chat json": (lambda: openai.observe(_info(openai, "openai", "/v1/chat/completions", {}),
                                                200, "application/json", False), json_bodies()),
    "openai responses json": (lambda: openai.observe(_info(openai, "openai", "/v1/responses", {}),
                                                     200, "application/json", False), json_bodies()),
    "openai completions json": (lambda: openai.observe(_info(openai, "openai", "/v1/completions", {}),
                                                       200, "application/json", False), json_bodies()),
    "openai images json": (lambda: openai.observe(_info(openai, "openai", "/v1/images/generations", {}),
                                                  200, "application/json", False), json_bodies()),
    "openai error json": (lambda: openai.observe(_info(openai, "openai", "/v1/chat/completions", {}),
                                                 429, "application/json", False), json_bodies()),
    "anthropic messages sse": (lambda: anthropic.observe(_info(anthropic, "anthropic", "/v1/messages", {"stream": True}),
                                                         200, "text/event-stream", False), sse_bodies("anthropic")),
    "anthropic messages json": (lambda: anthropic.observe(_info(anthropic, "anthropic", "/v1/messages", {}),
                                                          200, "application/json", False), json_bodies()),
    "anthropic count json": (lambda: anthropic.observe(_info(anthropic, "anthropic", "/v1/messages/count_tokens", {}),
                                                       200, "application/json", False), json_bodies()),
    "gemini sse": (lambda: gemini.observe(_info(gemini, "gemini", "/v1beta/models/g:streamGenerateContent", {}),
                                          200, "text/event-stream", False), sse_bodies("gemini")),
    "gemini array": (lambda: gemini.observe(_info(gemini, "gemini", "/v1beta/models/g:streamGenerateContent", {}),
                                            200, "application/json", False), array_bodies()),
    "gemini json": (lambda: gemini.observe(_info(gemini, "gemini", "/v1beta/models/g:generateContent", {}),
                                           200, "application/json", False), json_bodies()),
    "gemini embed json": (lambda: gemini.observe(_info(gemini, "gemini", "/v1beta/models/g:embedContent", {}),
                                                 200, "application/json", False), json_bodies()),
}


def _run(observer: Any, pieces: list[bytes]) -> bytes:
    out = b"".join(observer.feed(p) for p in pieces) + observer.leftover()
    seen = observer.finish()
    assert seen.anomaly is None or isinstance(seen.anomaly, str)
    return out


@FUZZ
@given(st.data())
def test_observers_pass_every_byte_and_never_raise(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(OBSERVERS)), label="observer")
    make, bodies = OBSERVERS[name]
    body = data.draw(bodies, label="body")
    pieces = data.draw(st.composite(lambda d: _cut(d, body))(), label="pieces")
    assert _run(make(), pieces) == body


_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')


@FUZZ
@given(st.data())
def test_include_usage_stripping_is_all_that_changes(data: st.DataObject) -> None:
    """The rewrite of a stream whose usage the sidecar asked for: the same however the bytes are cut,
    the body unchanged where it has no usage to strip, and on well-formed streams exactly the usage
    chunk and the `"usage": null` of the others gone."""
    body = data.draw(sse_bodies("openai"), label="body")
    pieces = data.draw(st.composite(lambda d: _cut(d, body))(), label="pieces")
    whole = _run(openai.ChatStream(strip_usage=True), [body])
    assert _run(openai.ChatStream(strip_usage=True), pieces) == whole
    if b"usage" not in body:
        assert whole == body


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"]), st.binary(max_size=20).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), st.booleans()), max_size=6), st.data())
def test_stripping_removes_exactly_the_usage(events: list[tuple[bytes, bytes, bool]], data: st.DataObject) -> None:
    parts, want = [], []
    for eol, text, usage in events:
        if usage:
            raw = b"data: " + orjson.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 3}}) + eol
        else:
            doc = b'{"id":"c","choices":[{"delta":{"content":' + orjson.dumps(text.decode("latin-1")) + b'}}],"usage":null}'
            raw = b"data: " + doc + eol
            want.append(_USAGE_NULL.sub(b"", raw, count=1))
        parts.append(raw)
    body = b"".join(parts) + b"data: [DONE]\n\n"
    pieces = data.draw(st.composite(lambda d: _cut(d, body))(), label="pieces")
    assert _run(openai.ChatStream(strip_usage=True), pieces) == b"".join(want) + b"data: [DONE]\n\n"


def _reference_events(body: bytes) -> list[bytes]:
    """What the splitter did before it kept a scan position: every complete event of the whole body."""
    return [m.group(0) for m in re.finditer(rb".*?(?:\r\n\r\n|\n\n|\r\r)", body, re.S)]


@FUZZ
@given(st.data())
def test_sse_splitter_matches_a_whole_body_scan(data: st.DataObject) -> None:
    body = data.draw(st.one_of(sse_bodies("openai"), st.binary(max_size=200),
                               st.lists(st.sampled_from([b"\r", b"\n", b"data: x", b"e"]), max_size=30).map(b"".join)))
    pieces = data.draw(st.composite(lambda d: _cut(d, body))())
    splitter = SseSplitter()
    raws = [e.raw for p in pieces for e in splitter.feed(p)]
    assert raws == _reference_events(body)
    rest = body[len(b"".join(raws)):]
    last = splitter.flush()
    assert (last.raw if last else b"") == (rest if rest.strip() else b"")


@FUZZ
@given(st.data())
def test_array_splitter_yields_the_same_elements_however_cut(data: st.DataObject) -> None:
    body = data.draw(st.one_of(array_bodies(), st.binary(max_size=200)))
    pieces = data.draw(st.composite(lambda d: _cut(d, body))())
    whole = JsonArraySplitter().feed(body)
    splitter = JsonArraySplitter()
    assert [e for p in pieces for e in splitter.feed(p)] == whole


@FUZZ
@given(st.data())
def test_decoder_never_raises_on_any_body(data: st.DataObject) -> None:
    coding = data.draw(st.sampled_from(["gzip", "deflate", "br", "zstd"]))
    plain = data.draw(st.one_of(json_bodies(), sse_bodies("openai")))
    body = data.draw(st.sampled_from([_compress(coding, plain), _compress(coding, plain)[:-3], plain]))
    body = _mutate(data.draw, body) if data.draw(st.booleans()) else body
    pieces = data.draw(st.composite(lambda d: _cut(d, body))())
    decoder = decoding.decoder_for(coding, streaming=data.draw(st.booleans()))
    assert decoder is not None
    out = b"".join(decoder.feed(p) for p in pieces) + decoder.drain()
    if body == _compress(coding, plain):
        assert (out, decoder.stopped) == (plain, None)
    else:
        assert decoder.stopped in (None, "bad_encoding")


def _compress(coding: str, data: bytes) -> bytes:
    import zlib

    import brotli
    import zstandard
    if coding == "gzip":
        return gzip.compress(data, mtime=0)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return brotli.compress(data, quality=4)
    return zstandard.ZstdCompressor().compress(data)
