"""``GET /metrics``: what the daemon knows, in Prometheus' text format (0.0.4), written by hand.

The counts only the daemon sees are kept here, in memory, by hook calls at the facts (each marked
``# metrics`` where it is made): ``exited`` (supervise.py: a server's exit, with its reason),
``idle_stopped`` and ``woken`` (ondemand.py), ``probed`` (health.py: each liveness probe's time) and
``forget`` (a delete). They start from 0 when the daemon starts, as counters do after a restart;
``modeld_service_restarts_total`` is the record's ``restarts``, which persists.

What the servers and the gateway count is read at scrape time: the request counters in
``run/requests/<uuid>.<via>`` (runtime/_serve/counters.py, each mapped once and read in place), each server's memory
and CPU (procstat.py, a reading serving ``procstat.MAX_AGE`` s). A scrape is made on the event loop
(about 3 ms of it with 100 services), but for the memory and CPU readings when they are due, made
in a thread first: no thread formats the text, so no thread's malloc arena holds its pages.

``modeld_event_loop_lag_seconds`` is the longest delay seen, since the last scrape, between when
the loop should have woken a timer and when it did (sampled every ``LAG_TICK`` s, only while someone
scrapes: with no scrape for ``LAG_IDLE`` s the sampler stops, so an unwatched daemon pays no
wake-up), and at least the time one turn of the loop takes at the scrape itself.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from uuid import UUID

from . import procstat
from .groups import CgroupGroup
from .models import ServiceState, changes
from .runtime._serve import counters

if TYPE_CHECKING:
    from .manager import Manager
    from .paths import Paths

PROBE_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0)
EXIT_REASONS = ("exit", "signal", "liveness", "idle")
VIAS = ("direct", "gateway")
LAG_TICK = 0.5
LAG_IDLE = 60.0
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Counts:
    """What the daemon counted of one service since it started."""

    exits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXIT_REASONS, 0))
    wakes: int = 0
    last_exit: int | None = None  # the code of the last exit seen here (else the record's last_exit_code, kept)
    probe_buckets: list[int] = field(default_factory=lambda: [0] * (len(PROBE_BOUNDS) + 1))
    probe_sum: float = 0.0
    name: str | None = None  # the model name ``labels`` were made of (a replace may change it)
    labels: str = ""  # uuid="…",model_name="…"
    uuid: str = ""
    texts: tuple[tuple[object, ...], list[bytes]] | None = None  # see _texts


_counts: dict[UUID, _Counts] = {}
_counters = counters.Mapped()  # the request counter files, mapped once each
_exits_seen: weakref.WeakSet[object] = weakref.WeakSet()  # the processes whose exit was counted
_counted = [0]  # moved by every hook below but ``probed``: what a snapshot shows of the counts


def _of(uuid: UUID) -> _Counts:
    found = _counts.get(uuid)
    if found is None:
        found = _counts[uuid] = _Counts()
    return found


# ------------------------------------------------------------------ hooks (called at the facts)


def exited(uuid: UUID, proc: object, code: int | None, unhealthy: str | None) -> None:
    """The server's process ``proc`` exited (or was stopped for failing its liveness checks:
    ``unhealthy``), in whatever state: before its first health answer (a start's or a replace's
    health wait) as after. Counted once per process, however many places learn of the exit."""
    if proc in _exits_seen:
        return
    _exits_seen.add(proc)
    reason = "liveness" if unhealthy else ("signal" if code is not None and code < 0 else "exit")
    counts = _of(uuid)
    counts.exits[reason] += 1
    counts.last_exit = code if code is not None else counts.last_exit
    _counted[0] += 1


def idle_stopped(uuid: UUID) -> None:
    _of(uuid).exits["idle"] += 1
    _counted[0] += 1


def woken(uuid: UUID) -> None:
    """A load from zero began (a wake: a request on its socket, the gateway's start, a start)."""
    _of(uuid).wakes += 1
    _counted[0] += 1


def probed(key: object, seconds: float) -> None:
    """One liveness probe took ``seconds`` (``key``: the prober's, ``(uuid, pid)``)."""
    uuid = key[0] if isinstance(key, tuple) else key
    if isinstance(uuid, UUID):
        counts = _of(uuid)
        counts.probe_buckets[bisect.bisect_left(PROBE_BOUNDS, seconds)] += 1
        counts.probe_sum += seconds


def forget(paths: Paths, uuid: UUID) -> None:
    """A deleted service: its counts and its request counter files go."""
    _counts.pop(uuid, None)
    for via in VIAS:
        try:
            os.unlink(paths.requests_file(uuid, via))
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------ event loop lag


class _Lag:
    def __init__(self) -> None:
        self.worst = 0.0
        self.last_scrape = 0.0
        self.task: asyncio.Task[None] | None = None

    async def take(self) -> float:
        """The worst lag since the last scrape (this one's turn of the loop included); the sampler runs on."""
        loop = asyncio.get_running_loop()
        self.last_scrape = loop.time()
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._sample(), name="metrics-loop-lag")
        began = loop.time()
        await asyncio.sleep(0)
        worst, self.worst = max(self.worst, loop.time() - began), 0.0
        return worst

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() - self.last_scrape < LAG_IDLE:
            due = loop.time() + LAG_TICK
            await asyncio.sleep(LAG_TICK)
            self.worst = max(self.worst, loop.time() - due)


