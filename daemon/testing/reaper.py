"""The reaper: ``reap_home`` leaves nothing of a home running and removes its cgroups, whatever
state the test left; it may run any number of times. A process group is signalled only while its
checked leader lives, a process only through a pidfd checked against its start ticks."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from daemon.linux import ProcessIdentity, boot_id
from daemon.testing.cgroups import remove_cgroups
from daemon.testing.identities import kill_verified, recorded, ticks_alive
from daemon.testing.processes import helpers, processes_of, server_processes
from daemon.testing.wait import wait_for


def reap(idents: set[ProcessIdentity]) -> int:
    """Kill each process group a live one of ``idents`` leads, then the process itself by pidfd,
    and wait until they are dead. How many were alive."""
    alive = [i for i in idents if i.is_alive()]
    for ident in alive:
        if ident.is_alive():  # a group is signalled only while its checked leader lives
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ident.pid, signal.SIGKILL)
        kill_verified(ident.pid, ident.start_ticks)
    for ident in alive:
        # Dead is enough: a zombie whose parent is init may wait a while to be reaped here.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not ticks_alive(ident.pid, ident.start_ticks), 5, interval=0.005, what=f"pid {ident.pid} to die")  # noqa: B023 (called in this iteration only)
    return len(alive)


def reap_home(home: Path, also: set[ProcessIdentity] | None = None) -> int:
    """Kill the daemon and every server, helper and log writer of ``home`` (and ``also``), found by
    pid file, tag, fork-server record and cgroup (see ``reap``); then remove the home's cgroups.
    How many processes were alive."""
    idents = set(also or ()) | recorded(home)
    idents |= {ProcessIdentity(p.pid, p.ticks, boot_id()) for p in server_processes(home)}
    idents |= {ProcessIdentity(h.pid, h.ticks, boot_id()) for h in helpers(home)}
    idents |= {i for i in (ProcessIdentity.of(p.pid) for p in processes_of(home)) if i is not None}
    killed = reap(idents)
    remove_cgroups(home)
    return killed
