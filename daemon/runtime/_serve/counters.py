"""Request counters of one service, as one writer counts them: what ``GET /metrics`` reports as
``modeld_service_requests_total{code}`` and ``modeld_service_request_duration_seconds`` (written and
parsed only here; the daemon, the built-in server and the gateway import this module).

File: ``$MODELD_HOME/run/requests/<uuid>.<via>``, ``SIZE`` bytes, native-endian 64-bit words:

    word 0                   MAGIC (the layout's version)
    word 1                   the sum of the request durations, in seconds (a float64)
    word 2                   which blocks of 8 status words below have been counted in (bit i: words
                             CODES + 8i ..), so that a reader looks at those only
    words 3 .. 3+len(BOUNDS) the duration histogram: requests that took <= BOUNDS[i], not cumulative;
                             the last word counts those over BOUNDS[-1] (le="+Inf")
    then 501 words           requests by status: word CODES + (status - 100) for 100..599, the last
                             one for a status outside that range

``via`` names the writer, so that a request is counted once, by the first modeld process it meets:

* ``gateway``: the gateway, for every request it forwards to the service (to a built-in or a
  ``command`` server alike), with its own answers to them (502, 504, a wake that failed); a request
  whose client went away before any response head counts as 499 (nginx's "client closed request");
* ``direct``: a built-in server, for every request that did not come through the gateway (those
  carry the gateway's ``via: 1.1 modeld``) and is not one of the daemon's probes; and the daemon, for
  the requests it answers itself on the socket of a scaled-to-zero service whose wake failed
  (``waiting.answer_waiting``: 503, 504).

A request to a ``command`` server that does not pass through the gateway is not seen by modeld.

The writer creates the file (0600) and maps it; a request costs a few memory writes in the map
(``RequestCounters.observe``): no system call, no lock, nothing the request waits for. The daemon
maps it read-only and reads it in place at scrape time (``Mapped``). A writer that starts keeps the counts it
finds (a restarted server's counter goes on), so they only ever grow while the service exists; the
daemon removes the files when the service is deleted. Two writers of one file at once (the old and
the new server during a replace, two gateways during a gateway restart) may each lose an increment
to the other in a rare race: the counts are exact otherwise. Standard library only.
"""

from __future__ import annotations

import bisect
import mmap
import os
from time import perf_counter
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    from .activity import ActivityWriter

    Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

MAGIC = 0x3230_5152_444D  # "MDRQ02", little-endian
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SEEN = 2  # the word of the blocks of status words in use
BUCKETS = 3  # first word of the histogram
CODES = BUCKETS + len(BOUNDS) + 1  # first word of the counts by status
OTHER = 500  # the slot of a status outside 100..599
WORDS = CODES + OTHER + 1
SIZE = 8192  # (WORDS * 8 = 4272 bytes, rounded up to two pages: room to grow)
CLIENT_GONE = 499  # nginx's "client closed request": the client left before the response's head
PROBE_HEADER = b"x-modeld-probe"  # the daemon's probes (not counted)
VIA_GATEWAY = b"1.1 modeld"  # the gateway's via header on what it forwards (counted by the gateway)


class RequestCounters:
    """The writer's end (one thread: the built-in server's or the gateway's event loop)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fresh = os.fstat(fd).st_size != SIZE
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)  # (the map keeps the file)
        self._words = memoryview(self._map).cast("Q")
        self._sum = memoryview(self._map)[8:16].cast("d")
        if self._words[0] != MAGIC:  # new, or another layout: start from zero
            self._map[:] = bytes(SIZE)
            self._words[0] = MAGIC

    def observe(self, status: int, seconds: float) -> None:
        """One request ended with ``status`` after ``seconds``: four words written in the map."""
        words = self._words
        words[BUCKETS + bisect.bisect_left(BOUNDS, seconds)] += 1
        self._sum[0] += seconds
        index = status - 100
        index = index if 0 <= index < OTHER else OTHER
        words[CODES + index] += 1
        words[SEEN] |= 1 << (index >> 3)

    def close(self) -> None:
        self._words.release()
        self._sum.release()
        self._map.close()


class Counts(NamedTuple):
    codes: dict[str, int]  # status (as a label: "200", "other") -> requests
    buckets: list[int]  # not cumulative, len(BOUNDS) + 1
    sum: float


def read(path: str) -> Counts | None:
    """The counts in the file at ``path``; None if there is none (or it is not one of these files)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, WORDS * 8, 0)
    finally:
        os.close(fd)
    if len(data) < WORDS * 8:
        return None
    view = memoryview(data)
    return _parse(view.cast("Q"), view[8:16].cast("d"))


