"""Incremental decompression of response bodies, so observers read what the app receives compressed."""
from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli
import zstandard

Decoder = Callable[[bytes], bytes]


def decoder_for(content_encoding: str) -> Decoder | None:
    """A function decoding successive chunks; None for identity. Raises ValueError for unknown codings."""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if coding == "deflate":
        return _deflate()
    if coding == "br":
        return brotli.Decompressor().process
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")


def _deflate() -> Decoder:
    # "deflate" is zlib-wrapped by the spec, raw deflate in practice from some servers
    state: dict[str, zlib._Decompress] = {}

    def decode(chunk: bytes) -> bytes:
        d = state.get("d")
        if d is None:
            d = state["d"] = zlib.decompressobj(zlib.MAX_WBITS if chunk[:1] == b"\x78" else -zlib.MAX_WBITS)
        return d.decompress(chunk)

    return decode
