"""Starting, watching and stopping one server process.

Every server runs in its own session and process group (``setsid``), so the
daemon can die or restart without taking it down and a stop reaches the
whole group. Processes are started by subprocess's C ``fork_exec`` with
``close_fds`` (no ``preexec_fn``), so a server inherits only stdio and, for
built-in servers, the listening socket. Exit is noticed through a pidfd registered with the
event loop, for adopted processes as well as our own children; the only
reaping is ``waitid(P_PIDFD)`` here, so no other reaper can steal a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .exceptions import DeployError
from .linux import ProcessIdentity, group_members, now_ticks, pidfd_open, reap, send_group_signal

log = logging.getLogger("modeld.process")

class ProcessHandle:
    """A running server process: its identity and a future for its exit code."""

    def __init__(self, ident: ProcessIdentity, pidfd: int, loop: asyncio.AbstractEventLoop, extra: dict[str, str] | None = None):
        self.ident = ident
        self.pidfd = pidfd
        self.extra = extra or {}
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self._loop = loop
        loop.add_reader(pidfd, self._on_exit)

    @property
    def pid(self) -> int:
        return self.ident.pid

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    @classmethod
    def adopt(cls, ident: ProcessIdentity, extra: dict[str, str] | None = None) -> ProcessHandle | None:
        """Watch a process we did not start (or started in a previous life); None if it is gone."""
        try:
            fd = pidfd_open(ident.pid)
        except ProcessLookupError:
            return None
        # Checked after opening the pidfd: from here on the pid cannot be reused under us.
        if not ident.is_alive():
            os.close(fd)
            return None
        return cls(ident, fd, asyncio.get_running_loop(), extra)

    def _on_exit(self) -> None:
        # Whatever way the leader went (stop, crash, OOM), workers it left must not keep its port.
        # Done before reaping: while our child is a zombie its pgid cannot be anyone else's.
        self._kill_stragglers(until=now_ticks())
        self._loop.remove_reader(self.pidfd)
        code = reap(self.pidfd)
        os.close(self.pidfd)
        if not self.exited.done():
            self.exited.set_result(code)

    async def wait(self, timeout: float | None) -> bool:
        """Wait for exit; True if it exited within ``timeout``. Never cancels ``exited``."""
        if self.exited.done():
            return True
        # asyncio.wait leaves the future alone on timeout or cancellation, so no shield, and it
        # costs one timer: supervision of a healthy server spends its life in here.
        done, _ = await asyncio.wait((self.exited,), timeout=timeout)
        return bool(done)

    async def terminate(self, timeout: float, force: bool = False) -> None:
        """SIGTERM to the group, wait up to ``timeout``, then SIGKILL; ``force`` kills at once."""
        if self.alive and not force:
            send_group_signal(self.ident, signal.SIGTERM)
            if await self.wait(timeout):
                return
        if self.alive:
            send_group_signal(self.ident, signal.SIGKILL)
            await self.wait(10)

    def _kill_stragglers(self, until: int) -> None:
        """Kill what the leader left in its group (grandchildren), and no one else.

        Only processes that started between the leader's start and its death are
        ours: a pgid freed by an emptied group may be taken by a stranger later.
        """
        for pid in group_members(self.ident.pid, self.ident.start_ticks, until):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        """Stop watching (the process itself is left alone)."""
        if self.alive:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.exited.cancel()


def resolve_executable(name: str, env: dict[str, str], cwd: str = "") -> str:
    """The path of ``name`` as exec would find it: relative to ``cwd`` if it has a slash, else on PATH."""
    if os.sep in name:
        if cwd and not os.path.isabs(name):
            name = os.path.join(cwd, name)
        if not os.path.isfile(name) or not os.access(name, os.X_OK):
            raise DeployError(f"command {name!r} does not exist or is not executable")
        return name
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if not found:
        raise DeployError(f"command {name!r} not found on PATH")
    return found


def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    log_path: Path,
    pass_fds: tuple[int, ...] = (),
    extra: dict[str, str] | None = None,
) -> ProcessHandle:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``."""
    if cwd and not os.path.isdir(cwd):
        raise DeployError(f"working directory {cwd!r} does not exist")
    executable = resolve_executable(argv[0], env, cwd)
    try:
        log_file = open(log_path, "ab", buffering=0)
    except OSError as exc:
        raise DeployError(f"cannot open the server's log {log_path}: {exc.strerror or exc}") from exc
    with log_file:
        with contextlib.suppress(OSError):  # a full disk must not stop the server from starting
            log_file.write(
                f"--- modeld: starting {argv[0]} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode()
            )
        try:
            # subprocess's fork_exec is C code that runs no Python in the child: safe in a daemon
            # with threads. It does setsid, chdir, close_fds and pass_fds for us.
            proc = subprocess.Popen(
                [executable, *argv[1:]],
                env=env,
                cwd=cwd or None,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=pass_fds,
            )
        except OSError as exc:
            raise DeployError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
    ident = ProcessIdentity.of(proc.pid) or ProcessIdentity(proc.pid, -1, "")
    handle = ProcessHandle(ident, pidfd_open(proc.pid), asyncio.get_running_loop(), extra)
    # Keep the Popen object until we have reaped the child ourselves, then mark it done, so
    # subprocess never adds it to its own list of children to reap (two reapers lose statuses).
    handle.exited.add_done_callback(lambda fut: setattr(proc, "returncode", fut.result() if not fut.cancelled() else 0))
    return handle
