"""Memory and CPU of processes, read from ``/proc`` and cgroup files (for ``GET /metrics``).

A service's server is counted with everything it started: the processes of its launch's leaf
cgroup when contained (``cgroup.procs``), else the process tree below the server's pid (one pass
over ``/proc/*/stat`` per scrape, whatever the number of services). CPU is the sum of each
process's user and system time plus that of the children it has waited for (``/proc/<pid>/stat``);
memory is the leaf's ``memory.current`` where the cgroup has the memory controller, else the sum
of the processes' RSS (a page shared by two of them counts twice).

Not the leaf's ``cpu.stat``: reading it makes the kernel flush the cgroup statistics of every CPU,
about 0.8 ms a file on this project's 2-core VM, 80 ms a scrape with 100 services, against about
0.05 ms for a ``stat`` of each process. (CPU of a process of the leaf that exited unwaited for by
another member is not seen.) A server's reading serves the scrapes of the next ``MAX_AGE`` seconds
(``usage``): with 100 servers a reading costs ~5 ms of CPU, which a scrape every second would pay
each time; Prometheus' intervals (15 s and more) always get a fresh one. Blocking reads: called in
a thread. A process or cgroup that goes
away while it is read counts as nothing; nothing here raises for it.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
MAX_AGE = 5.0  # seconds a server's reading serves scrapes before it is read again (see usage)


@dataclass(frozen=True)
class Own:
    rss: int
    fds: int
    max_fds: int
    cpu: float
    start_time: float


def _read(path: str) -> bytes | None:
    """The whole of a small file (a ``/proc`` or cgroup file), or None if it cannot be read: plain
    ``os.open``/``os.read``, no file object (they cost more than the read itself here)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
        if len(data) == 4096:  # (a big cgroup.procs: the rest)
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command (state first) up to rss (index 21), or
    None if it is gone."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    return data[data.rindex(b")") + 2 :].split(None, 22)


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


_BOOT = _boot_time()


def _open_fds() -> int:
    """How many fds the daemon has open: Linux 6.2 and later give it as the size of ``/proc/self/fd``
    (one stat, not a listing of a few hundred names); earlier kernels give 0 there."""
    return os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))


def own() -> Own:
    """The daemon's own figures (the standard ``process_*`` series)."""
    fields = _stat("self") or []
    times = os.times()
    return Own(
        rss=int(fields[21]) * PAGE if len(fields) > 21 else 0,
        fds=_open_fds(),
        max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        cpu=times.user + times.system,
        start_time=_BOOT + int(fields[19]) / TICK if len(fields) > 19 else 0.0,
    )


def _cgroup_pids(path: str) -> list[int] | None:
    """The processes of a leaf cgroup and of any below it; None if it is gone. (Plain strings, and
    the directory's link count to tell whether it has cgroups below it: 2 when it has none, as a
    ``scandir`` of its 20 files would, at a tenth of the cost.)"""
    pids: list[int] = []
    todo = [path]
    while todo:
        directory = todo.pop()
        data = _read(directory + "/cgroup.procs")
        try:
            if data is None:
                raise OSError
            pids.extend(map(int, data.split()))
            if os.stat(directory).st_nlink > 2:
                with os.scandir(directory) as entries:
                    todo.extend(entry.path for entry in entries if entry.is_dir(follow_symlinks=False))
        except (OSError, ValueError):
            if directory == path:
                return None
    return pids


def _memory_current(path: str) -> int | None:
    data = _read(path + "/memory.current")
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None  # (no memory controller there, as in hybrid mode: the RSS of its processes instead)


def _figures(pid: int | str) -> tuple[int, int, int] | None:
    """(RSS pages, own CPU ticks, CPU ticks of the children it waited for) of a live process."""
    fields = _stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[21]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


Server = tuple[int | None, str | None]  # (pid, its launch's leaf cgroup); (None, …): none runs
Usage = tuple[int, float, float]  # (memory bytes, CPU seconds, when read: seconds since the epoch)

_readings: dict[Server, tuple[float, Usage | None]] = {}  # (monotonic time of the reading, the reading)


def due(servers: list[Server], max_age: float = MAX_AGE) -> bool:
    """Whether ``usage`` would read any of ``servers`` anew."""
    now = time.monotonic()
    for server in servers:
        if server[0] is not None:
            reading = _readings.get(server)
            if reading is None or now - reading[0] >= max_age:
                return True
    return False


def usage(servers: list[Server], max_age: float = MAX_AGE) -> list[Usage | None]:
    """(memory bytes, CPU seconds) of each ``(pid, leaf cgroup)``; None where no server runs (or it
    is gone). A reading younger than ``max_age`` seconds is answered again instead of read anew: a
    new server (another pid) is read at once; those of servers no longer asked for are dropped."""
    now = time.monotonic()
    found: list[Usage | None] = [None] * len(servers)
    kept: dict[Server, tuple[float, Usage | None]] = {}
    stale: list[int] = []
    for i, server in enumerate(servers):
        if server[0] is None:
            continue
        reading = _readings.get(server)
        if reading is not None and now - reading[0] < max_age:
            found[i] = reading[1]
            kept[server] = reading
        else:
            stale.append(i)
    read_at = time.time()
    for i, got in zip(stale, _read_usage([servers[i] for i in stale]), strict=True):
        made: Usage | None = None if got is None else (got[0], got[1], read_at)
        found[i] = made
        kept[servers[i]] = (now, made)
    _readings.clear()
    _readings.update(kept)
    return found


def _read_usage(servers: list[Server]) -> list[tuple[int, float] | None]:
    found: list[tuple[int, float] | None] = [None] * len(servers)
    tree: list[int] = []
    has_memory = True  # (one hierarchy: a leaf without memory.current means none has it)
    for i, (pid, cgroup) in enumerate(servers):
        if pid is None:
            continue
        members = _cgroup_pids(cgroup) if cgroup is not None else None
        if members is None:
            tree.append(i)
            continue
        pages = ticks = 0
        for member in members:
            got = _figures(member)
            if got is not None:
                pages, ticks = pages + got[0], ticks + got[1] + got[2]
        memory = _memory_current(cgroup) if cgroup is not None and has_memory else None
        has_memory = memory is not None
        found[i] = (memory if memory is not None else pages * PAGE, ticks / TICK)
    if not tree:
        return found
    # Not contained: one pass over /proc, each live process's parent and figures, then each server's tree.
    children: dict[int, list[int]] = {}
    figures: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(entry)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        figures[pid] = (int(fields[21]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    for i in tree:
        pid = servers[i][0]
        assert pid is not None
        pages = ticks = 0
        todo, seen = [pid], set()
        while todo:
            p = todo.pop()
            if p in seen or p not in figures:
                continue
            seen.add(p)
            rss, own_ticks, waited = figures[p]
            pages, ticks = pages + rss, ticks + own_ticks + waited
            todo.extend(children.get(p, ()))
        if seen:
            found[i] = (pages * PAGE, ticks / TICK)
    return found
