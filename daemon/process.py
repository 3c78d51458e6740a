"""Starting (cold), watching and stopping one server process; a warm start is ``forkservers.py``'s.

Every server runs in its own session and process group (``setsid``), so the
daemon can die or restart without taking it down and a stop reaches the
whole group. Processes are started by subprocess's C ``fork_exec`` with
``close_fds`` (no ``preexec_fn``), so a server inherits only stdio and, for
built-in servers, the listening socket. Exit is noticed through a pidfd registered with the
event loop, for adopted processes as well as our own children; the only
reaping is ``waitid(P_PIDFD)`` here, so no other reaper can steal a status. The exit code of a
process that is not our child (a warm server, an adopted one) is read when its pidfd says it
exited (``linux.exit_code_of``), without waiting for its parent; a fork server's report is the
fallback (``MODELD_EXIT_CODES=reports`` in the daemon's environment takes only that: for tests).

Errors: a server that cannot be started raises ``SpawnError``, an ``OSError`` whose text is the
sentence a client reads; the Launcher (or the Supervisor, for a stop command) converts it once.
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
from collections.abc import Callable
from typing import Protocol

from .containment import Containment
from .groups import Group
from .linux import ProcessIdentity, exit_code_of, pidfd_open, reap, send_group_signal
from .logs import marker
from .store import LaunchInfo

log = logging.getLogger("modeld.process")

READ_EXIT_CODES = os.environ.get("MODELD_EXIT_CODES", "") != "reports"  # (see the module docstring)


class ExitCodeSource(Protocol):
    """Who reports the exit code of a process that is not our child (a fork server, see forkservers.py)."""

    def exit_code(self, pid: int) -> asyncio.Future[int | None]: ...


class ProcessHandle:
    """A running server process: its identity, its group (everything it started), a future for its exit code."""

    def __init__(
        self,
        ident: ProcessIdentity,
        pidfd: int,
        loop: asyncio.AbstractEventLoop,
        info: LaunchInfo | None = None,
        group: Group | None = None,
    ):
        self.ident = ident
        self.pidfd = pidfd
        self.info = info or LaunchInfo()
        self.group = group
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self._loop = loop
        self.code_source: ExitCodeSource | None = None  # who knows the exit code, if we are not the parent
        if pidfd >= 0:  # -1: it had exited before we could watch it
            loop.add_reader(pidfd, self._on_exit)

    @property
    def pid(self) -> int:
        return self.ident.pid

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    @classmethod
    def adopt(cls, ident: ProcessIdentity, info: LaunchInfo | None = None, group: Group | None = None) -> ProcessHandle | None:
        """Watch a process we did not start (or started in a previous life); None if it is gone."""
        try:
            fd = pidfd_open(ident.pid)
        except ProcessLookupError:
            return None
        # Checked after opening the pidfd: from here on the pid cannot be reused under us.
        if not ident.is_alive():
            os.close(fd)
            return None
        return cls(ident, fd, asyncio.get_running_loop(), info, group)

    def _on_exit(self) -> None:
        # What the server left behind (workers, helpers) is its group's: whoever acts on the exit
        # decides whether one of them serves on (see Supervisor.successor) or all are stopped.
        self._loop.remove_reader(self.pidfd)
        code = reap(self.pidfd)
        if code is None and READ_EXIT_CODES:  # not our child: read where the kernel keeps it
            code = exit_code_of(self.pidfd, self.ident)
        os.close(self.pidfd)
        self.pidfd = -1
        if self.code_source is not None:  # forked: the fork server reports it too (and so forgets it)
            report = self.code_source.exit_code(self.pid)
            if code is None:
                report.add_done_callback(lambda fut: self.set_exit_code(fut.result()))
                return
        self.set_exit_code(code)

    def set_exit_code(self, code: int | None) -> None:
        """The process has exited with ``code`` (None: unknown); the first report counts."""
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

    async def wait_gone(self, timeout: float) -> bool:
        """Wait until the process has exited and its whole group is gone; True if within ``timeout``."""
        deadline = time.monotonic() + timeout
        if not await self.wait(timeout):
            return False
        delay = 0.002
        while self.group is not None and not await asyncio.to_thread(self.group.empty):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        return True

    def signal_all(self, *signals: int) -> None:
        """Each of ``signals`` to the process's group and to every member of its launch group (also
        those that left it), in order."""
        # The launch's members first, while the server lives: with tags, a child that cleared its
        # environment is found through its parent, and would be missed once that had died. Each
        # process gets each signal once: a second SIGTERM tells a draining server to stop at once.
        if self.group is None:
            for sig in signals:
                if self.alive:
                    send_group_signal(self.ident, sig)
            return
        members = self.group.members()
        if self.alive and self.ident not in members:
            members.append(self.ident)
        self.group.send(members, *signals)

    async def terminate(self, timeout: float, force: bool = False) -> None:
        """SIGTERM to every process of the launch, wait up to ``timeout``, then SIGKILL; ``force`` kills at once.

        SIGCONT follows the SIGTERM: a stopped (frozen, SIGSTOPped) process takes it only once continued.
        """
        if not force:
            await asyncio.to_thread(self.signal_all, signal.SIGTERM, signal.SIGCONT)
            if await self.wait_gone(timeout):
                return
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL every process of the launch and wait until they are gone (10 s at most)."""
        if self.group is not None:  # (first: see signal_all)
            await asyncio.to_thread(self.group.kill)
        if self.alive:  # (after a group's kill, it is gone: this is for a server from before groups)
            send_group_signal(self.ident, signal.SIGKILL)
        if not await self.wait_gone(10):
            log.error("pid %d or a process it started did not exit within 10s of SIGKILL", self.pid)
        if self.group is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.group.remove)

    def close(self) -> None:
        """Stop watching (the process itself is left alone)."""
        if self.pidfd >= 0:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        if self.alive:
            self.exited.cancel()


