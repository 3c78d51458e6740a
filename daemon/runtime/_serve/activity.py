"""The activity file of an on-demand service: what "idle" is measured by (written and parsed only here).

Format (docs/on-demand-design.md): ``$MODELD_HOME/run/activity/<uuid>``, exactly 16 bytes,
``struct.pack("<dII", last, in_flight, requests)``:

    last       time.time() of the start or end of the most recent counted request (0.0: none yet)
    in_flight  counted requests under way
    requests   counted requests so far (wraps at 2**32)

One writer per file (a built-in server counts its own requests, except the daemon's probes, which
carry ``x-modeld-probe: 1``; the gateway counts those of command servers). The writer creates it
(0600) and updates it in place through mmap, never by rename: an update is a ``pack_into`` of 16
bytes into shared memory, no system call, so counting costs a request nothing measurable. The
daemon reads it with one ``pread`` (``read``); a missing or short file reads as no request yet.

A writer that starts sets ``in_flight`` to 0 (a server killed mid-request left it counted) and
keeps ``last`` and ``requests``. This module imports only the standard library: the daemon imports it too.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

FORMAT = struct.Struct("<dII")
SIZE = FORMAT.size  # 16
PROBE_HEADER = b"x-modeld-probe"  # the daemon's probes carry it (value "1"); they are not counted


class ActivityWriter:
    """The writer's end: ``begin`` at a request's start, ``end`` at its end (same thread, no lock:
    the built-in server counts on its event loop)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.last, _stale, self.requests = FORMAT.unpack_from(self._map)
        self.in_flight = 0
        self._write()

    def _write(self) -> None:
        FORMAT.pack_into(self._map, 0, self.last, self.in_flight, self.requests)

    def begin(self) -> None:
        self.in_flight += 1
        self.requests = (self.requests + 1) & 0xFFFFFFFF
        self.last = time.time()
        self._write()

    def end(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last = time.time()
        self._write()

    def close(self) -> None:
        self._map.close()


def read(path: str) -> tuple[float, int, int] | None:
    """(last, in_flight, requests), or None if there is no file or it is short (no request yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, SIZE, 0)
    finally:
        os.close(fd)
    if len(data) < SIZE:
        return None
    last, in_flight, requests = FORMAT.unpack(data)
    return last, in_flight, requests


class CountRequests:
    """ASGI middleware: every HTTP request counted in ``writer``, except the daemon's probes."""

    def __init__(self, app: Asgi, writer: ActivityWriter) -> None:
        self.app = app
        self.writer = writer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or any(key == PROBE_HEADER for key, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        self.writer.begin()
        try:
            await self.app(scope, receive, send)
        finally:
            self.writer.end()
