"""The processes a pid file names, read with the store's own parser, and whether a process is
still the one that started at its clock ticks; a process is signalled only through a pidfd checked
against them (``kill_verified``), never by psutil's float create time."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from daemon.linux import ProcessIdentity, boot_id, signal_verified, start_ticks
from daemon.store import PidRecord


def read_pid(path: Path) -> list[ProcessIdentity]:
    """The processes a pid file names (``daemon.pid``, or ``service.pid`` with a hand-over's previous
    server), read with the store's parser; [] if it is missing or unreadable."""
    try:
        main, prev = PidRecord.loads(path.read_text()).split_previous()
    except (OSError, ValueError, IndexError):
        return []
    return [main.ident] + ([prev.ident] if prev else [])


def recorded(home: Path) -> set[ProcessIdentity]:
    """Every process ``home``'s pid files name (alive or not)."""
    return {i for f in [home / "daemon.pid", *home.glob("services/*/service.pid")] for i in read_pid(f)}


def ticks_alive(pid: int, ticks: int) -> bool:
    """``pid`` is alive (not a zombie) and started at ``ticks``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == ticks


def pid_alive(pid: int) -> bool:
    ticks = start_ticks(pid)
    return ticks is not None and ticks_alive(pid, ticks)


def kill_verified(pid: int, ticks: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``ticks`` (through a pidfd)."""
    fd = signal_verified(ProcessIdentity(pid, ticks, boot_id()), sig)
    if fd is not None:
        os.close(fd)
    return fd is not None
