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

Alone, for work on this figure (``PYTHONPATH=$PWD python scripts/bench_events.py [--live N] [--runs N]``):
a home with N live built-in servers (100 by default) and one streaming client; prints one JSON
object with ``event_latency_ms`` and its two parts, ``exit_to_emit_ms`` (kill until the event's
``time``, as the daemon stamped it: wall clocks, same machine) and ``emit_to_read_ms``, and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
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
        self.stamps: dict[str, list[tuple[float, float]]] = {}  # uuid -> (the event's time, time.time() when read)
        self.signals: list[int | None] = []  # the signal each exited event carries (None: none, the code unknown)
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
                        self.stamps.setdefault(event["uuid"], []).append((event["time"], time.time()))
                        self.signals.append(event.get("signal"))
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


def event_latency(
    home: Path, watch: EventWatch, uuids: list[str], runs: int, note: Any, parts: list[tuple[float, float]] | None = None
) -> list[float]:
    """``runs`` samples of kill -9 of a server (of ``uuids`` in turn) until its exited event is read
    (seconds); ``note(pid)``: the bench's reaper notes each new server. ``parts``, if given, gets
    (kill until the event's time, the event's time until read) of each sample, by the wall clock."""
    samples = []
    with DaemonClient(home=home) as client:
        for i in range(runs):
            uuid = uuids[i % len(uuids)]
            svc = wait_for(lambda: (s := client.get(uuid)).is_running and s.status.pid and s, 30, 0.005, "a live server")
            seen = watch.exits_of(uuid)
            wall, start = time.time(), time.perf_counter()
            os.kill(svc.status.pid, signal.SIGKILL)
            samples.append(watch.wait_exit(uuid, seen, 30) - start)
            if parts is not None:
                stamped, read = watch.stamps[uuid][seen]
                parts.append((stamped - wall, read - stamped))
            old = svc.status.pid
            new = wait_for(lambda: (s := client.get(uuid)).is_running and s.status.pid not in (None, old) and s, 30, 0.005,
                           "the restart")
            note(new.status.pid)
    return samples


def main() -> int:
    import bench  # (here only: bench imports this module)

    parser = argparse.ArgumentParser(description="event_latency_ms alone (see the module docstring)")
    parser.add_argument("--live", type=int, default=100, help="live built-in servers (default 100)")
    parser.add_argument("--runs", type=int, default=30, help="kills (default 30)")
    parser.add_argument("--readopt", action="store_true", help="restart the daemon first: the servers killed are adopted ones, "
                        "as in scripts/bench.py (which measures after its re-adoptions)")
    args = parser.parse_args()
    reaper = bench.Reaper()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mdev") as tmp:
        folder = Path(tmp)
        home = folder / "h"
        reaper.homes.append(home)
        (folder / "m.py").write_text(bench.MODEL)
        try:
            with DaemonClient(home=home) as client:
                reaper.note(client.daemon_info()["pid"])
                bench.progress(f"deploying {args.live} live servers")
                live = bench.deploy_live(home, folder, args.live, reaper)
                if args.readopt:
                    client.shutdown()  # the servers stay; the next call starts a daemon that adopts them
                    wait_for(lambda: not (home / "modeld.sock").exists(), 20, 0.01, "the daemon to exit")
                    reaper.note(client.daemon_info()["pid"])
                    wait_for(lambda: len(client.find(running=True)) == args.live, 30, 0.05, "all re-adopted")
                watch = EventWatch(home)
                bench.progress(f"{args.runs} kills")
                parts: list[tuple[float, float]] = []
                samples = event_latency(home, watch, [str(s.uuid) for s in live], args.runs, reaper.note, parts)
                client.shutdown(stop_services=True)
                reaper.wait_daemons(20)
        finally:
            reaper.kill_all()
    result = {
        "event_latency_ms": bench.summary(samples, 1000),
        "exit_to_emit_ms": bench.summary([a for a, _ in parts], 1000),
        "emit_to_read_ms": bench.summary([b for _, b in parts], 1000),
        "samples_ms": [round(x * 1000, 2) for x in samples],
        "exited_with_signal_9": f"{watch.signals.count(9)} of {len(watch.signals)}",
        "live": args.live,
        "readopt": args.readopt,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
