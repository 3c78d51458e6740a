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
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .exceptions import DeployError
from .linux import ProcessIdentity, boot_id, group_members, now_ticks, pidfd_open, reap, send_group_signal

log = logging.getLogger("modeld.process")

STRAGGLER_GRACE = 2.0  # seconds an exit waits at most for the killed workers of its group to be gone

class ProcessHandle:
    """A running server process: its identity and a future for its exit code."""

    def __init__(self, ident: ProcessIdentity, pidfd: int, loop: asyncio.AbstractEventLoop, extra: dict[str, str] | None = None):
        self.ident = ident
        self.pidfd = pidfd
        self.extra = extra or {}
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self._loop = loop
        self.code_source: ForkServer | None = None  # who knows the exit code, if we are not the parent
        if pidfd >= 0:  # -1: it had exited before we could watch it
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
        killed = self._kill_stragglers(until=now_ticks())
        self._loop.remove_reader(self.pidfd)
        code = reap(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        # ``exited`` is set once the killed workers are gone too (their port is free for a
        # restart at once) and, for a server forked by the fork server, once it reported the code.
        pending = [self._gone(pidfd) for pidfd in killed]
        if code is None and self.code_source is not None:
            pending.append(self.code_source.exit_code(self.pid))
        if not pending:
            self._set_code(code)
            return
        everything = asyncio.gather(*pending)
        everything.add_done_callback(lambda fut: self._set_code(code if code is not None else fut.result()[-1]))

    def _gone(self, pidfd: int) -> asyncio.Future[None]:
        """Resolved when the process behind ``pidfd`` has exited (or after STRAGGLER_GRACE at most)."""
        future: asyncio.Future[None] = self._loop.create_future()

        def done() -> None:
            if not future.done():
                future.set_result(None)
                self._loop.remove_reader(pidfd)
                os.close(pidfd)

        self._loop.add_reader(pidfd, done)
        self._loop.call_later(STRAGGLER_GRACE, done)
        return future

    def _set_code(self, code: int | None) -> None:
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

    def _kill_stragglers(self, until: int) -> list[int]:
        """Kill what the leader left in its group (grandchildren), and no one else.

        Only processes that started between the leader's start and its death are
        ours: a pgid freed by an emptied group may be taken by a stranger later.
        Returns a pidfd of each process killed.
        """
        killed = []
        for pid in group_members(self.ident.pid, self.ident.start_ticks, until):
            try:
                pidfd = pidfd_open(pid)  # before the kill: this fd names this process, whatever its pid becomes
            except (ProcessLookupError, PermissionError):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.close(pidfd)
                continue
            killed.append(pidfd)
        return killed

    def close(self) -> None:
        """Stop watching (the process itself is left alone)."""
        if self.pidfd >= 0:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        if self.alive:
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
                umask=_server_umask,
            )
        except OSError as exc:
            raise DeployError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
    ident = ProcessIdentity.of(proc.pid) or ProcessIdentity(proc.pid, -1, "")
    handle = ProcessHandle(ident, pidfd_open(proc.pid), asyncio.get_running_loop(), extra)
    # Keep the Popen object until we have reaped the child ourselves, then mark it done, so
    # subprocess never adds it to its own list of children to reap (two reapers lose statuses).
    handle.exited.add_done_callback(lambda fut: setattr(proc, "returncode", fut.result() if not fut.cancelled() else 0))
    return handle


class ForkServerError(OSError):
    """The fork server cannot start a server now (not started, gone, or not answering); spawn cold instead."""