_lag = _Lag()


# ------------------------------------------------------------------ the scrape


@dataclass
class _Service:
    labels: str  # uuid="…",model_name="…"
    uuid: str
    state: ServiceState
    restarts: int
    exit_code: int | None
    started_at: float | None
    pid: int | None
    cgroup: str | None  # the launch's leaf cgroup, when contained
    counts: _Counts


def label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Snapshots:
    """The last snapshot, made again only when something it shows may have changed: a service, its
    status or its endpoint edited (``models.changes``), a service or a process object replaced, or
    a count moved by a hook (``_counted``). With a scrape a second, most find nothing changed."""

    def __init__(self) -> None:
        self.made: tuple[int, int, list[tuple[object, object]]] | None = None
        self.found: list[_Service] = []

    def take(self, manager: Manager) -> list[_Service]:
        objects: list[tuple[object, object]] = [(m.svc, m.proc) for m in manager.services.values()]
        made = self.made
        if (
            made is not None
            and made[0] == changes()
            and made[1] == _counted[0]
            and len(made[2]) == len(objects)
            and all(a is c and b is d for (a, b), (c, d) in zip(made[2], objects, strict=True))
        ):
            return self.found
        self.found = _snapshot(manager)
        self.made = (changes(), _counted[0], objects)
        return self.found


_snapshots = _Snapshots()


def _snapshot(manager: Manager) -> list[_Service]:
    for uuid in [u for u in _counts if u not in manager.services]:
        del _counts[uuid]
    found = []
    for uuid, m in manager.services.items():
        svc, proc = m.svc, m.proc
        alive = proc is not None and not proc.exited.done()
        group = proc.group if proc is not None else None
        counts = _of(uuid)
        name = svc.config.model_name or ""
        if counts.name != name:  # (made once per service: a uuid's text costs more than the rest here)
            counts.name, counts.uuid = name, str(uuid)
            counts.labels = f'uuid="{counts.uuid}",model_name="{label(name)}"'  # (a uuid needs no escaping)
        found.append(
            _Service(
                labels=counts.labels,
                uuid=counts.uuid,
                state=svc.status.state,
                restarts=svc.status.restarts,
                exit_code=_last_exit(svc.status.exit_code, counts.last_exit, svc.status.last_exit_code),
                started_at=svc.status.started_at if alive else None,
                pid=proc.pid if alive and proc is not None else None,
                cgroup=str(group.path) if alive and isinstance(group, CgroupGroup) else None,
                counts=counts,
            )
        )
    return found


def _last_exit(now: int | None, seen: int | None, kept: int | None) -> int | None:
    """The record's exit code of a server that is not running, else the last this daemon saw, else the
    record's of an earlier server (kept across daemon restarts)."""
    return now if now is not None else seen if seen is not None else kept


