"""What ``modeld top`` shows, apart from how: the daemon's ``/metrics`` text read back into numbers
(:func:`parse_metrics`), two scrapes turned into per-service rows with CPU and request rates
(:class:`Sampler`), and the events followed in a thread (:class:`EventFeed`)."""

from __future__ import annotations

import collections
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from daemon import exceptions as exc
from daemon.client import DaemonClient
from daemon.models import BaseService

# One sample line of Prometheus' text format: name, {labels} (optional), value (a timestamp may follow).
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+(-?\d+))?")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str, names: frozenset[str] | None = None, times: dict[tuple[str, str], float] | None = None) -> Samples:
    """The samples of a scrape by metric name, each (labels, value); only those of ``names`` if given.

    Enough of the exposition format (0.0.4) for what the daemon writes: comments are skipped, label
    values unescaped, a line that is not a sample is ignored rather than refused. A sample's own
    time (the daemon gives one with a server's memory and CPU: when it read them) goes into
    ``times``, if given, by (name, uuid), in seconds.
    """
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None or (names is not None and m.group(1) not in names):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = {k: re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], v) for k, v in _LABEL.findall(m.group(2) or "")}
        out.setdefault(m.group(1), []).append((labels, value))
        if times is not None and m.group(4) is not None:
            times[(m.group(1), labels.get("uuid", ""))] = int(m.group(4)) / 1000
    return out


_PER_SERVICE = {
    "restarts": "modeld_service_restarts_total",
    "memory": "modeld_service_memory_bytes",
    "cpu": "modeld_service_cpu_seconds_total",
    "requests": "modeld_service_requests_total",
    "start_time": "modeld_service_start_time_seconds",
}
CPU_WINDOW = 6.0  # seconds a CPU % is averaged over (see Sampler._cpu_over_a_window)
_NAMES = frozenset([*_PER_SERVICE.values(), "process_resident_memory_bytes", "process_cpu_seconds_total"])


@dataclass
class Scrape:
    """One scrape's numbers: per service uuid (requests summed over ``via`` and ``code``), and the daemon's."""

    at: float
    services: dict[str, dict[str, float]]
    daemon_rss: float | None
    daemon_cpu: float | None


def scrape_of(text: str, at: float) -> Scrape:
    times: dict[tuple[str, str], float] = {}
    samples = parse_metrics(text, _NAMES, times)
    services: dict[str, dict[str, float]] = {}
    for key, name in _PER_SERVICE.items():
        for labels, value in samples.get(name, []):
            if uuid := labels.get("uuid"):
                numbers = services.setdefault(uuid, {})
                numbers[key] = numbers.get(key, 0.0) + value
                if (read := times.get((name, uuid))) is not None:
                    numbers[key + "_at"] = read  # (cpu_at: when the daemon read it)
    rss = samples.get("process_resident_memory_bytes", [])
    cpu = samples.get("process_cpu_seconds_total", [])
    return Scrape(at, services, rss[0][1] if rss else None, cpu[0][1] if cpu else None)


def rate(new: float | None, old: float | None, seconds: float) -> float | None:
    """A counter's rate between two scrapes; a counter that went down was reset (a restart): its new
    value is what it counted since, as Prometheus' ``rate`` takes it."""
    if new is None or old is None or seconds <= 0:
        return None
    return (new - old if new >= old else new) / seconds


@dataclass
class Row:
    uuid: str
    name: str
    state: str
    uptime: float | None
    restarts: int
    memory: float | None
    cpu: float | None  # % of one core over the last interval
    rps: float | None
    last_event: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def rows_of(services: list[BaseService], new: Scrape, old: Scrape | None, last_events: dict[str, dict[str, Any]]) -> list[Row]:
    """One row per service, in the order of their names; rates from ``old`` to ``new`` (None without ``old``)."""
    rows = []
    for svc in sorted(services, key=lambda s: (s.config.name or s.config.model_name or "", str(s.uuid))):
        uuid = str(svc.uuid)
        numbers = new.services.get(uuid, {})
        before = old.services.get(uuid, {}) if old is not None else {}
        span = new.at - old.at if old is not None else 0.0
        # CPU over the times the two values were read (a reading serves several scrapes): none if the same
        cpu_span = numbers.get("cpu_at", new.at) - before.get("cpu_at", old.at) if old is not None else 0.0
        cpu = rate(numbers.get("cpu"), before.get("cpu"), cpu_span)
        started = numbers.get("start_time") or (svc.status.started_at if svc.status.pid else None)
        rows.append(
            Row(
                uuid=uuid,
                name=svc.config.name or svc.config.model_name or "-",
                state=str(svc.status.state),
                uptime=max(0.0, new.at - started) if started else None,
                restarts=int(numbers.get("restarts", svc.status.restarts)),
                memory=numbers.get("memory"),
                cpu=None if cpu is None else 100 * cpu,
                rps=rate(numbers.get("requests", 0.0), before.get("requests", 0.0), span) if old is not None else None,
                last_event=last_events.get(uuid),
            )
        )
    return rows


