"""The size of a loaded server: the peak of the memory its launch used, children included.

What admission (``admission.py``) counts against ``memory_budget``. Read, in order of preference:

1. the launch's leaf cgroup's ``memory.peak`` (``containment.py``: a leaf per launch), the kernel's own
   high-water mark of everything in the leaf, also what a child used and freed between two looks;
   ``memory.current`` where the kernel has no ``memory.peak`` (before 5.19);
2. else (tag containment, or a cgroup2 tree without the memory controller, as on a host whose memory
   controller is bound to cgroup v1) the sum of ``Pss:`` in ``/proc/<pid>/smaps_rollup`` over the
   launch's processes (``Group.members``: the server and all it started). PSS divides a shared page
   among its sharers, so a server forked warm is not charged for the fork server's pages, and two
   processes of one launch are not charged twice for the same page.

A service's size is the highest of these seen so far (:class:`Sizes`, in memory only: a daemon
restart starts again from 0 until the next look, as a service never loaded does). Never-measured
is 0.

Cost (measured on this project's 2-core VM): a cgroup look reads one small file, about 0.03 ms. A
PSS look costs what the kernel's walk of each member's page tables costs, about 3 ms per 100 MiB
resident (6 ms for a 200 MiB process), plus, to find the members, one pass over ``/proc`` (2.7 ms
for ~90 processes: ``children_map``, or the tag scan of ``TagGroup.members``). Its reads block, so
a look runs in a thread (``Sizes.measure`` is a coroutine over ``asyncio.to_thread``), and a
service is looked at most once per ``Sizes.INTERVAL`` (1 s), and no more often than 100 times the
last look took (a 4 GiB server whose look takes 120 ms: every 12 s), so sizing costs at most about
1 % of a core per service. A look asked sooner answers the size already known.

Invariant: a process that vanishes while it is measured is not an error. It counts 0 (it holds
nothing any more); nothing here raises for a pid that is gone, for a cgroup removed meanwhile,
or for a ``/proc`` file we may not read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from pathlib import Path

from .groups import CgroupGroup, Group
from .linux import ProcessIdentity, children_map, descendants
from .service import ServiceRuntime

log = logging.getLogger("modeld.memory")

# A pid or cgroup gone between listing and reading, or a file we may not read: nothing to count.
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EACCES, errno.EPERM)


def pss(pid: int) -> int:
    """The proportional set size of ``pid`` in bytes (``Pss:`` of ``smaps_rollup``); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError as exc:
        if exc.errno in _GONE:
            return 0
        raise
    # "Pss:              51324 kB" (a kernel thread or a zombie has an empty file: 0).
    start = text.find(b"\nPss:")
    if start < 0:
        return 0
    fields = text[start + 5 : text.index(b"\n", start + 1)].split()
    return int(fields[0]) * 1024 if fields and fields[0].isdigit() else 0


def cgroup_peak(path: Path) -> int | None:
    """The leaf's ``memory.peak`` (else ``memory.current``) in bytes; None where the leaf has neither
    (no memory controller there) or is gone."""
    for name in ("memory.peak", "memory.current"):
        try:
            with open(path / name, "rb") as f:
                return int(f.read().split()[0])
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
        except (ValueError, IndexError):
            continue
    return None


def launch_size(group: Group | None, pid: int | None) -> int:
    """The memory of one launch now, in bytes: its cgroup's peak, else the sum of its processes' PSS.

    ``group`` is the launch's (``ProcessHandle.group``); ``pid`` the server's, used alone with its
    descendants for a server started before groups existed. Blocking: call it in a thread.
    """
    if isinstance(group, CgroupGroup):
        peak = cgroup_peak(group.path)
        if peak is not None:
            return peak
    if group is not None:
        pids = [ident.pid for ident in group.members()]
    elif pid is not None and ProcessIdentity.of(pid) is not None:
        pids = sorted(descendants({pid}, children_map()))
    else:
        pids = []
    return sum(pss(p) for p in pids)


class Sizes:
    """The highest size seen of each service, in bytes (0: never measured), kept in memory."""

    INTERVAL = 1.0  # seconds: a service is measured at most this often
    COST_RATIO = 100  # ... and at most once per this many times its last look took

    def __init__(self) -> None:
        self._peak: dict[str, int] = {}
        self._next: dict[str, float] = {}  # when each may be looked at again (monotonic)

    def size(self, uuid: object) -> int:
        return self._peak.get(str(uuid), 0)

    def note(self, uuid: object, size: int) -> int:
        """Keep ``size`` if it is the highest seen of ``uuid``; the size now known."""
        key = str(uuid)
        self._peak[key] = max(self._peak.get(key, 0), size)
        return self._peak[key]

    def forget(self, uuid: object) -> None:
        """A deleted service, or one replaced by another model: what it used says nothing any more."""
        self._peak.pop(str(uuid), None)
        self._next.pop(str(uuid), None)

    async def measure(
        self, uuid: object, group: Group | None, pid: int | None, *, now: float | None = None, force: bool = False
    ) -> int:
        """Look at the launch's memory now (in a thread), unless it is too soon (``INTERVAL``,
        ``COST_RATIO``); the highest size seen of it. Never raises for a process or cgroup that went away.
        ``force``: look whatever the time (the last look before a server is scaled to zero)."""
        key = str(uuid)
        now = time.monotonic() if now is None else now
        if not force and now < self._next.get(key, float("-inf")):
            return self.size(key)
        self._next[key] = now + self.INTERVAL  # (also while the look runs: one look at a time)
        began = time.perf_counter()
        try:
            size = await asyncio.to_thread(launch_size, group, pid)
        except OSError as exc:  # not a vanished process (those count 0): say so, keep what we knew
            log.warning("cannot measure the memory of %s: %s", key, exc)
            return self.size(key)
        self._next[key] = now + max(self.INTERVAL, (time.perf_counter() - began) * self.COST_RATIO)
        return self.note(key, size)

    async def measure_service(self, m: ServiceRuntime, *, force: bool = False) -> int:
        """``measure`` of a service's current server (its launch's group); the size known if none runs."""
        proc = m.proc
        if proc is None or not proc.alive:
            return self.size(m.uuid)
        return await self.measure(m.uuid, proc.group, proc.pid, force=force)
