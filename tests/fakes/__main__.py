"""Run the fake providers in the foreground: ``python -m tests.fakes --port N``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .scenarios import DEFAULT_CHUNK_DELAY_MS, DEFAULT_CHUNKS
from .server import FakeProvider


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--scenario", default="", help="default x-fake-scenario for requests without the header")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS)
    parser.add_argument("--chunk-delay-ms", type=float, default=DEFAULT_CHUNK_DELAY_MS)
    parser.add_argument("--no-auth", action="store_true", help="do not require API keys")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    fake = FakeProvider(
        default_scenario=args.scenario,
        chunks=args.chunks,
        chunk_delay_ms=args.chunk_delay_ms,
        require_auth=not args.no_auth,
    )
    await fake.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake providers listening on {fake.base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
