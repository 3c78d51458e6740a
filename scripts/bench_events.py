"""The events figure (issue 14), run by ``scripts/bench.py`` in its home of live servers.

| figure            | how                                                                                 |
|-------------------|-------------------------------------------------------------------------------------|
| event_latency_ms  | kill -9 of a live built-in server (t0, just before the kill) until its ``exited`` event |
|                   | is read by a client streaming ``GET /v1/events`` (``DaemonClient.events``, in a thread); |
|                   | each sample kills the next live server in turn (a server killed again and again soon |
|                   | would be given up: ``max_restarts``) and waits for its restart to be healthy        |

The streaming client (:class:`EventWatch`) is started before the idle daemon is measured and follows
it across the re-adoptions (each a daemon restart: it reconnects and reads the gap), so the daemon's
RSS and idle CPU figures are taken with one client streaming events.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from daemon import DaemonClient
from daemon.testing import wait_for


class EventWatch:
    """One client following the daemon's events in a thread; the time each ``exited`` is read."""

    def __init__(self, home: Path):
        self.client = DaemonClient(home=home, auto_start=False)
        self.count = 0
        self.gaps = 0
        self.exits: dict[str, list[float]] = {}  # uuid -> perf_counter() when each exited event was read
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._follow, name="events", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for event in self.client.events():
                read = time.perf_counter()
                with self._changed:
                    self.count += 1
                    self.gaps += event["type"] == "gap"
                    if event["type"] == "exited":
                        self.exits.setdefault(event["uuid"], []).append(read)
                    self._changed.notify_all()
        except Exception as exc:  # (the bench's end: its home is gone) said in the result
            self.error = exc

    def exits_of(self, uuid: str) -> int:
        with self._changed:
            return len(self.exits.get(uuid, []))

    def wait_exit(self, uuid: str, seen: int, timeout: float) -> float:
        """When exited number ``seen + 1`` of ``uuid`` was read (perf_counter); TimeoutError if it was not in time."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.exits.get(uuid, [])) > seen, timeout):
                raise TimeoutError(f"no exited event of {uuid} read within {timeout:g} s")
            return self.exits[uuid][seen]


def event_latency(home: Path, watch: EventWatch, uuids: list[str], runs: int, note: Any) -> list[float]:
    """``runs`` samples of kill -9 of a server (of ``uuids`` in turn) until its exited event is read
    (seconds); ``note(pid)``: the bench's reaper notes each new server."""
    samples = []
    with DaemonClient(home=home) as client:
        for i in range(runs):
            uuid = uuids[i % len(uuids)]
            svc = wait_for(lambda: (s := client.get(uuid)).is_running and s.status.pid and s, 30, 0.005, "a live server")
            seen = watch.exits_of(uuid)
            start = time.perf_counter()
            os.kill(svc.status.pid, signal.SIGKILL)
            samples.append(watch.wait_exit(uuid, seen, 30) - start)
            old = svc.status.pid
            new = wait_for(lambda: (s := client.get(uuid)).is_running and s.status.pid not in (None, old) and s, 30, 0.005,
                           "the restart")
            note(new.status.pid)
    return samples
