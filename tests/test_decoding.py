"""Bounded decompression of the observer's copy: each chunk yields a bounded amount, a bomb stops
the decoder with its reason, and real bodies (text and JSON compress 3-20x) come out whole."""
from __future__ import annotations

import gzip
import random
import zlib

import brotli
import orjson
import pytest
import zstandard

from sidecar import decoding

CODINGS = {
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "deflate": zlib.compress,
    "br": lambda data: brotli.compress(data, quality=4),
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def _pieces(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("coding", sorted(CODINGS))
@pytest.mark.parametrize("streaming", [True, False])
def test_a_bomb_stops_the_decoder_after_a_bounded_output(coding: str, streaming: bool) -> None:
    bomb = CODINGS[coding](b"\0" * (64 << 20))  # 64 MB of zeros: some 64 KB or less
    decoder = decoding.decoder_for(coding, streaming)
    assert decoder is not None
    per_feed = decoding.FEED_OUT_STREAM if streaming else decoding.FEED_OUT_BODY
    total = 0
    for piece in _pieces(bomb):
        out = decoder.feed(piece)
        # zstd may finish the block it is in; brotli's buffer grows in steps, to twice the bound
        assert len(out) <= (2 * per_feed if coding == "br" else per_feed + (128 << 10))
        total += len(out)
    total += len(decoder.drain())
    assert decoder.stopped == "decompression_bomb"
    assert total <= decoding.RATIO_ALLOWANCE + 2 * per_feed + decoding.MAX_RATIO * len(bomb)
    assert total < 16 << 20


@pytest.mark.parametrize("coding", sorted(CODINGS))
def test_a_real_body_comes_out_whole(coding: str) -> None:
    rng = random.Random(5)
    words = [bytes(rng.choice(b"abcdefghij klmnop") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    doc = {"choices": [{"message": {"content": b" ".join(rng.choice(words) for _ in range(600_000)).decode()}}],
           "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2)  # ~4 MB of text
    for streaming in (True, False):
        decoder = decoding.decoder_for(coding, streaming)
        assert decoder is not None
        out = b"".join(decoder.feed(p) for p in _pieces(CODINGS[coding](body), 16384)) + decoder.drain()
        assert (decoder.stopped, out == body) == (None, True)


def test_bad_gzip_is_bad_encoding() -> None:
    decoder = decoding.decoder_for("gzip")
    assert decoder is not None
    assert decoder.feed(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xffnot deflate at all") == b""
    assert decoder.stopped == "bad_encoding" and decoder.feed(b"more") == b""


def test_past_the_total_cap_metering_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoding, "MAX_OUTPUT", 1 << 20)
    body = random.Random(1).randbytes(3 << 20)  # incompressible: no bomb, only big
    decoder = decoding.decoder_for("gzip")
    assert decoder is not None
    for piece in _pieces(gzip.compress(body)):
        decoder.feed(piece)
    assert decoder.stopped == "metering_cap"


def test_unknown_coding_is_refused() -> None:
    with pytest.raises(ValueError):
        decoding.decoder_for("compress")
    assert decoding.decoder_for("identity") is None
