"""The activity files the gateway writes: what the daemon's idle checker reads for ``command`` servers.

Format (docs/on-demand-design.md, the contract shared with the daemon): ``run/activity/<uuid>``,
exactly 16 bytes, ``struct.pack("<dII", last, in_flight, requests)``:

* ``last``: ``time.time()`` of the start or end of the most recent counted request (0.0: none yet);
* ``in_flight``: counted requests under way;
* ``requests``: counted requests so far (wraps at 2**32).

The gateway is the file's only writer for a ``command`` service with an ``idle_timeout`` (a built-in
server writes its own): it counts every request it forwards to that service, from when it starts
forwarding (a request waiting for a wake included) until the response ends or either side goes away.
The file is created 0600 and sized once, mapped once per service, and updated in place with
``struct.pack_into`` on the map: no system call per request (``time.time`` is a vDSO call), never a
rename. The daemon reads it with ``pread``.

A gateway that starts (after a kill -9 of the last one, say) maps the file and sets ``in_flight`` to
0: the requests another gateway counted died with its connections. It keeps ``last`` and
``requests``. Standard library only.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

FORMAT = struct.Struct("<dII")
SIZE = FORMAT.size  # 16
WRAP = 0xFFFFFFFF


class Activity:
    """One service's activity file, mapped; ``begin``/``end`` bracket each counted request."""

    __slots__ = ("path", "map", "last", "in_flight", "requests")

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != SIZE:
                os.ftruncate(fd, SIZE)
            self.map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)  # (the map keeps the file)
        last, _in_flight, requests = FORMAT.unpack_from(self.map)
        self.last, self.in_flight, self.requests = last, 0, requests
        FORMAT.pack_into(self.map, 0, self.last, 0, self.requests)

    def begin(self) -> None:
        self.in_flight += 1
        self.requests = (self.requests + 1) & WRAP
        self.last = time.time()
        FORMAT.pack_into(self.map, 0, self.last, self.in_flight, self.requests)

    def end(self) -> None:
        self.in_flight -= 1
        self.last = time.time()
        FORMAT.pack_into(self.map, 0, self.last, self.in_flight, self.requests)

    def removed(self) -> bool:
        """The daemon removed the file (the service was deleted): this map names nothing it reads."""
        try:
            return os.stat(self.path).st_size != SIZE
        except OSError:
            return True

    def close(self) -> None:
        """Unmapped; ``in_flight`` left at 0, since requests this gateway counted end with it."""
        if not self.map.closed:
            FORMAT.pack_into(self.map, 0, self.last, 0, self.requests)
            self.map.close()


class Activities:
    """The activity files of the table's counted services (``Entry.counted``), by uuid, each opened once."""

    def __init__(self, folder: Path | None):
        self.folder = folder  # None: no home (a static table), nothing is written
        self.open: dict[str, Activity] = {}
        self.failed: set[str] = set()  # tried and could not (logged once; tried again on the next table)

    def of(self, uuid: str) -> Activity | None:
        found = self.open.get(uuid)
        if found is not None or self.folder is None or uuid in self.failed:
            return found
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            found = self.open[uuid] = Activity(self.folder / uuid)
        except (OSError, ValueError) as exc:
            self.failed.add(uuid)
            print(
                f"gateway: cannot write the activity of service {uuid} ({exc}); its idle stop will not see requests", flush=True
            )
        return found

    def keep(self, counted: set[str]) -> None:
        """A new table: close the files of services no longer counted (deleted, or no idle_timeout now)."""
        self.failed.clear()
        for uuid in list(self.open):
            activity = self.open[uuid]
            # One writer per file: a map with requests under way is kept until the next table.
            if activity.in_flight == 0 and (uuid not in counted or activity.removed()):
                del self.open[uuid]
                activity.close()

    def close(self) -> None:
        for activity in self.open.values():
            activity.close()
        self.open.clear()
