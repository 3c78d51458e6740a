"""The daemon's end of the warm fork servers: built-in servers started without an interpreter start.

One fork server (``serve.py --fork-server``) per interpreter has imported uvicorn and the
runtime; a built-in server forked from it skips that (``runtime/_serve/forkserver.py`` is the
other end and defines the wire format). Until one is ready, ``ForkServers.spawn`` returns None
and the caller starts the server cold (``process.spawn``). A warm server is not the daemon's
child: it is watched through a pidfd like any other, its exit code read from the kernel then
(``linux.exit_code_of``), or else taken from the fork server's report.

Errors: ``spawn_warm`` raises ``SpawnError`` (an OSError) as ``process.spawn`` does, for the
Launcher to convert. ``ForkServerError`` (a ModeldError that is also an OSError) never leaves
this module: ``ForkServers.spawn`` takes it as "start this one cold".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import time
from pathlib import Path
from typing import Any

from .containment import Containment
from .detached import start_detached
from .exceptions import ForkServerError
from .groups import Group
from .linux import ProcessIdentity, boot_id, pidfd_open
from .logs import marker
from .process import LogOpener, ProcessHandle, SpawnError, server_umask
from .runtime._serve import forkserver as wire
from .store import LaunchInfo

log = logging.getLogger("modeld.process")  # (the name the daemon's log has always shown for these lines)


class ForkServer:
    """The daemon's end of a warm fork server (``serve.py --fork-server``) for one interpreter.

    Built-in servers forked from it skip the interpreter start and the imports
    (``runtime/_serve/forkserver.py`` defines the wire format, for both ends). It is started without
    waiting; until it says it is ready, ``spawn`` raises ForkServerError and the
    caller spawns cold. A server it forked is not our child: its exit code is read from the
    kernel when its pidfd says it exited (see ``process.py``), and the fork server's report is the
    fallback; if the fork server is gone by then too, the code is unknown.
    """

    REPLY_TIMEOUT = 10.0  # a fork that takes longer means something is badly wrong: that fork server is stopped

    def __init__(self, python: str, serve_py: str, log_path: Path):
        self._loop = asyncio.get_running_loop()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            self._process = start_detached(
                [python, serve_py, "--fork-server", str(theirs.fileno())],
                env=env,
                log_path=log_path,
                pass_fds=(theirs.fileno(),),
                umask=server_umask(),
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
        self._replies: list[tuple[int, int]] = []  # (pid, start ticks) of each spawn, in order
        self._loop.add_reader(self._sock.fileno(), self._on_message)

    def _on_message(self) -> None:
        while True:
            try:
                msg = self._sock.recv(wire.MAX_REPLY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg:
                self.close()
                return
            self._dispatch(wire.parse_reply(msg))

    def _dispatch(self, message: tuple[str, int, int] | None) -> None:
        if message is None:
            return
        kind, pid, value = message
        if kind == "ready":
            self.ready = True
        elif kind == "exit":
            waiter = self._waiting.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(value)
            else:
                self._codes[pid] = value
        elif kind == "spawned":
            self._replies.append((pid, value))

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

    def spawn(
        self, argv: list[str], env: dict[str, str], cwd: str, log_fd: int, listen_fd: int, cgroup: str = ""
    ) -> tuple[int, int]:
        """Fork a server; (pid, start ticks). Blocks the loop for the fork (a few ms) at most.

        ``cgroup``: the ``cgroup.procs`` file the child writes itself into first ('' for none).
        """
        if not self.ready or self.closed:
            raise ForkServerError("the fork server is not ready")
        try:
            wire.send_request(self._sock, argv, env, cwd, cgroup, log_fd, listen_fd)
            deadline = time.monotonic() + self.REPLY_TIMEOUT
            while not self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not _wait_readable(self._sock, remaining):
                    self.close()
                    raise ForkServerError("the fork server did not answer")
                self._on_message()
                if self.closed:
                    raise ForkServerError("the fork server is gone")
        except OSError as exc:
            self.close()
            raise ForkServerError(f"the fork server failed: {exc}") from exc
        return self._replies.pop(0)

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
            self._process.wait(timeout=2)
        if self._process.returncode is None:
            self._process.kill()
            self._process.wait()


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` becomes readable within ``timeout`` (poll: select() takes no fd past 1023,
    and a daemon with a thousand services has fds well past that)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def spawn_warm(
    fork_server: ForkServer,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    open_log: LogOpener,
    listen_fd: int,
    info: LaunchInfo | None = None,
    group: Group | None = None,
    containment: Containment | None = None,
) -> ProcessHandle:
    """Start a built-in server from the fork server (argv without the interpreter and serve.py).

    The child enters ``group``'s cgroup itself, before it runs anything of the model's.
    """
    if cwd and not os.path.isdir(cwd):
        raise SpawnError(f"working directory {cwd!r} does not exist")
    try:
        log_fd = open_log(marker("starting a warm server"))
    except OSError as exc:
        raise SpawnError(f"cannot open the server's log: {exc.strerror or exc}") from exc
    cgroup = containment.child_cgroup(group) if containment is not None and group is not None else ""
    try:
        pid, ticks = fork_server.spawn(argv, env, cwd, log_fd, listen_fd, cgroup)
    finally:
        os.close(log_fd)
    ident = ProcessIdentity(pid, ticks, boot_id())
    loop = asyncio.get_running_loop()
    try:
        pidfd = pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1
    if pidfd >= 0 and not ident.is_alive():
        os.close(pidfd)
        pidfd = -1
    handle = ProcessHandle(ident, pidfd, loop, info, group)
    if pidfd < 0:  # it died already (and may have been reaped): its code comes from the fork server
        fork_server.exit_code(pid).add_done_callback(lambda fut: handle.set_exit_code(fut.result()))
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
        if server is not None and not server.closed and not server.ready:
            server._on_message()  # its "ready" may be waiting, unread, on the socket
            if not server.ready:
                return None  # still starting: this one goes cold
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
