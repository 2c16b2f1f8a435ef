"""The local socket between a forwarder and the sinks process: one request and one answer per connection.

A frame is a 4-byte big-endian length and a pickle. Pickle, because both ends are this code base
run by one user, and the answers are our own dataclasses (budget history, rules, Decimals); the
socket lives in a directory only that user can enter (mode 0700), so nobody else can send one.
One connection per request keeps cancellation simple: a forwarder that stops waiting (its HTTP
client went away) closes the connection, and the sinks process interrupts what it was doing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("meterline.rpc")

_LEN = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # an SQL answer of 100,000 wide rows fits


class Unavailable(Exception):
    """The sinks process does not answer (not started yet, restarting, or gone)."""


class Failed(Exception):
    """The sinks process answered with an error (its message is the text)."""


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def _read(reader: asyncio.StreamReader) -> Any:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return pickle.loads(await reader.readexactly(size))


Handler = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


async def serve(path: str, handle: Handler) -> asyncio.AbstractServer:
    """Answers requests `(op, args)` with `handle(op, args)`; an exception goes back as its text.
    A handler still running when its connection closes is cancelled."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            op, args = await _read(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, pickle.UnpicklingError):
            writer.close()
            return
        task = asyncio.ensure_future(handle(op, args))
        gone = asyncio.ensure_future(reader.read(1))  # EOF: the asker stopped waiting
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - cancelled on purpose
                    pass
                return
            try:
                answer = (True, task.result())
            except Exception as e:  # noqa: BLE001 - the asker gets the message
                answer = (False, f"{e}" or type(e).__name__)
            writer.write(_frame(answer))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            gone.cancel()
            writer.close()

    if os.path.exists(path):
        os.unlink(path)  # left by a process that was killed
    server = await asyncio.start_unix_server(on_connection, path, limit=1 << 20)
    os.chmod(path, 0o600)
    return server


async def call(path: str, op: str, *args: Any, timeout: float | None = 30.0) -> Any:
    """One request to the sinks process from an event loop. Raises Unavailable or Failed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20), 5.0)
    except (OSError, asyncio.TimeoutError) as e:
        raise Unavailable(f"the sinks process does not answer ({_why(e)})") from None
    try:
        writer.write(_frame((op, args)))
        ok, value = await asyncio.wait_for(_read(reader), timeout)
    except asyncio.TimeoutError:
        raise Unavailable(f"the sinks process did not answer {op} within {timeout:.0f} s") from None
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise Unavailable(f"the sinks process went away during {op} ({_why(e)})") from None
    finally:
        writer.close()
    if not ok:
        raise Failed(value)
    return value


def call_blocking(path: str, op: str, *args: Any, timeout: float = 30.0) -> Any:
    """The same from a thread without an event loop (the supervisor's readiness check)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise Unavailable(f"the sinks process does not answer ({_why(e)})") from None
        s.sendall(_frame((op, args)))
        buf = b""
        try:
            while len(buf) < _LEN.size or len(buf) < _LEN.size + _LEN.unpack(buf[:_LEN.size])[0]:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise Unavailable(f"the sinks process went away during {op}")
                buf += chunk
        except (socket.timeout, OSError) as e:
            raise Unavailable(f"the sinks process did not answer {op} ({_why(e)})") from None
    ok, value = pickle.loads(buf[_LEN.size:])
    if not ok:
        raise Failed(value)
    return value


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or type(e).__name__
