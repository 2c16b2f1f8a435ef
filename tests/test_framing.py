"""Incremental framing: SSE events and streamed JSON arrays come out whole however the bytes are cut,
at a cost linear in the bytes, and an event past the cap stops the splitter instead of filling memory."""
import random
import time

import orjson

from sidecar.adapters.framing import MAX_EVENT, JsonArraySplitter, SseSplitter

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


def test_splitters_do_not_rescan_or_copy_what_they_hold() -> None:
    """An event of nearly MAX_EVENT fed 2 KB at a time costs what its bytes cost: the tail is neither
    copied nor searched again per chunk (before, each chunk cost a copy, for SSE also a scan, of the
    whole tail: some 4 GB of copying here)."""
    piece = b"a" * 2048
    for splitter, opening in ((SseSplitter(), b'data: {"x":"'), (JsonArraySplitter(), b'[{"x":"')):
        splitter.feed(opening)
        t = time.perf_counter()
        for _ in range((MAX_EVENT - 65536) // len(piece)):
            splitter.feed(piece)
        took = time.perf_counter() - t
        assert not splitter.overflow
        assert took < 0.1, f"{type(splitter).__name__}: {took:.3f} s for {MAX_EVENT >> 20} MB in 2 KB chunks"


def test_an_event_past_the_cap_stops_the_splitter_and_frees_it() -> None:
    splitter = SseSplitter()
    assert [e.data for e in splitter.feed(b"data: 1\n\ndata: ")] == [b"1"]
    piece = b"x" * 65536
    for _ in range(MAX_EVENT // len(piece) + 1):
        splitter.feed(piece)
    assert splitter.overflow and len(splitter.tail) == 0
    assert splitter.feed(b"\n\ndata: 2\n\n") == [] and splitter.flush() is None

    array = JsonArraySplitter()
    assert array.feed(b'[{"a":1},{"b":"') == [b'{"a":1}']
    for _ in range(MAX_EVENT // len(piece) + 1):
        array.feed(piece)
    assert array.overflow and len(array.buf) == 0
    assert array.feed(b'"},{"c":2}]') == []


def test_event_ends_split_across_chunks_at_every_byte() -> None:
    body = b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\r\n"
    for cut in range(1, len(body)):
        for second in range(cut, len(body)):
            splitter = SseSplitter()
            events = splitter.feed(body[:cut]) + splitter.feed(body[cut:second]) + splitter.feed(body[second:])
            assert [e.data for e in events] == [b"a", b"b", b"c", b"d"]
            assert b"".join(e.raw for e in events) == body