class Sampler:
    """Scrapes and lists the services at each :meth:`take`, keeping the previous scrape for the rates.

    The live view takes them in a thread of its own (:meth:`follow`), never on the screen's: a daemon
    that does not answer (stopped with SIGSTOP, swapping, hung) holds up that thread only, while the
    screen goes on answering its keys and says how long the daemon has been silent (:meth:`silent`).
    """

    def __init__(self, client: DaemonClient):
        self.client = client
        self.last: Scrape | None = None
        self.services: list[BaseService] = []
        self.rows: list[Row] = []  # the latest answered take's (what the screen shows)
        self.rows_at: float | None = None  # when they were taken (time.time())
        self.count = 0  # takes done so far: the screen redraws when it changes
        self.answered = True  # whether the last take had an answer (the daemon's, or "not running")
        self.silent_since: float | None = None  # time.monotonic() since when no take had an answer
        self.daemon_cpu: float | None = None  # % of a core, the daemon's own
        self.error = ""  # why the last take failed ("" when it did not)
        self.cpu_seen: dict[str, deque[tuple[float, float]]] = {}  # uuid -> (when, CPU seconds) of recent scrapes

    def take(self, feed: EventFeed) -> list[Row]:
        try:
            text = self.client.metrics()
            services = self.client.find()
        except exc.DaemonNotRunning:
            self.error, self.last, self.answered = "the daemon is not running (waiting for one)", None, True
            return []
        except (exc.ModeldError, OSError) as error:  # no answer within the client's timeout, a broken connection
            self.answered = False
            self.error = f"no answer from the daemon: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            self.last = None
            return []
        self.error, self.answered = "", True
        new = scrape_of(text, time.time())
        old, self.last, self.services = self.last, new, services
        span = new.at - old.at if old is not None else 0.0
        daemon_cpu = rate(new.daemon_cpu, old.daemon_cpu if old else None, span)
        self.daemon_cpu = None if daemon_cpu is None else 100 * daemon_cpu
        rows = rows_of(services, new, old, feed.last_by_service())
        self._cpu_over_a_window(rows, new)
        return rows

    def follow(self, feed: EventFeed, interval: float) -> threading.Thread:
        """Take every ``interval`` seconds in a daemon thread (it ends with the process)."""

        def run() -> None:
            while True:
                began = time.monotonic()
                if self.silent_since is None:
                    self.silent_since = began
                rows = self.take(feed)
                if self.answered:  # (else the last rows stay, with the time they are from)
                    self.rows, self.rows_at, self.silent_since = rows, time.time(), None
                self.count += 1
                time.sleep(max(0.0, began + interval - time.monotonic()))

        thread = threading.Thread(target=run, name="modeld-top-sampler", daemon=True)
        thread.start()
        return thread

    def silent(self, now: float | None = None) -> float:
        """Seconds since the daemon last answered a take (0 when the last one had its answer)."""
        since = self.silent_since
        return 0.0 if since is None else max(0.0, (time.monotonic() if now is None else now) - since)

    def _cpu_over_a_window(self, rows: list[Row], new: Scrape) -> None:
        """A server's CPU % over its readings of the last CPU_WINDOW seconds, not since the previous
        scrape: the daemon reads a server's CPU at most every 5 s (metrics.py) and says when (the
        sample's time), so the rate is taken between the times of two readings; None until two."""
        for row in rows:
            numbers = new.services.get(row.uuid, {})
            value, read = numbers.get("cpu"), numbers.get("cpu_at", new.at)
            seen = self.cpu_seen.setdefault(row.uuid, deque())
            if value is None or (seen and value < seen[-1][1]):  # none running, or restarted (from 0 again)
                seen.clear()
            if value is None:
                continue
            if not seen or read > seen[-1][0]:
                seen.append((read, value))
            while len(seen) > 2 and read - seen[1][0] >= CPU_WINDOW:
                seen.popleft()
            at, before = seen[0]
            row.cpu = 100 * (value - before) / (read - at) if read > at else None

    def cpu_known(self, rows: list[Row]) -> bool:
        """Whether every running server's CPU is a rate yet (two of its readings seen)."""
        return all(row.cpu is not None for row in rows if row.memory is not None)


class EventFeed:
    """The daemon's events, followed in a daemon thread (with a client of its own: a client is not
    shared between threads): the latest ``keep``, and the last of each service."""

    def __init__(self, client: DaemonClient, keep: int = 500):
        self.client = client
        self.latest: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.last: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.count = 0  # events received so far: the screen redraws when it changes
        self.error = ""

    def add(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.latest.append(event)
            if event.get("uuid"):
                self.last[str(event["uuid"])] = event
            self.count += 1

    def read_held(self) -> None:
        """The events the daemon holds now, then return (for a snapshot)."""
        for event in self.client.events(since=0, follow=False):
            self.add(event)

    def follow(self) -> threading.Thread:
        """Follow in a daemon thread, from the first event the daemon holds; it ends with the process."""

        def run() -> None:
            try:
                for event in self.client.events(since=0, follow=True):
                    self.add(event)
            except (exc.ModeldError, OSError, ValueError) as error:  # shown on the screen; the rows go on
                self.error = f"events: {error}"

        thread = threading.Thread(target=run, name="modeld-top-events", daemon=True)
        thread.start()
        return thread

    def last_by_service(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return dict(self.last)

    def tail(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.latest)[-n:] if n > 0 else []
