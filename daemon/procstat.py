"""Memory and CPU of processes, read from ``/proc`` and cgroup files (for ``GET /metrics``).

A service's server is counted with everything it started: its launch's leaf cgroup when contained
(``memory.current``; ``usage_usec`` of ``cpu.stat``), else the process tree below the server's pid
(one pass over ``/proc/*/stat`` per scrape, whatever the number of services: the sum of each
process's RSS, and of its user and system time, plus the time of the children the server has
already waited for). Blocking reads: called in a thread. A process or cgroup that goes away while
it is read counts as nothing; nothing here raises for it.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Own:
    rss: int
    fds: int
    max_fds: int
    cpu: float
    start_time: float


def _stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command (state first), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


_BOOT = _boot_time()


def own() -> Own:
    """The daemon's own figures (the standard ``process_*`` series)."""
    fields = _stat("self") or []
    times = os.times()
    return Own(
        rss=int(fields[21]) * PAGE if len(fields) > 21 else 0,
        fds=len(os.listdir("/proc/self/fd")),
        max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        cpu=times.user + times.system,
        start_time=_BOOT + int(fields[19]) / TICK if len(fields) > 19 else 0.0,
    )


def _cgroup(path: str) -> tuple[int, float] | None:
    try:
        with open(os.path.join(path, "memory.current"), "rb") as f:
            memory = int(f.read())
    except (OSError, ValueError):
        memory = None  # (no memory controller there: the process tree's RSS instead)
    try:
        with open(os.path.join(path, "cpu.stat"), "rb") as f:
            usec = int(f.readline().split()[1])  # usage_usec comes first
    except (OSError, ValueError, IndexError):
        return None
    return (memory if memory is not None else -1), usec / 1e6


def usage(servers: list[tuple[int | None, str | None]]) -> list[tuple[int, float] | None]:
    """(memory bytes, CPU seconds) of each ``(pid, leaf cgroup)``; None where no server runs."""
    found: list[tuple[int, float] | None] = [None] * len(servers)
    tree: list[int] = []
    for i, (pid, cgroup) in enumerate(servers):
        if pid is None:
            continue
        got = _cgroup(cgroup) if cgroup is not None else None
        if got is not None and got[0] >= 0:
            found[i] = got
        else:
            tree.append(i)
    if not tree:
        return found
    # One pass over /proc: each live process's parent, memory and CPU (and its waited-for children's).
    children: dict[int, list[int]] = {}
    figures: dict[int, tuple[int, int, int]] = {}  # pid: (rss pages, own ticks, waited-for children's ticks)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(entry)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        figures[pid] = (int(fields[21]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    for i in tree:
        pid, cgroup = servers[i]
        assert pid is not None
        if pid not in figures:
            continue
        pages = ticks = 0
        todo, seen = [pid], set()
        while todo:
            p = todo.pop()
            if p in seen or p not in figures:
                continue
            seen.add(p)
            rss, own_ticks, waited = figures[p]
            pages += rss
            ticks += own_ticks + waited
            todo.extend(children.get(p, ()))
        cpu = ticks / TICK
        if cgroup is not None:  # a cgroup without the memory controller: its CPU, the tree's memory
            got = _cgroup(cgroup)
            cpu = got[1] if got is not None else cpu
        found[i] = (pages * PAGE, cpu)
    return found
