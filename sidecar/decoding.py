"""Bounded, incremental decompression of response bodies, so observers read what the app receives
compressed without a small body inflating without end on the event loop.

The app always gets the compressed bytes as they came; only the observer's copy is inflated, and
within limits: at most `per_feed` bytes of output per chunk (brotli: up to twice that, as its
buffer grows in steps; what is left waits for the next chunk or the end), no more than MAX_RATIO times the input consumed (past a small allowance), at most
MAX_OUTPUT in all and MAX_BACKLOG of input waiting. Past a limit the decoder stops for good and
says why in `stopped` (the row's anomaly): `decompression_bomb`, `metering_cap` or, for bytes that
are not the coding they claim, `bad_encoding`.
"""
from __future__ import annotations

import zlib

import brotli
import zstandard

from .adapters.framing import MAX_JSON_BODY

# output per chunk: a streamed body is parsed event by event as it comes (costly per byte); a whole
# body is only collected until its end
FEED_OUT_STREAM = 256 * 1024
FEED_OUT_BODY = 1024 * 1024
# text and JSON compress 3-20x; a body that inflates 100x more than it consumed is a bomb
MAX_RATIO = 100
RATIO_ALLOWANCE = 1024 * 1024
MAX_OUTPUT = MAX_JSON_BODY
MAX_BACKLOG = 4 * 1024 * 1024
DRAIN_FEEDS = 8  # at the end of the body, what is still waiting is read in at most this many steps
_ZSTD_BLOCK_RATIO = 1 << 15  # zstd inflates at most ~32 KB per input byte (RLE blocks)


class Decoder:
    """Decodes successive chunks of one body; `feed` returns the output, b'' once `stopped`."""

    __slots__ = ("per_feed", "stopped", "total_in", "total_out", "_kind", "_z", "_pending", "_pending_size",
                 "_full")

    def __init__(self, kind: str, per_feed: int) -> None:
        self.per_feed = per_feed
        self.stopped: str | None = None
        self.total_in = 0
        self.total_out = 0
        self._kind = kind
        self._z: object | None = None
        self._pending = b""  # input not given to the decompressor yet (brotli, zstd)
        self._pending_size = 0
        self._full = False  # brotli: the last output filled its buffer
        if kind == "gzip":
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif kind == "br":
            self._z = brotli.Decompressor()
        elif kind == "zstd":
            self._z = zstandard.ZstdDecompressor().decompressobj()

    def feed(self, chunk: bytes) -> bytes:
        if self.stopped is not None:
            return b""
        self.total_in += len(chunk)
        try:
            out = self._step(chunk)
        except (zlib.error, brotli.error, zstandard.ZstdError):
            self._stop("bad_encoding")
            return b""
        self.total_out += len(out)
        if self.total_out > MAX_RATIO * (self.total_in - self.backlog) + RATIO_ALLOWANCE:
            self._stop("decompression_bomb")
        elif self.total_out > MAX_OUTPUT or self.backlog > MAX_BACKLOG:
            self._stop("metering_cap")
        return b"" if self.stopped else out

    def drain(self) -> bytes:
        """At the end of the body: the output still due for input already fed."""
        parts = []
        for _ in range(DRAIN_FEEDS):
            if not self.backlog or self.stopped:
                break
            parts.append(self.feed(b""))
        if self.backlog and self.stopped is None:
            self._stop("metering_cap")
        return b"" if self.stopped else b"".join(parts)

    @property
    def backlog(self) -> int:
        """Input bytes fed but not yet decompressed."""
        z = self._z
        if self._kind in ("gzip", "deflate"):
            return len(z.unconsumed_tail) if z is not None else 0  # type: ignore[attr-defined]
        if self._kind == "br" and z is not None and not z.is_finished() and (  # type: ignore[attr-defined]
                self._full or not z.can_accept_more_data()):  # type: ignore[attr-defined]
            return self._pending_size + 1  # brotli holds input (or output) itself: say at least one byte
        return self._pending_size

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        self._z = None
        self._pending, self._pending_size = b"", 0

    def _step(self, chunk: bytes) -> bytes:
        kind = self._kind
        if kind == "deflate" and self._z is None:
            if not chunk:
                return b""
            # "deflate" is zlib-wrapped by the spec, raw deflate in practice from some servers
            self._z = zlib.decompressobj(zlib.MAX_WBITS if chunk[:1] == b"\x78" else -zlib.MAX_WBITS)
        z = self._z
        if kind in ("gzip", "deflate"):
            if z.eof:  # type: ignore[union-attr]
                return b""  # bytes after the end of the stream: not part of the body
            tail = z.unconsumed_tail  # type: ignore[union-attr]
            return z.decompress(tail + chunk if tail else chunk, self.per_feed)  # type: ignore[union-attr]
        if kind == "br":
            if z.is_finished():  # type: ignore[union-attr]
                return b""
            if z.can_accept_more_data():  # type: ignore[union-attr]
                data = self._pending + chunk if self._pending else chunk
                self._pending, self._pending_size = b"", 0
            else:
                self._add_pending(chunk)
                data = b""
            out = z.process(data, output_buffer_limit=self.per_feed)  # type: ignore[union-attr]
            # a full buffer may leave output inside brotli even when it says it takes more input
            self._full = len(out) >= self.per_feed
            return out
        # zstd has no output bound: it gets the input in slices small enough that none can inflate
        # past what is left of this feed's allowance
        if z.eof:  # type: ignore[union-attr]
            return b""
        data = self._pending + chunk if self._pending else chunk
        parts: list[bytes] = []
        made = i = 0
        while i < len(data) and made < self.per_feed and not z.eof:  # type: ignore[union-attr]
            step = max(64, (self.per_feed - made) // _ZSTD_BLOCK_RATIO)
            out = z.decompress(data[i : i + step])  # type: ignore[union-attr]
            i += step
            if out:
                parts.append(out)
                made += len(out)
        self._pending = data[i:] if i < len(data) and not z.eof else b""  # type: ignore[union-attr]
        self._pending_size = len(self._pending)
        return b"".join(parts)

    def _add_pending(self, chunk: bytes) -> None:
        if chunk:
            self._pending += chunk  # bounded by MAX_BACKLOG: past it the decoder stops
            self._pending_size = len(self._pending)


def decoder_for(content_encoding: str, streaming: bool = False) -> Decoder | None:
    """A decoder of successive chunks; None for identity. Raises ValueError for unknown codings."""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    per_feed = FEED_OUT_STREAM if streaming else FEED_OUT_BODY
    if coding in ("gzip", "x-gzip"):
        return Decoder("gzip", per_feed)
    if coding in ("deflate", "br", "zstd"):
        return Decoder(coding, per_feed)
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")
