"""Incremental framing: SSE events and streamed JSON arrays come out whole however the bytes are cut."""
import random

import orjson

from sidecar.adapters.framing import JsonArraySplitter, SseSplitter

OBJECTS = [{"a": 'x\\"}{"\\\\', "b": [1, {"c": "}"}]}, {"usageMetadata": {"promptTokenCount": 3}}, {"z": "\\\\"}]
SSE = b'event: a\ndata: {"x":1}\n\ndata: 2\r\n\r\ndata: 3\ndata: 4\n\n'


def _cuts(rng: random.Random, n: int, most: int) -> list[int]:
    return sorted(rng.sample(range(1, n), rng.randint(0, min(most, n - 1)))) + [n]


def test_json_array_elements_survive_any_cut() -> None:
    body = b"[" + b",\r\n".join(orjson.dumps(o) for o in OBJECTS) + b"]"
    rng = random.Random(7)
    for _ in range(2000):
        splitter, out, prev = JsonArraySplitter(), [], 0
        for cut in _cuts(rng, len(body), 20):
            out += splitter.feed(body[prev:cut])
            prev = cut
        assert [orjson.loads(o) for o in out] == OBJECTS


def test_sse_events_survive_any_cut_and_keep_their_bytes() -> None:
    rng = random.Random(11)
    for _ in range(1000):
        splitter, events, prev = SseSplitter(), [], 0
        for cut in _cuts(rng, len(SSE), 10):
            events += splitter.feed(SSE[prev:cut])
            prev = cut
        assert [(e.event, e.data) for e in events] == [("a", b'{"x":1}'), (None, b"2"), (None, b"3\n4")]
        assert b"".join(e.raw for e in events) == SSE
