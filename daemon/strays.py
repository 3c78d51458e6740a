"""Stopping the processes of this home's services that no service keeps: an untracked server's
group (one no pid file names), the launches a kill -9 of the daemon cut short, what a dead server
left behind, and the cgroups of services that are gone.

Invariants:
- Only a process tagged with this home is signalled (the rebuild's scan found it), and only after
  its identity (pid and start time) is checked through a pidfd: a pid reused meanwhile is safe.
- A group leader is stopped (SIGSTOP) before its group is killed, so it cannot exit and free its
  pgid for a stranger in between.
- One stray that cannot be reached (a cgroup removed under us, a process gone) is logged
  (``log_failures``), never a reason for the daemon not to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable

from .containment import Containment
from .groups import Group
from .linux import TaggedProcess, signal_verified
from .service import ServiceRuntime
from .store import LaunchInfo

log = logging.getLogger("modeld.manager")


async def kill_untracked(containment: Containment, p: TaggedProcess) -> None:
    """SIGKILL an untracked server's group (or one stray worker) and wait until it is gone.

    The leader is first stopped through a pidfd checked against its start time: stopped, it
    cannot exit and free its pgid for someone else before the group is killed. With cgroups,
    the whole launch it belongs to goes too.
    """
    fd = signal_verified(p.ident, signal.SIGSTOP if p.leads_group else signal.SIGKILL)
    if fd is None:
        return
    try:
        if p.leads_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.ident.pid, signal.SIGKILL)
        log.warning("killed pid %d of service %s: no pid file names it", p.ident.pid, p.service_uuid)
        loop = asyncio.get_running_loop()
        gone = loop.create_future()

        def on_exit() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            await asyncio.wait_for(gone, 10)
        except TimeoutError:
            log.error("pid %d did not exit within 10s of SIGKILL", p.ident.pid)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
    launch = LaunchInfo.from_tag(p.info).launch
    if containment.kind == "cgroup" and launch is not None:
        await asyncio.to_thread(kill_and_remove, containment.group(p.service_uuid, launch))


async def sweep_leftovers(containment: Containment, services: Iterable[ServiceRuntime], tagged: list[TaggedProcess]) -> None:
    """Stop every process of this home's services that belongs to no launch a service keeps.

    Run once every service is restored: what is left is what a server started and left
    behind when it died while no daemon watched (a helper in a session of its own, a
    daemonized child), launches a kill -9 of the daemon cut short, and services deleted
    meanwhile. Cgroups are swept by their folders; processes by their tags (``tagged``:
    the scan made at the start of the rebuild; what was started since is kept).
    """
    keep: dict[str, set[str | None]] = {}
    for m in services:
        keep[str(m.uuid)] = {p.info.launch for p in (m.proc, m.replacing) if p is not None and p.alive}
    doomed = [
        containment.group(uuid, launch)
        for uuid in containment.services()
        for launch in containment.launches(uuid)
        if launch not in keep.get(uuid, set())
    ]
    strays = [
        p for p in tagged if LaunchInfo.from_tag(p.info).launch not in keep.get(p.service_uuid, set()) and p.ident.is_alive()
    ]
    for group in doomed:
        log.warning("stopping what is left of launch %s of service %s", group.launch, group.uuid)
    log_failures(
        "sweeping",
        await asyncio.gather(
            *(kill_untracked(containment, p) for p in strays),
            *(asyncio.to_thread(kill_and_remove, group) for group in doomed),
            return_exceptions=True,
        ),
    )
    gone = [uuid for uuid in containment.services() if uuid not in keep]
    log_failures(
        "removing the cgroup of a deleted service",
        await asyncio.gather(*(asyncio.to_thread(containment.remove_service, uuid) for uuid in gone), return_exceptions=True),
    )


def log_failures(doing: str, results: list[object]) -> None:
    """Log what failed in a gather(return_exceptions=True) of the rebuild: one stray that cannot
    be reached (a cgroup removed under us, a process gone) never stops the daemon from starting."""
    for result in results:
        if isinstance(result, Exception):
            log.error("%s failed: %s: %s", doing, type(result).__name__, result, exc_info=result)


def kill_and_remove(group: Group, timeout: float = 10.0) -> None:
    """SIGKILL every process of a group, wait until they are gone, and remove the group (in a thread)."""
    group.kill()
    deadline = time.monotonic() + timeout
    while not group.empty() and time.monotonic() < deadline:
        time.sleep(0.005)
    with contextlib.suppress(OSError):
        group.remove()