class ForkServer:
    """The daemon's end of a warm fork server (``serve.py --fork-server``) for one interpreter.

    Built-in servers forked from it skip the interpreter start and the imports
    (see ``_serve.fork_server`` for the wire format). It is started without
    waiting; until it says it is ready, ``spawn`` raises ForkServerError and the
    caller spawns cold. A server it forked is not our child, so its exit code
    comes from the fork server's report rather than from ``waitid``; if the
    fork server is gone by then, the code is unknown, as for an adopted server.
    """

    REPLY_TIMEOUT = 10.0  # a fork that takes longer means something is badly wrong: that fork server is stopped

    def __init__(self, python: str, serve_py: str, log_path: Path):
        self._loop = asyncio.get_running_loop()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            with open(log_path, "ab", buffering=0) as log_file:
                self._proc = subprocess.Popen(
                    [python, serve_py, "--fork-server", str(theirs.fileno())],
                    env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, pass_fds=(theirs.fileno(),), umask=_server_umask,
                )
        except OSError:
            self._sock.close()
            raise
        finally:
            theirs.close()
        self._sock.setblocking(False)
        self.ready = False
        self.closed = False
        self._codes: dict[int, int] = {}  # exit codes reported before anyone asked
        self._waiting: dict[int, asyncio.Future[int | None]] = {}
        self._replies: list[dict[str, int]] = []
        self._loop.add_reader(self._sock.fileno(), self._on_message)

    def _on_message(self) -> None:
        while True:
            try:
                msg = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg:
                self.close()
                return
            self._dispatch(json.loads(msg))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("ready"):
            self.ready = True
        elif "exit" in message:
            pid, code = int(message["exit"]), int(message["code"])
            waiter = self._waiting.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(code)
            else:
                self._codes[pid] = code
        elif "pid" in message:
            self._replies.append(message)

    def exit_code(self, pid: int) -> asyncio.Future[int | None]:
        """The exit code of ``pid`` as the fork server reports it (None if it cannot any more)."""
        future: asyncio.Future[int | None] = self._loop.create_future()
        if pid in self._codes:
            future.set_result(self._codes.pop(pid))
        elif self.closed:
            future.set_result(None)
        else:
            self._waiting[pid] = future
        return future

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, log_fd: int, listen_fd: int) -> tuple[int, int]:
        """Fork a server; (pid, start ticks). Blocks the loop for the fork (a few ms) at most."""
        if not self.ready or self.closed:
            raise ForkServerError("the fork server is not ready")
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
        try:
            socket.send_fds(self._sock, [request], [log_fd, listen_fd])
            deadline = time.monotonic() + self.REPLY_TIMEOUT
            while not self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self._sock], [], [], remaining)[0]:
                    self.close()
                    raise ForkServerError("the fork server did not answer")
                self._on_message()
                if self.closed:
                    raise ForkServerError("the fork server is gone")
        except OSError as exc:
            self.close()
            raise ForkServerError(f"the fork server failed: {exc}") from exc
        reply = self._replies.pop(0)
        return int(reply["pid"]), int(reply["ticks"])

    def close(self) -> None:
        """Stop it (the servers it forked carry on, in their own sessions)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()  # it exits on EOF
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_result(None)
        self._waiting.clear()
        with contextlib.suppress(OSError):
            self._proc.wait(timeout=2)
        if self._proc.returncode is None:
            self._proc.kill()
            self._proc.wait()


def spawn_warm(
    fork_server: ForkServer,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    log_path: Path,
    listen_fd: int,
    extra: dict[str, str] | None = None,
) -> ProcessHandle:
    """Start a built-in server from the fork server (argv without the interpreter and serve.py)."""
    if cwd and not os.path.isdir(cwd):
        raise DeployError(f"working directory {cwd!r} does not exist")
    try:
        log_file = open(log_path, "ab", buffering=0)
    except OSError as exc:
        raise DeployError(f"cannot open the server's log {log_path}: {exc.strerror or exc}") from exc
    with log_file:
        with contextlib.suppress(OSError):
            log_file.write(f"--- modeld: starting a warm server at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        pid, ticks = fork_server.spawn(argv, env, cwd, log_file.fileno(), listen_fd)
    ident = ProcessIdentity(pid, ticks, boot_id())
    loop = asyncio.get_running_loop()
    try:
        pidfd = pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1
    if pidfd >= 0 and not ident.is_alive():
        os.close(pidfd)
        pidfd = -1
    handle = ProcessHandle(ident, pidfd, loop, extra)
    if pidfd < 0:  # it died already (and may have been reaped): its code comes from the fork server
        fork_server.exit_code(pid).add_done_callback(lambda fut: handle._set_code(fut.result()))
        return handle
    handle.code_source = fork_server
    return handle


class ForkServers:
    """One fork server per interpreter, started on first use; spawns cold until it is ready."""

    def __init__(self, serve_py: str, log_path: Path):
        self.serve_py = serve_py
        self.log_path = log_path
        self._servers: dict[str, ForkServer] = {}

    def spawn(self, python: str, argv: list[str], **kwargs: Any) -> ProcessHandle | None:
        """A warm server, or None if no fork server for ``python`` is ready yet (spawn cold then)."""
        server = self._servers.get(python)
        if server is not None and server.closed and not server.ready:
            return None  # it died before it was ready (this interpreter cannot run it): cold from now on
        if server is None or server.closed:
            try:
                self._servers[python] = ForkServer(python, self.serve_py, self.log_path)
            except OSError as exc:
                log.warning("cannot start a fork server for %s: %s", python, exc)
            return None
        try:
            return spawn_warm(server, argv, **kwargs)
        except ForkServerError as exc:
            if server.ready:
                log.warning("fork server for %s: %s; starting servers cold", python, exc)
            return None

    def close(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