class SpawnError(OSError):
    """A process cannot be started (no such command, no working directory, no log, exec failed):
    ``str()`` says why, in the words a client reads."""


def resolve_executable(name: str, env: dict[str, str], cwd: str = "") -> str:
    """The path of ``name`` as exec would find it: relative to ``cwd`` if it has a slash, else on PATH."""
    if os.sep in name:
        if cwd and not os.path.isabs(name):
            name = os.path.join(cwd, name)
        if not os.path.isfile(name) or not os.access(name, os.X_OK):
            raise SpawnError(f"command {name!r} does not exist or is not executable")
        return name
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if not found:
        raise SpawnError(f"command {name!r} not found on PATH")
    return found


def exec_size(argv: list[str], env: dict[str, str]) -> int:
    """Bytes of exec's argument space that ``argv`` and ``env`` take, as the kernel counts them:
    each string with its NUL, the file name once more, and a pointer per string."""
    strings = [*argv, argv[0] if argv else "", *(f"{k}={v}" for k, v in env.items())]
    return sum(len(os.fsencode(text)) + 1 for text in strings) + (len(argv) + len(env)) * 8


def exec_limit() -> int:
    """What exec takes in all (E2BIG past it): a quarter of the stack limit (as glibc reports it),
    and never more than 6 MiB (3/4 of the kernel's _STK_LIM), however large the stack limit."""
    try:
        return min(int(os.sysconf("SC_ARG_MAX")), 6 * 1024 * 1024)
    except (ValueError, OSError):
        return 128 * 1024  # the least any Linux takes


_server_umask = -1  # Popen's "leave it": set by the daemon, which runs under 077 itself


def keep_server_umask(mask: int) -> None:
    """The umask servers start with: the one the daemon was started with, not the 077 it runs under,
    so files a server writes get the modes its user expects."""
    global _server_umask
    _server_umask = mask


def server_umask() -> int:
    """The umask a server (or a fork server) is started with (see ``keep_server_umask``)."""
    return _server_umask


LogOpener = Callable[[bytes], int]  # given the first line, a fd for the server's stdout and stderr (see LogWriterClient.open)


def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    open_log: LogOpener,
    pass_fds: tuple[int, ...] = (),
    info: LaunchInfo | None = None,
    group: Group | None = None,
    containment: Containment | None = None,
) -> ProcessHandle:
    """Start ``argv`` in a new session (and, if given, born in ``group``), stdout and stderr to its log."""
    if cwd and not os.path.isdir(cwd):
        raise SpawnError(f"working directory {cwd!r} does not exist")
    executable = resolve_executable(argv[0], env, cwd)
    try:
        log_fd = open_log(marker(f"starting {argv[0]}"))
    except OSError as exc:
        raise SpawnError(f"cannot open the server's log: {exc.strerror or exc}") from exc
    try:
        born_in = containment.born_in(group) if containment is not None and group is not None else contextlib.nullcontext()
        with born_in:
            # subprocess's fork_exec is C code that runs no Python in the child: safe in a daemon
            # with threads. It does setsid, chdir, close_fds and pass_fds for us.
            proc = subprocess.Popen(
                [executable, *argv[1:]],
                env=env,
                cwd=cwd or None,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=pass_fds,
                umask=_server_umask,
            )
    except OSError as exc:
        raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
    finally:
        os.close(log_fd)
    ident = ProcessIdentity.of(proc.pid) or ProcessIdentity(proc.pid, -1, "")
    try:
        pidfd = pidfd_open(proc.pid)
    except OSError as exc:  # out of fds: a server we cannot watch must not run
        proc.kill()
        proc.wait()
        if group is not None:
            group.kill()
        raise SpawnError(f"cannot watch {argv[0]!r}: {exc.strerror or exc}") from exc
    handle = ProcessHandle(ident, pidfd, asyncio.get_running_loop(), info, group)
    # Keep the Popen object until we have reaped the child ourselves, then mark it done, so
    # subprocess never adds it to its own list of children to reap (two reapers lose statuses).
    handle.exited.add_done_callback(lambda fut: setattr(proc, "returncode", fut.result() if not fut.cancelled() else 0))
    return handle