def _parse(words: memoryview[int], total: memoryview[float]) -> Counts | None:
    """The counts in ``words`` (the file's words; ``total``: word 1 as a double)."""
    if words[0] != MAGIC:
        return None
    buckets = words[BUCKETS:CODES].tolist()
    if not any(buckets):
        return Counts({}, buckets, 0.0)
    codes: dict[str, int] = {}
    seen = words[SEEN]
    while seen:  # (a few blocks of 8 words, of the 63)
        block = (seen & -seen).bit_length() - 1
        seen &= seen - 1
        for index in range(block * 8, min(block * 8 + 8, OTHER + 1)):
            if n := words[CODES + index]:
                codes[str(index + 100) if index < OTHER else "other"] = n
    return Counts(codes, buckets, total[0])


class Mapped:
    """The daemon's end for ``GET /metrics``, which reads every file again at each scrape: each file
    mapped once, read-only, and read in place, so a scrape makes no system call per file (an open, a
    pread and a close each were a third of a scrape's time with 100 services). A reading touches the
    file's first page only (unless a status of 593 or more was counted): the writer's own page cache,
    4 KiB of the daemon's RSS per file. A file replaced (another inode) is mapped again; one gone is
    unmapped at the next ``scan``."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[int, mmap.mmap, memoryview[int], memoryview[float]]] = {}
        self._last: dict[str, tuple[bytes, Counts]] = {}  # each file's last reading, by its first words

    def scan(self, folder: str) -> dict[str, int]:
        """The folder's files now, name to inode (one listing: the inodes come with the names); the
        maps of files gone or replaced are dropped."""
        try:
            with os.scandir(folder) as entries:
                found = {e.name: e.inode() for e in entries}
        except FileNotFoundError:
            found = {}
        for name in [n for n, m in self._maps.items() if found.get(n) != m[0]]:
            self._drop(name)
        return found

    def read(self, folder: str, name: str) -> Counts | None:
        """The counts in ``folder/name`` (a name ``scan`` returned); None if it is not one of these files."""
        kept = self._maps.get(name)
        if kept is None:
            try:
                fd = os.open(f"{folder}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            try:
                stat = os.fstat(fd)
                if stat.st_size < SIZE:  # (being made: read at the next scrape; a map past EOF would fault)
                    return None
                m = mmap.mmap(fd, WORDS * 8, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            view = memoryview(m)
            kept = self._maps[name] = (stat.st_ino, m, view.cast("Q"), view[8:16].cast("d"))
            view.release()
        head = kept[1][: CODES * 8]  # the magic, the sum and the histogram: every request changes them
        last = self._last.get(name)
        if last is not None and last[0] == head:
            return last[1]  # (as it was: not parsed again)
        found = _parse(kept[2], kept[3])
        if found is not None and sum(found.buckets) == sum(found.codes.values()):  # (no request half-counted)
            self._last[name] = (head, found)
        return found

    def _drop(self, name: str) -> None:
        _inode, m, words, total = self._maps.pop(name)
        self._last.pop(name, None)
        words.release()
        total.release()
        m.close()


class MeasureRequests:
    """ASGI middleware of the built-in server: each HTTP request counted in ``counters`` (unless it
    came through the gateway) and in the on-demand ``activity`` file (see activity.py), except the
    daemon's probes. The status is read from the response's start message as it passes; 499 if the
    client had gone by then (uvicorn drops a response to a closed connection without a word: its
    request cycle's ``disconnected``, or an ``http.disconnect`` the app received, says so)."""

    def __init__(self, app: Asgi, counters: RequestCounters | None, activity: ActivityWriter | None) -> None:
        self.app = app
        self.counters = counters
        self.activity = activity

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counters = self.counters
        for key, value in scope["headers"]:
            if key == PROBE_HEADER:
                await self.app(scope, receive, send)
                return
            if key == b"via" and VIA_GATEWAY in value:
                counters = None  # the gateway counts it
        activity = self.activity
        if activity is not None:
            activity.begin()
        if counters is None:
            try:
                await self.app(scope, receive, send)
            finally:
                if activity is not None:
                    activity.end()
            return
        status = 0  # (none yet)
        told_gone = False
        cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle (h11 and httptools alike)

        def gone() -> bool:
            return told_gone or bool(getattr(cycle, "disconnected", False))

        async def receive_noted() -> dict[str, Any]:
            nonlocal told_gone
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect" and not status:
                told_gone = True
            return message

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and not status:
                status = CLIENT_GONE if gone() else message["status"]
            await send(message)

        started = perf_counter()
        try:
            await self.app(scope, receive_noted, send_status)
        finally:
            # An app that raised before its response: uvicorn answers 500, unless no one is there.
            counters.observe(status or (CLIENT_GONE if gone() else 500), perf_counter() - started)
            if activity is not None:
                activity.end()