async def scrape(manager: Manager) -> bytes:
    """The text of ``GET /metrics``: made on the event loop, but for the reading of the servers'
    memory and CPU when a reading is due (procstat.MAX_AGE), done in a thread first."""
    services = _snapshots.take(manager)
    lag = await _lag.take()
    servers = [(s.pid, s.cgroup) for s in services]
    if procstat.due(servers):
        usage = await asyncio.to_thread(procstat.usage, servers)
    else:
        usage = procstat.usage(servers)  # (every reading kept: nothing read on the loop)
    return render(services, usage, manager.paths, lag)


_FAMILIES = (  # the per-service families, in the order of _texts' parts
    ("modeld_service_up", "gauge", "1 when the service is active (its server answers its health checks)."),
    ("modeld_service_restarts_total", "counter", "Restarts of the service's server by supervision."),
    ("modeld_service_exits_total", "counter", "Exits of the service's server not asked for, and idle stops, by reason."),
    ("modeld_service_last_exit_code", "gauge", "The last exit code of the service's server (-N: killed by signal N)."),
    ("modeld_service_start_time_seconds", "gauge", "When the service's running server started, in seconds since the epoch."),
    ("modeld_service_probe_duration_seconds", "histogram", "Time of the daemon's liveness probes of the service."),
    (
        "modeld_service_memory_bytes",
        "gauge",
        "Memory of the service's server and its children (cgroup memory.current, else the sum of RSS).",
    ),
    ("modeld_service_cpu_seconds_total", "counter", "CPU time of the service's running server and its children."),
    (
        "modeld_service_requests_total",
        "counter",
        "Requests to the service by status, as the gateway or a built-in server counted them (via).",
    ),
    ("modeld_service_request_duration_seconds", "histogram", "Time to the end of each response (via: who measured it)."),
    ("modeld_service_wakes_total", "counter", "Loads of the service from zero (on demand)."),
)


def _family(name: str, kind: str, text: str) -> bytes:
    return f"# HELP {name} {text}\n# TYPE {name} {kind}\n".encode()


_HEADS = tuple(_family(*f) for f in _FAMILIES)


def _texts(s: _Service, usage: procstat.Usage | None, requests: list[tuple[str, counters.Counts | None]]) -> list[bytes]:
    """The service's text in each of ``_FAMILIES``, kept with what it was made of (exactly: every
    value its text shows) and made again only where that changed; with a scrape every second most
    services are as they were at the last one. Kept encoded: a scrape is one join of bytes."""
    counts, labels = s.counts, s.labels
    keys = (
        (labels, s.state, s.restarts, s.exit_code, s.started_at, tuple(counts.exits.values()), counts.wakes),
        (labels, counts.probe_sum, tuple(counts.probe_buckets)),
        (labels, usage),
        (labels, tuple(c for _, c in requests)),  # (Counts compare by value: codes, buckets, sum)
    )
    kept = counts.texts
    if kept is not None and kept[0] == keys:
        return kept[1]
    was: tuple[object, ...] = kept[0] if kept is not None else (None, None, None, None)
    parts: list[bytes] = list(kept[1]) if kept is not None else [b""] * len(_FAMILIES)
    if was[0] != keys[0]:
        parts[0:5] = (
            text.encode()
            for text in (
                f"modeld_service_up{{{labels}}} {int(s.state == ServiceState.ACTIVE)}\n",
                f"modeld_service_restarts_total{{{labels}}} {s.restarts}\n",
                "".join(f'modeld_service_exits_total{{{labels},reason="{r}"}} {n}\n' for r, n in counts.exits.items()),
                f"modeld_service_last_exit_code{{{labels}}} {s.exit_code}\n" if s.exit_code is not None else "",
                f"modeld_service_start_time_seconds{{{labels}}} {s.started_at!r}\n" if s.started_at else "",
            )
        )
        parts[10] = f"modeld_service_wakes_total{{{labels}}} {counts.wakes}\n".encode()
    if was[1] != keys[1]:
        out: list[str] = []
        _histogram(out, "modeld_service_probe_duration_seconds", labels, PROBE_BOUNDS, counts.probe_buckets, counts.probe_sum)
        parts[5] = "".join(out).encode()
    if was[2] != keys[2]:
        parts[6:8] = (
            (
                # (with the time of the reading, in ms: a reading serves procstat.MAX_AGE s of scrapes,
                # and a rate is right only over the times the values were read)
                f"modeld_service_memory_bytes{{{labels}}} {usage[0]} {int(usage[2] * 1000)}\n".encode(),
                f"modeld_service_cpu_seconds_total{{{labels}}} {usage[1]!r} {int(usage[2] * 1000)}\n".encode(),
            )
            if usage
            else (b"", b"")
        )
    if was[3] != keys[3]:
        totals: list[str] = []
        durations: list[str] = []
        for via, c in requests:
            if c is None:
                continue
            totals.extend(
                f'modeld_service_requests_total{{{labels},via="{via}",code="{code}"}} {n}\n' for code, n in c.codes.items()
            )
            if c.codes:  # (from the first request on: a histogram of none says nothing)
                _histogram(
                    durations,
                    "modeld_service_request_duration_seconds",
                    f'{labels},via="{via}"',
                    counters.BOUNDS,
                    c.buckets,
                    c.sum,
                )
        parts[8:10] = ("".join(totals).encode(), "".join(durations).encode())
    counts.texts = (keys, parts)
    return parts


def render(services: list[_Service], usage: list[procstat.Usage | None], paths: Paths, lag: float) -> bytes:
    out: list[bytes] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(_family(name, kind, text))

    family("modeld_services", "gauge", "Services by state.")
    by_state = dict.fromkeys(ServiceState, 0)
    for s in services:
        by_state[s.state] += 1
    out.extend(f'modeld_services{{state="{state.value}"}} {n}\n'.encode() for state, n in by_state.items())

    folder = str(paths.requests_file("x", "direct").parent)
    files = _counters.scan(folder)  # (one listing, not a failed open of each file not there)
    read = _counters.read
    texts = [
        _texts(s, u, [(via, read(folder, name) if (name := f"{s.uuid}.{via}") in files else None) for via in VIAS])
        for s, u in zip(services, usage, strict=True)
    ]
    columns: list[tuple[bytes, ...]] = list(zip(*texts, strict=True)) if texts else [()] * len(_HEADS)
    for head, column in zip(_HEADS, columns, strict=True):
        out.append(head)
        out.extend(column)
    del texts, columns, files

    own = procstat.own()
    for name, kind, about, value in (
        ("process_resident_memory_bytes", "gauge", "Resident memory of the daemon.", own.rss),
        ("process_open_fds", "gauge", "Open file descriptors of the daemon.", own.fds),
        ("process_max_fds", "gauge", "The daemon's limit of open file descriptors.", own.max_fds),
        ("process_cpu_seconds_total", "counter", "CPU time of the daemon (user and system).", own.cpu),
        ("process_start_time_seconds", "gauge", "When the daemon started, in seconds since the epoch.", own.start_time),
        ("modeld_event_loop_lag_seconds", "gauge", "The daemon's worst event loop delay since the last scrape.", lag),
    ):
        family(name, kind, about)
        out.append(f"{name} {value!r}\n".encode())
    text = b"".join(out)
    out.clear()  # (a scrape's peak memory is what stays in the daemon's RSS)
    return text


def _les(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(repr(b) for b in bounds), "+Inf")


_LES = {PROBE_BOUNDS: _les(PROBE_BOUNDS), counters.BOUNDS: _les(counters.BOUNDS)}


def _histogram(out: list[str], name: str, labels: str, bounds: tuple[float, ...], buckets: list[int], total: float) -> None:
    prefix = f'{name}_bucket{{{labels},le="'
    out.extend(f'{prefix}{le}"}} {n}\n' for le, n in zip(_LES[bounds], itertools.accumulate(buckets), strict=True))
    out.append(f"{name}_sum{{{labels}}} {total!r}\n{name}_count{{{labels}}} {sum(buckets)}\n")
